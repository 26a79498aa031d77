"""Make a plugin package importable with its entry points, without installing it into the shared venv.

A directory on PYTHONPATH holding the package (a symlink, so edits are seen) and a `NAME-VERSION.dist-info`
with METADATA and entry_points.txt is what `pip install` leaves behind as far as `importlib.metadata` and
optagent's plugin discovery can tell: the plugin has a distribution name, a version and its entry points.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def add_distribution(site: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """Write `name`-`version`.dist-info into `site` with `entry_points` in the `optagent` group."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[optagent]\n{lines}")
    return info


def install_project(project: Path, site: Path) -> dict[str, str]:
    """Make the project at `project` (a pyproject.toml with [project] and its `optagent` entry points, and
    its packages beside it) importable from `site`. Returns the entry points."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    entry_points = dict(meta.get("entry-points", {}).get("optagent", {}))
    for target in entry_points.values():
        top = target.partition(":")[0].split(".")[0]
        link = site / top
        if not link.exists():
            source = project / top if (project / top).exists() else project / f"{top}.py"
            link = site / source.name
            if not link.exists():
                link.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    add_distribution(site, meta["name"], meta["version"], entry_points)
    return entry_points


def pythonpath_with(site: Path) -> str:
    return os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
