"""The container (deploy/Dockerfile, deploy/compose.yaml).

Where a container engine answers (``docker info`` succeeds), the image is built and
started: it must run as a non-root user, answer ``/readyz`` with 200, answer C-ECHO on
its DIMSE port, and stop cleanly (exit 0) on SIGTERM. Where none does, those tests skip
with the reason; the checks that need no engine always run: the configurations shipped
for the container pass ``dicomnode config check``, and the image pins the same torch as
the Makefile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import yaml
from conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
BUILD_TIMEOUT_S = 3600


def _engine() -> str | None:
    """Why no container engine can be used, or None when one answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "the docker client is not installed"
    try:
        out = subprocess.run([docker, "info", "--format", "{{json .ServerVersion}}"],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no error text"])[0]
        return f"no container engine answers (docker info: {first})"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    why = _engine()
    if why is not None:
        pytest.skip(why)
    tag = f"dicomnode-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    try:
        yield tag
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)


def _port(container: str, port: int) -> int:
    out = subprocess.run(["docker", "port", container, f"{port}/tcp"], capture_output=True,
                         text=True, timeout=30, check=True)
    return int(out.stdout.strip().splitlines()[0].rsplit(":", 1)[1])


def test_image_runs_non_root_answers_readyz_and_echo_and_stops_cleanly(image: str) -> None:
    name = f"dicomnode-test-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(["docker", "run", "-d", "--name", name, "-p", "127.0.0.1::8080",
                          "-p", "127.0.0.1::11112", image], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    try:
        http = _port(name, 8080)
        dimse = _port(name, 11112)
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=5) as r:
                    status = r.status
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        assert status == 200, f"/readyz did not answer 200:\n{logs[-3000:]}"
        assert body  # the checks, by name
        uid = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        assert uid != "0", "the node runs as root"
        from dicomnode.export.dimse import DimseSender, Peer

        assert DimseSender(Peer("DICOMNODE", "127.0.0.1", dimse), "TEST").echo() == 0
        # the image's own HEALTHCHECK (on /readyz) turns healthy after its first interval
        health = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and health != "healthy":
            health = subprocess.run(
                ["docker", "inspect", "--format", "{{.State.Health.Status}}", name],
                capture_output=True, text=True, timeout=30).stdout.strip()
            time.sleep(2)
        assert health == "healthy", f"health check status {health!r}"
        subprocess.run(["docker", "stop", "-t", "60", name], capture_output=True, timeout=120)
        code = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", name],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        assert code == "0", f"exit code {code} on SIGTERM"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


def test_compose_file_is_valid_where_compose_exists() -> None:
    why = _engine()
    if why is not None:
        pytest.skip(why)
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--profile", "workers",
                          "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_container_configs_pass_config_check() -> None:
    from dicomnode.config import NodeConfig

    configs = [ROOT / "deploy" / "container" / "dicomnode.yaml"]
    if "queue" in NodeConfig.model_fields:  # the Celery back-end's settings exist
        configs += [ROOT / "deploy" / "container" / "dicomnode-workers.yaml",
                    ROOT / "deploy" / "container" / "worker.yaml"]
    for path in configs:
        out = subprocess.run([sys.executable, "-m", "dicomnode", "config", "check", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"


def test_compose_and_image_agree_with_the_project() -> None:
    """Same torch pin as the Makefile; non-root user; /readyz health checks; volumes for
    data and keys; Redis and workers only in the 'workers' profile."""
    dockerfile = DOCKERFILE.read_text()
    pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    assert pin and f"ARG TORCH_VERSION={pin.group(1)}" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "/readyz" in dockerfile.split("HEALTHCHECK", 1)[1]
    compose = yaml.safe_load(COMPOSE.read_text())
    node = compose["services"]["node"]
    mounts = " ".join(node["volumes"])
    assert "data:/var/lib/dicomnode" in mounts and "keys:/var/lib/dicomnode-keys" in mounts
    assert "/readyz" in " ".join(node["healthcheck"]["test"])
    assert "profiles" not in node
    for service in ("redis", "worker1", "worker2"):  # two workers (issue 12)
        assert compose["services"][service]["profiles"] == ["workers"]
    for service in ("worker1", "worker2"):
        assert compose["services"][service]["command"][0] == "worker"
    keys = yaml.safe_load((ROOT / "deploy" / "container" / "dicomnode.yaml").read_text())
    assert keys["audit"]["keys"].startswith("/var/lib/dicomnode-keys/")
