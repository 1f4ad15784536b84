"""Tiny architectures shared by the model tests (each forward well under a millisecond), and the
check every retrofitted family's plans pass."""

from __future__ import annotations

from functools import partial
from typing import Any

TINY: dict[str, dict[str, object]] = {
    "conv": {"name": "conv", "channels": 8, "hidden": 16, "num_blocks": 2, "max_length": 64},
    "transformer": {
        "name": "transformer",
        "d_model": 16,
        "ffn": 32,
        "num_heads": 2,
        "num_layers": 2,
        "max_length": 64,
    },
}


def assert_plans_match_reference(
    net: Any, x: Any, lengths: Any, extras: Any = None
) -> list[tuple[Any, Any]]:
    """Every plan of ``net`` (static; dynamic at keep 0.5 and 0.25 and at threshold 0.5; at each
    keep ratio also forced to gather and to the union strategy) equals its masked reference
    forward within 1e-4. Gathering runs fewer MACs than dense; the union at least the gathered
    ones, at most dense. Returns (reference, gathered) per keep ratio, for more checks."""
    import torch

    from models import compile_plan, settings_for
    from models.sparse import Strategy
    from models.sparse.executors import UNION

    close = partial(torch.testing.assert_close, atol=1e-4, rtol=0)
    gathered_runs = []
    for mode, knobs in (("static", {}), ("dynamic", {"keep_ratio": 0.5}),
                        ("dynamic", {"keep_ratio": 0.25}), ("dynamic", {"threshold": 0.5})):
        settings = settings_for(net.config, mode, **knobs)  # type: ignore[arg-type]
        with torch.no_grad():
            reference = net(x, lengths, settings, extras)
            close(compile_plan(net, settings)(x, lengths, extras=extras).logits, reference.logits)
            if mode != "dynamic" or "keep_ratio" not in knobs:
                continue
            # Calibration may choose the dense fallback on so small a model; gathering the kept
            # channels computes only them: the same logits, fewer MACs.
            gathered = compile_plan(net, settings, strategy=Strategy("gather", 1))(
                x, lengths, extras=extras
            )
            close(gathered.logits, reference.logits)
            assert bool((gathered.flops_ratio < 1).all())
            # The union of the batch's kept sets, one matmul over it: the same logits; each
            # request is charged the union's width.
            union = compile_plan(net, settings, strategy=UNION)(x, lengths, extras=extras)
            close(union.logits, reference.logits)
            assert bool((union.macs >= gathered.macs).all())
            assert bool((union.macs <= reference.dense_macs).all())
        gathered_runs.append((reference, gathered))
    return gathered_runs
