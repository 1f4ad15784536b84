"""Sparse plans against the masked reference: logits within 1e-4, kept and MACs equal; export."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import (
    GatedNetwork,
    GateSettings,
    InvalidInputError,
    ModelConfig,
    build_network,
    load_checkpoint,
)
from models.export import export_checkpoint, prune_static
from models.sparse import Strategy, addmm_act, compile_plan
from models.sparse.executors import static_keep_mask
from models.sparse.kernels import ONEDNN_CACHE_CAPACITY
from tests.utils.models import TINY

SETTINGS = [
    GateSettings("dense"),
    GateSettings("static", bucket=2),
    GateSettings("static", keep_ratio=0.5, bucket=2),
    GateSettings("static", threshold=0.99, bucket=2),
    GateSettings("dynamic", keep_ratio=0.5, bucket=2),
    GateSettings("dynamic", keep_ratio=0.2, bucket=2, dynamic_weight=1.0),
    GateSettings("dynamic", keep_ratio=1.0, bucket=2),
    GateSettings("dynamic", threshold=0.4, bucket=2),
    GateSettings("dynamic", bucket=2),
]
LENGTHS = {1: [23], 3: [5, 23, 11], 8: [3, 23, 9, 23, 1, 7, 23, 4]}


def tiny(arch: str, gate_type: str = "hardconcrete", **dp: object) -> GatedNetwork:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"model": TINY[arch], "dynamic_pruning_config": {"bucket": 2, "gate_type": gate_type, **dp}}
    )
    net = build_network(cfg).eval()
    for gate in net.static_gates():  # close a few structures so static mode differs from dense
        data = next(gate.parameters()).data
        data[::3] = -10.0
        data[1::4] = data[1::4] * 0 - 0.8  # partly open: z strictly between 0 and 1
    return net


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor(LENGTHS[size])
    x = torch.full((size, 23, 1), 7.0)  # non-zero padding must not leak
    gen = torch.Generator().manual_seed(size)
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = torch.randn(n, 1, generator=gen)
    return x, lengths


def assert_same(
    net: GatedNetwork, plan_fn: object, settings: GateSettings, size: int, exact: str = ""
) -> None:
    x, lengths = batch(size)
    with torch.inference_mode():
        ref = net(x, lengths, settings)
        out = plan_fn(x, lengths)  # type: ignore[operator]
    assert (out.logits - ref.logits).abs().max() < 1e-4
    assert list(out.kept) == list(ref.kept)
    for name in ref.kept:
        assert torch.equal(out.kept[name].float(), ref.kept[name].float()), name
    # MACs count what ran: the policy's kept channels when gathered, every open channel when
    # a layer fell back to dense, bucket padding included with a threshold policy.
    if settings.mode == "dynamic":
        with torch.inference_mode():
            everything = net(x, lengths, GateSettings("dynamic", bucket=settings.bucket)).macs
        assert torch.all(out.macs >= ref.macs) and torch.all(out.macs <= everything)
        if exact == "dense":
            assert torch.equal(out.macs, everything)
    if exact == "kept" or settings.mode != "dynamic":
        assert torch.equal(out.macs, ref.macs)
    assert torch.equal(out.dense_macs, ref.dense_macs)


@pytest.mark.parametrize("arch", ["conv", "transformer"])
@pytest.mark.parametrize("global_pool", [True, False], ids=["global", "per-step"])
@pytest.mark.parametrize("gate_type", ["hardconcrete", "sigmoid"])
@pytest.mark.parametrize(
    "settings",
    SETTINGS,
    ids=lambda s: f"{s.mode}-k{s.keep_ratio}-t{s.threshold}-w{s.dynamic_weight}",
)
def test_plan_matches_masked_reference(
    arch: str, global_pool: bool, gate_type: str, settings: GateSettings
) -> None:
    net = tiny(arch, gate_type, predictor_config={"use_global_pool": global_pool})
    plan = compile_plan(net, settings, calibrate=False)
    for size in (1, 3, 8):
        assert_same(net, plan, settings, size)


@pytest.mark.parametrize("arch", ["conv", "transformer"])
@pytest.mark.parametrize(
    "strategy",
    [Strategy("dense"), Strategy("gather", 1), Strategy("gather", 2), Strategy("gather", 8)],
    ids=str,
)
@pytest.mark.parametrize(
    "settings",
    [
        GateSettings("dynamic", keep_ratio=0.5, bucket=2),
        GateSettings("dynamic", keep_ratio=0.25, bucket=4, dynamic_weight=0.8),
        GateSettings("dynamic", threshold=0.45, bucket=2),
    ],
    ids=lambda s: f"k{s.keep_ratio}-t{s.threshold}",
)
def test_every_strategy_matches(arch: str, strategy: Strategy, settings: GateSettings) -> None:
    net = tiny(arch)
    plan = compile_plan(net, settings, calibrate=False, strategy=strategy)
    exact = "dense" if strategy.kind == "dense" else ("kept" if settings.keep_ratio else "")
    # Varying channel counts are counted by the fitted affine formula, not the slow one.
    for size in (1, 3, 8):
        assert_same(net, plan, settings, size, exact)


@pytest.mark.parametrize("arch", ["conv", "transformer"])
def test_calibration_picks_a_strategy_per_batch_and_k(arch: str) -> None:
    net = tiny(arch)
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    plan = compile_plan(net, settings, batch_sizes=(1, 3), calib_length=23, reps=1)
    layer = plan.layers[0]
    assert set(layer.strategies) == {(1, layer.k), (3, layer.k)}
    assert plan.report[layer.name]
    for size in (1, 3, 8):  # batch 8 maps onto the nearest calibrated size
        assert_same(net, plan, settings, size)


def test_static_plan_removes_closed_channels_and_heads() -> None:
    net = tiny("transformer")
    plan = compile_plan(net, GateSettings("static", bucket=2))
    for attn, layer in zip(plan.attentions.values(), plan.layers, strict=True):
        assert attn.heads < 2
        assert layer.width < 32
        assert layer.predictor is None  # no gate math at request time


def test_plans_read_the_models_weights_without_copies() -> None:
    """Dense plans, unpruned attention and the dense path of a packed layer are views: a plan
    adds no second copy of the weights to memory (or to the cache a forward streams through)."""
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"model": TINY["transformer"], "dynamic_pruning_config": {"bucket": 2}}
    )
    net = build_network(cfg).eval()  # fresh gates: every channel and head open, z = 1
    enc = net.layers[0]
    dense = compile_plan(net, GateSettings("dense"), calibrate=False)
    assert next(iter(dense.attentions.values())).qkv_w.data_ptr() == enc.qkv.weight.data_ptr()
    assert next(iter(dense.attentions.values())).proj_w.data_ptr() == enc.proj.weight.data_ptr()
    assert dense.layers[0].w_in[0].data_ptr() == enc.fc1.weight.data_ptr()
    assert dense.layers[0].w_out_t.data_ptr() == enc.fc2.weight.data_ptr()
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    dynamic = compile_plan(net, settings, calibrate=False)
    mlp = dynamic.layers[0]
    assert mlp.sides is not None
    assert mlp.w_in[0].data_ptr() == mlp.sides[0].data_ptr()
    assert mlp.w_out_t.data_ptr() == mlp.sides[-1].data_ptr()
    # Every dynamic plan of the layer reads the same rows: held once, whatever the keep ratio.
    other = compile_plan(net, GateSettings("dynamic", keep_ratio=0.25, bucket=2), calibrate=False)
    assert other.layers[0].sides is not None
    assert [w.data_ptr() for w in other.layers[0].sides] == [w.data_ptr() for w in mlp.sides]
    assert next(iter(dynamic.attentions.values())).qkv_w.data_ptr() == enc.qkv.weight.data_ptr()
    assert_same(net, dense, GateSettings("dense"), 3)
    assert_same(net, dynamic, settings, 3, exact="dense")  # calibrate=False: the dense path


def test_static_and_dynamic_plans_share_one_copy_of_the_ffn_rows() -> None:
    """Static plans read a leading slice of the rows every dynamic plan gathers from (channels
    in static-score order, ties by index): no copy per keep ratio, and still the reference."""
    net = tiny("transformer")  # tied scores: closed, partly open and open channel groups
    static = [
        GateSettings("static", bucket=2),
        GateSettings("static", keep_ratio=0.5, bucket=2),
        GateSettings("static", keep_ratio=0.25, bucket=2),
        GateSettings("static", threshold=0.99, bucket=2),
    ]
    dynamic = compile_plan(net, GateSettings("dynamic", keep_ratio=0.5, bucket=2),
                           calibrate=False)
    sides = dynamic.layers[0].sides
    assert sides is not None
    widths = []
    for settings in static:
        plan = compile_plan(net, settings, calibrate=False)
        ex = plan.layers[0]
        assert ex.sides is not None and ex.sides[0].data_ptr() == sides[0].data_ptr()
        assert ex.w_in[0].data_ptr() == sides[0].data_ptr()  # rows [0, kept) of the shared rows
        assert ex.w_out_t.data_ptr() == sides[-1].data_ptr()
        assert ex.w_in[0].shape[0] == ex.width < ex.layer.n
        widths.append(ex.width)
        for size in (1, 3):
            assert_same(net, plan, settings, size)
    assert len(set(widths)) > 2  # the keep sets differ, the rows do not
    layer = dynamic.layers[0].layer
    order = layer.gate.static_gate.scores().sort(descending=True, stable=True).indices
    for settings in static:  # each static keep set is a prefix of that order
        hard = static_keep_mask(layer, settings) > 0
        assert bool(hard[order[: int(hard.sum())]].all()), settings


def test_plan_refuses_other_settings() -> None:
    net = tiny("conv")
    plan = compile_plan(net, GateSettings("static", bucket=2), calibrate=False)
    x, lengths = batch(1)
    with pytest.raises(ValueError, match="compiled for"):
        plan(x, lengths, GateSettings("dense"))


def test_importing_the_plans_bounds_onednns_kernel_cache() -> None:
    """oneDNN caches a kernel with its scratch memory per input shape (1,024 by default: about
    1 GB over an audio front end's 150 lengths); a user's own setting wins."""
    code = "import os, models.sparse; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                  check=True, timeout=120)
    assert run(env=env).stdout.strip() == str(ONEDNN_CACHE_CAPACITY)
    assert run(env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}).stdout.strip() == "7"


@pytest.mark.parametrize("arch", ["conv", "transformer"])
def test_plan_runs_without_onednn_and_restores_the_flag(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN caches a compiled kernel per input shape: a serving plan must not use it."""
    net = tiny(arch)
    plan = compile_plan(net, GateSettings("dynamic", keep_ratio=0.5, bucket=2), calibrate=False)
    seen: list[bool] = []
    fused = torch._addmm_activation  # the CPU plan's matmul + GELU and the predictor's + ReLU

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(bool(torch.backends.mkldnn.enabled))
        return fused(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "_addmm_activation", spy)
    x, lengths = batch(3)
    assert torch.backends.mkldnn.enabled
    plan(x, lengths)
    assert seen and not any(seen)
    assert torch.backends.mkldnn.enabled  # restored, also when the input is refused:
    with pytest.raises(InvalidInputError):
        plan(x[:, :, :0], lengths)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_fused_matmul_gelu_is_the_exact_gelu(device: str) -> None:
    """The model's GELU is the erf one; a fused kernel with the tanh approximation (CUDA's)
    differs by ~5e-4 on these values, within the plans' end-to-end tolerance on tiny nets."""
    gen = torch.Generator().manual_seed(0)
    packed = (torch.randn(64, 48, generator=gen) * 2).to(device)  # rows [W1 (32) | other]
    u = (torch.randn(20, 32, generator=gen) * 2).to(device)
    bias = torch.randn(64, generator=gen).to(device)
    w1t = packed[:, :32].t()  # (32, 64): a strided, transposed view, as the plans pass it
    out = torch.empty(20, 64, device=device)
    with torch.inference_mode():
        got = addmm_act(bias, u, w1t, out, "gelu")
        want = F.gelu(torch.addmm(bias, u, w1t))
        tanh = F.gelu(torch.addmm(bias, u, w1t), approximate="tanh")
    assert got.data_ptr() == out.data_ptr()
    assert (got - want).abs().max() < 1e-5
    assert (tanh - want).abs().max() > 1e-4  # the check above can tell the two apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plan_on_cuda() -> None:
    net = tiny("transformer").cuda()
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    plan = compile_plan(net, settings, batch_sizes=(3,), calib_length=23, reps=1)
    x, lengths = batch(3)
    with torch.inference_mode():
        ref = net(x.cuda(), lengths.cuda(), settings)
        out = plan(x.cuda(), lengths)
    assert (out.logits - ref.logits).abs().max() < 1e-4
    assert torch.equal(out.macs, ref.macs)


@pytest.mark.parametrize("arch", ["conv", "transformer"])
@pytest.mark.parametrize("keep_ratio", [None, 0.5])
def test_export_round_trip(arch: str, keep_ratio: float | None, tmp_path: Path) -> None:
    from models import save_checkpoint

    net = tiny(arch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_checkpoint(net, src)
    report = export_checkpoint(src, dst, keep_ratio=keep_ratio)
    exported = load_checkpoint(dst)
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in exported.parameters()) == report.params_after
    assert report.bytes_after < report.bytes_before
    assert report.static_macs_after == report.static_macs_before
    assert report.dense_macs_after < report.dense_macs_before
    static = GateSettings("static", keep_ratio=keep_ratio, bucket=2)
    settings = [(static, GateSettings("static", bucket=2))]
    if keep_ratio is None:  # same open counts: the dynamic policy is unchanged too
        dyn = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
        settings.append((dyn, dyn))
    for size in (1, 3):
        x, lengths = batch(size)
        for before, after in settings:
            with torch.inference_mode():
                ref = net(x, lengths, before)
                out = exported(x, lengths, after)
            assert (out.logits - ref.logits).abs().max() < 1e-4
            if after.mode == "static":
                assert torch.equal(out.macs, ref.macs)
            else:  # the predictor's last layer shrank with the channels it gates
                assert bool((out.macs < ref.macs).all())
            plan = compile_plan(exported, after, calibrate=False)
            assert_same(exported, plan, after, size)


def test_prune_static_keeps_uneven_layers_loadable() -> None:
    net = tiny("conv")
    with torch.no_grad():
        gate = next(net.static_gates())
        gate.log_alpha[:12] = -10.0  # type: ignore[index]  # layer 0 keeps far fewer channels
    pruned, kept = prune_static(net)
    assert kept["blocks.0"] < kept["blocks.1"]
    assert pruned.gated_widths() == kept  # each layer keeps its own width
    x, lengths = batch(3)
    settings = GateSettings("static", bucket=2)
    with torch.inference_mode():
        ref = net(x, lengths, settings)
        out = pruned(x, lengths, settings)
    assert (out.logits - ref.logits).abs().max() < 1e-4
    assert torch.equal(out.kept["blocks.0"], ref.kept["blocks.0"])


def test_threshold_padding_never_overwrites_an_open_channel() -> None:
    # bucket ≥ open channels pads every request up to all of them; padding picks may be closed
    # channels, which the dense path maps onto the column of the first open channel.
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "model": {"channels": 8, "hidden": 16, "num_blocks": 1},
            "dynamic_pruning_config": {"bucket": 16},
        }
    )
    net = build_network(cfg).eval()
    gate = net.blocks[0].gate
    assert gate.predictor is not None
    with torch.no_grad():
        gate.static_gate.log_alpha[[3, 7, 11]] = -10.0
        for p in gate.predictor.parameters():
            p.normal_(0, 0.3)
        gate.predictor.fc2.bias[0] = 5.0  # channel 0: open and kept, its gate must survive
    settings = GateSettings("dynamic", threshold=0.75, bucket=16)
    plan = compile_plan(net, settings, calibrate=False, strategy=Strategy("dense"))
    gen = torch.Generator().manual_seed(1)
    x, lengths = torch.randn(8, 20, 1, generator=gen) * 3, torch.full((8,), 20)
    with torch.inference_mode():
        assert (plan(x, lengths).logits - net(x, lengths, settings).logits).abs().max() < 1e-5
