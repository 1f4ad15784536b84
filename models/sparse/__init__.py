"""Sparse execution plans (docs/plans.md), one job per file:

- ``kernels``: fused matmul + activation, unfolded convolutions, oneDNN off, timing;
- ``workspace``: the buffers plans reuse;
- ``executors``: what runs in place of each gated layer type (and the unfolded conv);
- ``calibrate``: timing the execution strategies per (batch size, k);
- ``macs``: executed-MAC accounting of a plan's forwards;
- ``plan``: :func:`compile_plan` and :class:`SparsePlan`.
"""

from models.sparse.executors import (
    DENSE,
    AttentionExecutor,
    FFNExecutor,
    Strategy,
    static_keep_mask,
)
from models.sparse.kernels import addmm_act, time_once, without_onednn
from models.sparse.plan import DEFAULT_BATCH_SIZES, CalibrationCache, SparsePlan, compile_plan
from models.sparse.workspace import Workspace

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DENSE",
    "AttentionExecutor",
    "CalibrationCache",
    "FFNExecutor",
    "SparsePlan",
    "Strategy",
    "Workspace",
    "addmm_act",
    "compile_plan",
    "static_keep_mask",
    "time_once",
    "without_onednn",
]
