"""A minimal kustomize renderer for deploy/k8s: ``resources`` and JSON 6902 ``patches`` only.

CI has no kustomize binary, and the overlays need nothing more than these two features. Any other
kustomization field raises, so an overlay can never use a feature that this renderer would
silently ignore (and that the validation tests would therefore not see).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Document = dict[str, Any]

_SUPPORTED = {"apiVersion", "kind", "resources", "patches"}
_TARGET_KEYS = {"kind", "name"}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not implement, or a patch misses."""


def render(directory: Path) -> list[Document]:
    """Every resource of the kustomization in ``directory``, with its patches applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    documents: list[Document] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for patch in kustomization.get("patches", []):
        _apply_patch(documents, patch, directory)
    return documents


def _apply_patch(documents: list[Document], patch: dict[str, Any], directory: Path) -> None:
    if set(patch) != {"target", "patch"} or set(patch["target"]) - _TARGET_KEYS:
        raise KustomizeError(f"{directory}: only inline JSON 6902 patches with a kind/name target")
    target = patch["target"]
    matches = [
        d for d in documents
        if d.get("kind") == target.get("kind", d.get("kind"))
        and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
    ]
    if not matches:
        raise KustomizeError(f"{directory}: patch target {target} matches no resource")
    operations = yaml.safe_load(patch["patch"])
    for document in matches:
        for operation in operations:
            apply_operation(document, operation)


def apply_operation(document: Document, operation: dict[str, Any]) -> None:
    """Apply one RFC 6902 ``add``, ``replace`` or ``remove`` to ``document`` in place."""
    op, pointer = operation["op"], operation["path"]
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    if not tokens:
        raise KustomizeError("patching the whole document is not supported")
    parent: Any = document
    for token in tokens[:-1]:
        parent = _child(parent, token, pointer)
    last = tokens[-1]
    if op == "add":
        value = copy.deepcopy(operation["value"])
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else _index(parent, last, pointer, 1), value)
        else:
            parent[last] = value
    elif op in ("replace", "remove"):
        _child(parent, last, pointer)  # RFC 6902: the target must exist.
        key: Any = _index(parent, last, pointer) if isinstance(parent, list) else last
        if op == "replace":
            parent[key] = copy.deepcopy(operation["value"])
        else:
            del parent[key]
    else:
        raise KustomizeError(f"unsupported patch operation {op!r}")


def _child(node: Any, token: str, pointer: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, token, pointer)]
    if isinstance(node, dict) and token in node:
        return node[token]
    raise KustomizeError(f"{pointer}: {token!r} does not exist")


def _index(node: list[Any], token: str, pointer: str, extra: int = 0) -> int:
    if not token.isdigit() or int(token) >= len(node) + extra:
        raise KustomizeError(f"{pointer}: {token!r} is not an index of a {len(node)}-item list")
    return int(token)
