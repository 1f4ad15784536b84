"""The Dockerfile: hadolint, what the image promises, and its install commands run for real.

No container engine can run the image on the test machines, so the install test repeats the
build stage's commands (same venv and pip commands, same copied files) in a fresh venv, then
serves the shipped model from that venv and runs the image's HEALTHCHECK command against it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import (
    DOCKERFILE,
    ROOT,
    dockerfile_instructions,
    dockerfile_stage,
    image_env,
    image_exposed_ports,
    infer_once,
    require_tool,
)
from tests.integration.conftest import Server, free_port, wait_until_ready

INSTALL_TIMEOUT_S = 300


def test_hadolint_clean() -> None:
    tool = require_tool("hadolint")
    result = subprocess.run(
        [tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_promises() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert [rest for k, rest in instructions if k == "FROM"] == [
        "${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    runtime = dockerfile_stage("runtime")
    env = " ".join(rest for k, rest in runtime if k == "ENV")
    assert "GATED_HOST=0.0.0.0" in env and "GATED_MODEL_REPOSITORY=/models" in env
    (user,) = [rest for k, rest in runtime if k == "USER"]
    assert user not in ("root", "0")
    # REST and gRPC, each on the port the image's own environment gives the server.
    assert image_exposed_ports() == {8000, 8001}
    assert image_env()["GATED_PORT"] == "8000"
    assert image_env()["GATED_GRPC_PORT"] == "8001"
    (entrypoint,) = [rest for k, rest in runtime if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["gated", "serve"]
    assert any(k == "COPY" and rest.endswith("models/pretrained/ /models/") for k, rest in runtime)
    (healthcheck,) = [rest for k, rest in runtime if k == "HEALTHCHECK"]
    assert "/v2/health/ready" in healthcheck
    build = dockerfile_stage("build")
    installs = [rest for k, rest in build if k == "RUN" and "pip install" in rest]
    assert installs[0].endswith("pip install torch==2.13.0")


def test_build_stage_installs_and_serves(tmp_path: Path) -> None:
    build = dockerfile_stage("build")
    # The build context as COPY lays it out under WORKDIR, minus .dockerignore's exclusions.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("models", "service"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATED_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("VIRTUAL_ENV", None)
    # PIP_EXTRA_INDEX_URL (the CPU torch index) is left out: the test machine's pip
    # configuration decides where torch comes from, and pip's cache makes this fast.
    runs = [rest for k, rest in build if k == "RUN"]
    assert runs[0] == "python3 -m venv /opt/venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    for command in runs[1:]:
        argv = shlex.split(command)
        assert argv[:4] == ["python", "-m", "pip", "install"], command
        result = subprocess.run(
            [str(venv / "bin" / "python"), *argv[1:], "--quiet"], cwd=source, env=env,
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    # The runtime stage: the shipped repository copied to /models, served by the entrypoint.
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "pretrained", models, ignore=ignore)
    port = free_port()
    env.update(GATED_HOST="127.0.0.1", GATED_PORT=str(port), GATED_MODEL_REPOSITORY=str(models))
    # A free port for gRPC too: the image's 8001 may be taken on a test machine.
    env["GATED_GRPC_PORT"] = str(free_port())
    log = tmp_path / "server.log"
    # Started from a directory outside the repository, so only the installed package is used.
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(venv / "bin" / "gated"), "serve"], cwd=tmp_path, env=env,
            stdout=sink, stderr=subprocess.STDOUT,
        )
    server = Server(process, port, log)
    try:
        wait_until_ready(server)
        infer_once(server)
        runtime = dockerfile_stage("runtime")
        (healthcheck,) = [rest for k, rest in runtime if k == "HEALTHCHECK"]
        probe = json.loads(healthcheck.split(" CMD ", 1)[1])
        assert probe[0] == "python"
        checked = subprocess.run(
            [str(venv / "bin" / "python"), *probe[1:]], env=env, timeout=30,
            capture_output=True, text=True,
        )
        assert checked.returncode == 0, checked.stderr
    except AssertionError as err:
        raise AssertionError(f"{err}\nserver log:\n{server.output()}") from err
    finally:
        assert server.stop() == 0, server.output()
