"""Per-row blend weights and dynamic thresholds: one batch, each row as if it ran alone."""

from __future__ import annotations

import pytest
import torch

from models import GateSettings
from models.sparse import Strategy, compile_plan
from tests.unit.test_sparse import batch, tiny

WEIGHTS = [0.0, 0.3, None, 1.0, 0.7, 0.5, None, 0.9]  # None: the model's configured weight
THRESHOLDS = [0.2, 0.45, 0.6, 0.3, 0.5, 0.45, 0.1, 0.8]


def _rows(base: GateSettings, size: int) -> list[GateSettings]:
    rows = []
    for i in range(size):
        update: dict[str, object] = {"dynamic_weight": WEIGHTS[i]}
        if base.threshold is not None:
            update["threshold"] = THRESHOLDS[i]
        rows.append(base.model_copy(update=update))
    return rows


def _solo(net: object, x: torch.Tensor, lengths: torch.Tensor, rows: list[GateSettings]) -> list:
    with torch.inference_mode():
        return [net(x[i : i + 1], lengths[i : i + 1], r) for i, r in enumerate(rows)]  # type: ignore[operator]


@pytest.mark.parametrize("arch", ["conv", "transformer"])
@pytest.mark.parametrize("global_pool", [True, False], ids=["global", "per-step"])
@pytest.mark.parametrize(
    "base",
    [GateSettings("dynamic", keep_ratio=0.5, bucket=2), GateSettings("dynamic", threshold=0.4,
                                                                      bucket=2)],
    ids=["keep", "threshold"],
)
def test_each_row_runs_its_own_values_in_the_reference_and_every_plan(
    arch: str, global_pool: bool, base: GateSettings
) -> None:
    net = tiny(arch, predictor_config={"use_global_pool": global_pool})
    x, lengths = batch(8)
    rows = _rows(base, 8)
    solo = _solo(net, x, lengths, rows)
    with torch.inference_mode():
        ref = net(x, lengths, base, rows=rows)
        uniform = net(x, lengths, base)
    for i, alone in enumerate(solo):
        assert (ref.logits[i] - alone.logits[0]).abs().max() < 1e-4, i
        for name in ref.kept:
            assert float(ref.kept[name][i]) == float(alone.kept[name][0]), (i, name)
    # The values act: the same batch at the batch's own values differs.
    assert (ref.logits - uniform.logits).abs().max() > 1e-3
    strategies = [None, Strategy("dense"), Strategy("gather", 1), Strategy("gather", 8),
                  Strategy("union")]
    for strategy in strategies:
        plan = compile_plan(net, base, calibrate=False, strategy=strategy)
        with torch.inference_mode():
            out = plan(x, lengths, rows=rows)
        assert (out.logits - ref.logits).abs().max() < 1e-4, strategy
        for name in ref.kept:
            assert torch.equal(out.kept[name].float(), ref.kept[name].float()), (strategy, name)


def test_rows_of_another_plan_are_refused() -> None:
    net = tiny("conv")
    x, lengths = batch(3)
    base = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    plan = compile_plan(net, base, calibrate=False)
    other = [base, base, GateSettings("dynamic", keep_ratio=0.25, bucket=2)]
    with pytest.raises(ValueError, match="plan compiled for .* called with .*keep_ratio=0.25"):
        plan(x, lengths, rows=other)
    with pytest.raises(ValueError, match="differ from the batch's"):
        net(x, lengths, base, rows=other)
    with pytest.raises(ValueError, match="differ from the batch's"):  # a static threshold is
        static = GateSettings("static", threshold=0.5, bucket=2)  # a keep set, not a value
        net(x, lengths, static, rows=[static, static, static.model_copy(update={"threshold": 0.6})])
    with pytest.raises(ValueError, match="2 per-row gate settings for a batch of 3"):
        plan(x, lengths, rows=[base, base])


def test_a_threshold_that_is_structure_is_not_a_row_value() -> None:
    """Without predictors a dynamic threshold picks a static keep set: its count is part of
    the plan, so rows of another count are another plan's."""
    net = tiny("conv", use_input_gating=False)
    assert all(layer.gate.predictor is None for layer in net.gated())
    x, lengths = batch(3)
    base = GateSettings("dynamic", threshold=0.01, bucket=2)  # every open channel
    plan = compile_plan(net, base, calibrate=False)
    other = GateSettings("dynamic", threshold=1.0, bucket=2)  # the fully open ones
    assert net.plan_key(other) != net.plan_key(base)
    with pytest.raises(ValueError, match="plan compiled for"):
        plan(x, lengths, rows=[base, other, base])
