"""Gate math against docs/gates.md §1-§4."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig, PredictorConfig
from models.errors import ConfigError
from models.gates import (
    GAMMA,
    ZETA,
    DynamicStructuredGate,
    GateSettings,
    HardConcreteGate,
    SigmoidGate,
    apply_keep_policy,
    bucketed_k,
    settings_for,
    straight_through,
    temperature_at,
)
from models.predictor import InputPredictor, time_mask


def test_hardconcrete_init_is_open() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate(1000, init_mean=0.01).eval()
    assert gate.log_alpha.mean().item() == pytest.approx(math.log(0.99 / 0.01), abs=0.01)
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.all(gate() == 1.0)


def test_hardconcrete_eval_gives_exact_zeros_and_ones() -> None:
    gate = HardConcreteGate(5).eval()
    # z = clamp(σ(a)·(ζ−γ)+γ, 0, 1): exactly 0 for σ(a) ≤ −γ/(ζ−γ), exactly 1 for σ(a) ≥ (1−γ)/(ζ−γ)
    edge = math.log(11.0)  # σ(ln 11) = 11/12 = (1 − γ)/(ζ − γ)
    gate.log_alpha.data = torch.tensor([-10.0, -edge - 1e-3, 0.0, edge + 1e-3, 10.0])
    z = gate()
    assert z[0].item() == 0.0 and z[1].item() == 0.0
    assert z[3].item() == 1.0 and z[4].item() == 1.0
    assert z[2].item() == pytest.approx(0.5 * (ZETA - GAMMA) + GAMMA)


def test_hardconcrete_train_is_stochastic_and_in_unit_interval() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate(64)
    gate.log_alpha.data.zero_()
    a, b = gate(), gate()
    assert not torch.equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_expected_l0_formula_and_monte_carlo() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate(4, temperature=0.5)
    gate.log_alpha.data = torch.tensor([-2.0, -0.5, 0.5, 3.0])
    beta = 0.5
    expected = sum(
        1 / (1 + math.exp(-(a - beta * math.log(-GAMMA / ZETA)))) for a in [-2.0, -0.5, 0.5, 3.0]
    )
    assert gate.expected_l0().item() == pytest.approx(expected, rel=1e-6)
    # It is the probability that a training sample is non-zero.
    samples = torch.stack([gate() for _ in range(20000)])
    assert (samples > 0).float().sum(1).mean().item() == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize(("step", "beta"), [(0, 1.0), (99, 1.0), (100, 0.95), (5000, 0.1)])
def test_temperature_schedule(step: int, beta: float) -> None:
    # The guide's values: temperature 1.0, decay 0.95 every 100 steps, floor 0.1.
    assert temperature_at(step, 1.0, 0.95, 100, 0.1) == pytest.approx(beta)


def test_temperature_is_a_buffer_saved_with_the_model() -> None:
    gate = HardConcreteGate(3)
    gate.set_temperature(0.25)
    assert "beta" in gate.state_dict() and gate.state_dict()["beta"].item() == 0.25
    assert "beta" not in dict(gate.named_parameters())


def test_sigmoid_gate_is_continuous_with_l0_proxy() -> None:
    gate = SigmoidGate(3, init_mean=0.01)
    assert gate.logit.data[0].item() == pytest.approx(math.log(99))
    gate.logit.data = torch.tensor([-1.0, 0.0, 2.0])
    z = gate.eval()()
    assert torch.allclose(z, torch.sigmoid(gate.logit.data))
    assert gate.expected_l0().item() == pytest.approx(z.sum().item())


@pytest.mark.parametrize(
    ("ratio", "n_open", "bucket", "k"),
    [
        (0.5, 64, 8, 32),
        (0.3, 64, 8, 24),
        (0.01, 64, 8, 8),
        (0.9, 60, 8, 56),
        (0.99, 60, 8, 60),
        (0.25, 64, 1, 16),
        (0.26, 64, 4, 20),
        (1.0, 5, 8, 5),
        (0.5, 0, 8, 0),
    ],
)
def test_topk_bucketing(ratio: float, n_open: int, bucket: int, k: int) -> None:
    assert bucketed_k(ratio, n_open, bucket) == k


def test_keep_policy_topk_only_among_open_channels() -> None:
    final = torch.tensor([[0.9, 0.0, 0.8, 0.1, 0.7, 0.0, 0.2, 0.3]])
    open_mask = torch.tensor([True, False, True, True, True, False, True, True])
    hard = apply_keep_policy(final, open_mask, keep_ratio=0.5, threshold=None, bucket=1)
    assert hard.tolist() == [[1, 0, 1, 0, 1, 0, 0, 0]]  # k = ceil(0.5 · 6) = 3
    hard = apply_keep_policy(final, open_mask, keep_ratio=0.5, threshold=None, bucket=4)
    assert hard.sum().item() == 4 and hard[0, 1] == 0 and hard[0, 5] == 0


def test_keep_policy_threshold_and_none() -> None:
    final = torch.tensor([[0.9, 0.5, 0.4, 0.6]])
    open_mask = torch.tensor([True, True, True, False])
    assert apply_keep_policy(final, open_mask, None, 0.5, 8).tolist() == [[1, 1, 0, 0]]
    assert apply_keep_policy(final, open_mask, None, None, 8).tolist() == [[1, 1, 1, 0]]


def test_straight_through_forward_zeros_backward_identity() -> None:
    final = torch.tensor([0.9, 0.2, 0.6], requires_grad=True)
    hard = torch.tensor([1.0, 0.0, 1.0])
    gate = straight_through(final, hard)
    assert gate.tolist() == pytest.approx([0.9, 0.0, 0.6])
    (gate * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert final.grad is not None and final.grad.tolist() == [1.0, 2.0, 3.0]


def _gate(weight: float, n: int = 4, **dp: object) -> DynamicStructuredGate:
    cfg = ModelConfig.model_validate(
        {"dynamic_pruning_config": {"dynamic_weight": weight, "keep_ratio": None, **dp}}
    )
    gate = DynamicStructuredGate(n, 3, cfg).eval()
    gate.static_gate.log_alpha.data = torch.tensor([10.0, 0.0, -10.0, 10.0])[:n]
    return gate


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_blend_formula(w: float, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _gate(w)
    dynamic = torch.tensor([[0.2, 0.4, 0.9, 1.0], [1.0, 0.5, 0.5, 0.1]])
    assert gate.predictor is not None
    monkeypatch.setattr(gate.predictor, "forward", lambda x, mask: dynamic)
    static = torch.tensor([1.0, 0.5 * (ZETA - GAMMA) + GAMMA, 0.0, 1.0])
    x, mask = torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)
    out, kept = gate(x, mask, GateSettings(mode="dynamic"))
    assert out is not None
    expected = (1 - w) * static + w * (static * dynamic)
    assert torch.allclose(out.squeeze(1), expected)
    assert out[:, 0, 2].eq(0).all()  # statically closed stays closed, whatever w
    assert kept.tolist() == [3.0, 3.0]
    static_out, _ = gate(x, mask, GateSettings(mode="static"))
    assert static_out is not None and torch.allclose(static_out.squeeze(1), static.expand(2, 4))
    dense_out, dense_kept = gate(x, mask, GateSettings(mode="dense"))
    assert dense_out is None and dense_kept.tolist() == [4.0, 4.0]


def test_no_predictor_when_input_gating_is_off() -> None:
    cfg = ModelConfig.model_validate({"dynamic_pruning_config": {"use_input_gating": False}})
    assert DynamicStructuredGate(4, 3, cfg).predictor is None
    cfg = ModelConfig.model_validate({"use_dynamic_pruning": False})
    assert DynamicStructuredGate(4, 3, cfg).predictor is None


def test_dynamic_mode_false_trains_static_only() -> None:
    cfg = ModelConfig.model_validate(
        {"dynamic_mode": False, "dynamic_pruning_config": {"keep_ratio": None}}
    )
    gate = DynamicStructuredGate(4, 3, cfg).train()
    out, _ = gate(torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), GateSettings("dynamic"))
    assert out is not None and torch.allclose(out[0], out[1])  # input-independent


@pytest.mark.parametrize("global_pool", [True, False])
def test_predictor_is_padding_invariant(global_pool: bool) -> None:
    torch.manual_seed(0)
    pred = InputPredictor(6, 10, PredictorConfig(use_global_pool=global_pool, window=5)).eval()
    short = torch.randn(1, 7, 6)
    alone = pred(short, time_mask(torch.tensor([7]), 7))
    longer = torch.randn(1, 19, 6) * 5 + 3
    batch = torch.zeros(2, 19, 6)
    batch[0, :7] = short[0]
    batch[0, 7:] = 1e3  # garbage in the padding must not leak
    batch[1] = longer[0]
    both = pred(batch, time_mask(torch.tensor([7, 19]), 19))
    if global_pool:
        assert torch.allclose(both[0], alone[0], atol=1e-5)
    else:
        assert torch.allclose(both[0, :7], alone[0], atol=1e-5)


def test_predictor_global_stats_are_mean_and_population_std() -> None:
    pred = InputPredictor(2, 3, PredictorConfig(reduction_ratio=1))
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    stats = pred._global_stats(x, time_mask(torch.tensor([2]), 3))
    assert stats[0].tolist() == pytest.approx([2.0, 4.0, math.sqrt(1 + 1e-5), math.sqrt(4 + 1e-5)])
    assert pred.hidden == max(4 // 1, 8)


def test_gate_settings_validation() -> None:
    with pytest.raises(ConfigError, match="mode: got 'sparse'"):
        GateSettings(mode="sparse")
    with pytest.raises(ConfigError, match=r"keep_ratio: got 0.0; .*allowed: \(0, 1\]"):
        GateSettings(keep_ratio=0.0)
    with pytest.raises(ConfigError, match="threshold: got 1.5"):
        GateSettings(threshold=1.5)
    # Strict numbers: what a JSON client sends as a string or a bool is not a keep ratio.
    for bad in ("0.5", True):
        with pytest.raises(ConfigError, match="keep_ratio"):
            GateSettings.parse({"mode": "dynamic", "keep_ratio": bad})
    with pytest.raises(ConfigError, match="unknown key"):
        GateSettings.parse({"mode": "dense", "keep": 0.5})


def test_settings_for_fills_dynamic_defaults_only() -> None:
    cfg = ModelConfig.model_validate({"dynamic_pruning_config": {"keep_ratio": 0.3, "bucket": 2}})
    assert settings_for(cfg, "dynamic") == GateSettings("dynamic", keep_ratio=0.3, bucket=2)
    assert settings_for(cfg, "static") == GateSettings("static", bucket=2)
    assert settings_for(cfg, "dynamic", threshold=0.4).threshold == 0.4


def test_the_gate_type_imports_without_torch() -> None:
    """The wire protocol and other torch-free code validate gate parameters with it."""
    import subprocess
    import sys

    code = (
        "import sys; from models import GateSettings; from models.contract import ModelContract; "
        "GateSettings('dynamic', keep_ratio=0.5); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
