"""Package discovery for the three top-level folders mapped onto one namespace (metadata: pyproject.toml).

`agent/` is `optagent`, `plugins/` is `optagent.plugins`, `workers/` is `optagent.workers`. Every
subpackage under them is found here, so a new one can never be left out of the wheel
(tests/test_packaging.py builds the wheel and imports every module from it).
"""

from setuptools import find_packages, setup

ROOTS = {"optagent": "agent", "optagent.plugins": "plugins", "optagent.workers": "workers"}

setup(
    package_dir=ROOTS,
    packages=[name for package, folder in ROOTS.items()
              for name in (package, *(f"{package}.{sub}" for sub in find_packages(folder)))],
)
