"""Gated networks: batching invariance, kept-channel and FLOPs accounting, registry, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import (
    ArchitectureError,
    CheckpointError,
    GatedNetwork,
    GateSettings,
    ModelConfig,
    build_network,
    load_checkpoint,
    save_checkpoint,
)
from models.gates import bucketed_k
from tests.utils.models import TINY


def tiny(arch: str, **dp: object) -> GatedNetwork:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"model": TINY[arch], "dynamic_pruning_config": {"bucket": 2, **dp}}
    )
    net = build_network(cfg).eval()
    for gate in net.static_gates():  # close a few structures so static mode differs from dense
        data = next(gate.parameters()).data
        data[::3] = -10.0
    return net


SETTINGS = [
    GateSettings("dense"),
    GateSettings("static", bucket=2),
    GateSettings("dynamic", keep_ratio=0.5, bucket=2),
    GateSettings("dynamic", threshold=0.4, bucket=2),
]


@pytest.mark.parametrize("arch", ["conv", "transformer"])
@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: f"{s.mode}-{s.keep_ratio}-{s.threshold}"
)
def test_request_result_is_independent_of_batch_mates(
    arch: str, global_pool: bool, settings: GateSettings
) -> None:
    net = tiny(arch, predictor_config={"use_global_pool": global_pool})
    lengths = torch.tensor([5, 23, 11])
    seqs = [torch.randn(n, 1) for n in lengths.tolist()]
    batch = torch.full((3, 23, 1), 7.0)  # non-zero padding must not leak
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    with torch.inference_mode():
        together = net(batch, lengths, settings)
        for i, s in enumerate(seqs):
            alone = net(s.unsqueeze(0), lengths[i : i + 1], settings)
            assert torch.allclose(together.logits[i], alone.logits[0], atol=1e-5)
            assert together.macs[i] == alone.macs[0]


@pytest.mark.parametrize("arch", ["conv", "transformer"])
def test_kept_channels_follow_the_keep_policy(arch: str) -> None:
    net = tiny(arch)
    x, lengths = torch.randn(4, 20, 1), torch.full((4,), 20)
    widths = net.gated_widths()
    with torch.inference_mode():
        dense = net(x, lengths, GateSettings("dense"))
        static = net(x, lengths, GateSettings("static"))
        dyn = net(x, lengths, GateSettings("dynamic", keep_ratio=0.25, bucket=2))
    assert torch.all(dense.flops_ratio == 1.0)
    for name, width in widths.items():
        n_open = width - len(range(0, width, 3))
        assert dense.kept[name].tolist() == [width] * 4
        assert static.kept[name].tolist() == [n_open] * 4
        assert dyn.kept[name].tolist() == [bucketed_k(0.25, n_open, 2)] * 4
    assert torch.all(dyn.macs < static.macs) and torch.all(static.macs < dense.macs)


def test_conv_macs_match_a_hand_count() -> None:
    net = tiny("conv")
    x, lengths = torch.randn(1, 10, 1), torch.tensor([10])
    with torch.inference_mode():
        out = net(x, lengths, GateSettings("dynamic", keep_ratio=0.5, bucket=2))
    c, h, k, length = 8, 16, 5, 10
    kept = bucketed_k(0.5, h - 6, 2)  # 6 of 16 closed by tiny()
    pred = net.blocks[0].gate.predictor
    assert pred is not None
    pred_macs = 2 * c * length + pred.features * pred.hidden + pred.hidden * h
    stem_head = length * 1 * c * k + c * 10
    expected = stem_head + 2 * (length * c * kept * k + length * kept * c + pred_macs)
    dense = stem_head + 2 * (length * c * h * k + length * h * c)
    assert out.macs.item() == expected
    assert out.dense_macs.item() == dense


def test_predictor_overhead_is_small_for_the_default_conv() -> None:
    cfg = ModelConfig()
    net = build_network(cfg).eval()
    with torch.inference_mode():
        settings = GateSettings("dynamic", keep_ratio=1.0)
        out = net(torch.randn(1, 40, 1), torch.tensor([40]), settings)
    assert out.flops_ratio.item() - 1.0 < 0.03


def test_registry_errors_and_import_path() -> None:
    with pytest.raises(ArchitectureError, match="unknown architecture 'resnet'"):
        build_network(ModelConfig.model_validate({"model": {"name": "resnet"}}))
    with pytest.raises(ArchitectureError, match="cannot import"):
        build_network(ModelConfig.model_validate({"model": {"name": "nowhere.mod:build"}}))
    net = build_network(
        ModelConfig.model_validate({"model": {"name": "models.networks:GatedConvNet"}})
    )
    assert type(net).__name__ == "GatedConvNet"


def test_input_shape_errors() -> None:
    from models import InvalidInputError

    net = tiny("conv")
    with pytest.raises(InvalidInputError, match=r"shape \[batch, T, 1\]"):
        net(torch.randn(2, 10), torch.tensor([10, 10]), GateSettings("dense"))
    with pytest.raises(InvalidInputError, match="max_length 64"):
        net(torch.randn(1, 65, 1), torch.tensor([65]), GateSettings("dense"))
    with pytest.raises(InvalidInputError, match=r"lengths must be in \[1, 10\]"):
        net(torch.randn(2, 10, 1), torch.tensor([10, 11]), GateSettings("dense"))
    with pytest.raises(InvalidInputError, match="lengths must be in"):
        net(torch.randn(2, 10, 1), torch.tensor([0, 5]), GateSettings("dense"))


@pytest.mark.parametrize("arch", ["conv", "transformer"])
def test_checkpoint_round_trip(arch: str, tmp_path: Path) -> None:
    net = tiny(arch)
    for gate in net.static_gates():
        gate.set_temperature(0.3)
    save_checkpoint(net, tmp_path / "ckpt", metadata={"note": "x"})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == net.config
    assert all(
        g.beta.item() == pytest.approx(0.3) for g in loaded.static_gates() if hasattr(g, "beta")
    )
    x, lengths = torch.randn(2, 12, 1), torch.tensor([12, 7])
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    with torch.inference_mode():
        assert torch.equal(net(x, lengths, settings).logits, loaded(x, lengths, settings).logits)


def test_checkpoint_mismatch_is_reported(tmp_path: Path) -> None:
    save_checkpoint(tiny("conv"), tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("hidden: 16", "hidden: 24"))
    with pytest.raises(CheckpointError, match=r"blocks.0.conv1.weight: shape \[16, 8, 5\] in file"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")
