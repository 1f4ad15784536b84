"""What the benchmark scripts share: the shipped model and where results go.

The benchmarks run as scripts (``python benchmarks/<name>.py``), so this folder is first on
``sys.path`` and they import this module as ``common``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the project's packages, also from an uninstalled checkout
    sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "models" / "pretrained"
CONFIG = ROOT / "models" / "configs" / "mnist1d_conv.yaml"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "mnist1d-conv"


def shipped_repository(tmp: Path) -> tuple[Path, str]:
    """The shipped checkpoint's repository if present, else one in ``tmp`` holding the shipped
    config with random weights; and a phrase saying which."""
    if (SHIPPED / MODEL / "model.safetensors").is_file():
        return SHIPPED, "shipped checkpoint"
    from models import build_network, load_config, save_checkpoint

    save_checkpoint(build_network(load_config(CONFIG)).eval(), tmp / MODEL)
    return tmp, "shipped config, random weights (checkpoint absent)"
