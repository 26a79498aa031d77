"""deploy/: the files docker and Kubernetes would read are checked for shape (no docker engine here);
local-cluster.sh, the one deployment this machine can run, is run for real."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_compose_has_persistent_redis_postgres_and_gpu_workers() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "worker"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd and "--requirepass" in redis_cmd
    assert any(v.startswith("pg-data:") for v in services["postgres"]["volumes"])
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # either would break --scale
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["command"][:1] == ["worker"] and "--gpus" in worker["command"]
    env = worker["environment"]
    assert env["OPTAGENT_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert "OPTAGENT_SECRET" in env and "OPTAGENT_DB" not in env  # workers never touch the database
    assert set(compose["volumes"]) >= {"redis-data", "pg-data"}
    # secrets come from the environment, never literals in the file
    assert not re.search(r"PASSWORD:\s*[\"']?[A-Za-z0-9]", (DEPLOY / "docker-compose.yml").read_text())


def test_k8s_manifests_are_well_formed() -> None:
    objects = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _docs(f)]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Deployment", "optagent-worker") in kinds and ("Secret", "optagent") in kinds
    assert ("StatefulSet", "optagent-redis") in kinds and ("StatefulSet", "optagent-postgres") in kinds
    for o in objects:
        assert o["apiVersion"] and o["metadata"]["name"]
        if o["kind"] in ("Deployment", "StatefulSet"):
            spec = o["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    worker = next(o for o in objects if o["kind"] == "Deployment")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][0] == "worker" and "--gpus" in container["args"]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs == {"OPTAGENT_BROKER_URL": "OPTAGENT_BROKER_URL", "OPTAGENT_SECRET": "OPTAGENT_SECRET"}
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert set(secret_refs.values()) <= set(secret["stringData"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims <= {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}


def test_systemd_unit_is_one_instance_per_gpu() -> None:
    text = (DEPLOY / "systemd" / "optagent-worker@.service").read_text()
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = line[1:-1]
            sections[current] = {}
            continue
        assert current is not None and "=" in line, f"not key=value inside a section: {line}"
        key, value = line.split("=", 1)
        sections[current][key] = value
    assert set(sections) == {"Unit", "Service", "Install"}
    service = sections["Service"]
    assert "--gpus %i" in service["ExecStart"] and service["ExecStart"].split()[0].startswith("/")
    assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"].startswith("/etc/")
    if shutil.which("systemd-analyze"):
        subprocess.run(["systemd-analyze", "verify", "--man=no", str(DEPLOY / "systemd" / "optagent-worker@.service")],
                       capture_output=True, check=False)  # informative only: User/paths do not exist here


def test_local_cluster_script_parses() -> None:
    subprocess.run(["bash", "-n", str(DEPLOY / "local-cluster.sh")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "error", str(DEPLOY / "local-cluster.sh")], check=True)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_local_cluster_starts_and_stops(tmp_path: Path) -> None:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            pytest.skip(f"needs {binary}")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "OPTAGENT_CLUSTER_DIR": str(tmp_path / "cluster"), "OPTAGENT_PYTHON": sys.executable,
           "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "OPTAGENT_QUEUE": f"deploy-test-{tmp_path.name}",
           "OPTAGENT_CACHE_DIR": str(tmp_path / "cache")}
    script = str(DEPLOY / "local-cluster.sh")
    started = subprocess.run([script, "start", "1"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        cluster_env = (tmp_path / "cluster" / "cluster.env").read_text()
        password = re.search(r"redis://:([^@]+)@", cluster_env).group(1)  # type: ignore[union-attr]
        assert "redis://:***@127.0.0.1:" in started.stdout and password not in started.stdout
        assert "postgresql+psycopg://postgres@127.0.0.1:" in started.stdout
        pids = [int(line.split()[0]) for line in (tmp_path / "cluster" / "pids").read_text().splitlines()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        worker_log = (tmp_path / "cluster" / "worker1.log").read_text()
        assert " ready." in worker_log and password not in worker_log
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))
