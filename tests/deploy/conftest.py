"""Shared pieces of the deployment tests: the tools they run and one real server.

A test that needs an external tool (promtool, prometheus, hadolint, kubernetes-validate) skips
when it is missing on a developer machine, but fails under CI (CI=true): `.ci/run` installs every
one of them, so a missing tool there is a broken pipeline, not a reason to skip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Server, serving

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined, comments
    dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def dockerfile_stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the stage ``FROM ... AS name``."""
    stage: list[tuple[str, str]] = []
    current = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            current = rest.split()[-1]
        elif current == name:
            stage.append((keyword, rest))
    return stage


def image_env() -> dict[str, str]:
    """The environment the image's runtime stage sets with ENV (key=value form)."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_stage("runtime"):
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def image_exposed_ports() -> set[int]:
    """The ports the image's runtime stage declares with EXPOSE."""
    return {int(port.split("/")[0]) for keyword, rest in dockerfile_stage("runtime")
            if keyword == "EXPOSE" for port in rest.split()}


def require_tool(name: str) -> str:
    """Path of the executable ``name``; skip (or fail under CI) when it is not installed."""
    # `make test` runs the venv's python without activating the venv, so pip-installed tools
    # sit beside the interpreter rather than on PATH.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} is not installed (.ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run this test")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``gated serve`` on the shipped model repository, the one the image serves."""
    with serving(None, tmp_path_factory.mktemp("deploy-logs")) as srv:
        yield srv


def metric_samples(server: Server) -> set[str]:
    """Names of every sample the server exposes at /metrics (with _bucket, _total, ...)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def infer_once(server: Server, model: str = "mnist1d-conv") -> None:
    """One JSON inference of zeros shaped after the model's own metadata."""
    meta = httpx.get(f"{server.url}/v2/models/{model}", timeout=10.0).json()
    spec = meta["inputs"][0]
    shape = [1 if d == -1 else d for d in spec["shape"]]
    count = 1
    for d in shape:
        count *= d
    body = {"inputs": [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                        "data": [0] * count}]}
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=30.0)
    assert response.status_code == 200, response.text
