"""attach_gates on networks the project never saw: plans equal the masked reference.

Random plain ``nn.Module`` networks (depth, widths, activations incl. GLU, dropout, residuals,
time downsampling, with and without lengths in their forward) are gated with attach_gates and
compiled in every gate mode; each plan's logits equal the masked reference (dense projections
times the hard mask, no executor code) within 1e-4, each request's output equals its solo
output, kept counts are exact and MACs are what ran.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    ArchitectureError,
    GatedNetwork,
    GateSettings,
    ModelConfig,
    attach_gates,
    compile_plan,
    load_checkpoint,
    save_checkpoint,
)
from models.export import export_checkpoint
from models.sparse import Strategy

ACTS: list[Callable[[], nn.Module]] = [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh]


class MLP(nn.Module):
    """fc1 → act → [dropout] → fc2, found by tracing its forward."""

    def __init__(self, d: int, h: int, act: nn.Module, p: float, residual: bool) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = (
            nn.Linear(d, h),
            act,
            nn.Dropout(p),
            nn.Linear(h, d),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(self.act(self.fc1(x))))
        return x + y if self.residual else y


class GLU(nn.Module):
    """down(silu(gate(x)) · up(x)): found by the forward's data flow."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class ConvPair(nn.Module):
    """conv k → GELU → conv 1×1 over (B, C, T): named explicitly in ffns."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(d, h, 3, padding=1), nn.Conv1d(h, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        return x + self.conv2(F.gelu(self.conv1(x.transpose(1, 2)))).transpose(1, 2)


class RandomNet(nn.Module):
    """Embed → blocks (MLP, Sequential MLP, GLU, conv pair, downsampling) → pool → head."""

    def __init__(self, rng: random.Random, with_lengths: bool) -> None:
        super().__init__()
        d = rng.choice([8, 12, 16])
        self.embed = nn.Linear(1, d)
        blocks: list[nn.Module] = []
        self.kinds: list[str] = []
        self.ffns: list[tuple[str, ...]] = []
        for i in range(rng.randint(2, 4)):
            kind = rng.choice(["mlp", "seq", "glu", "conv", "down"])
            h = rng.choice([16, 24, 32])
            act = rng.choice(ACTS)()
            if kind == "mlp":
                blocks.append(MLP(d, h, act, rng.choice([0.0, 0.1]), rng.random() < 0.7))
            elif kind == "seq":
                layers: list[nn.Module] = [nn.Linear(d, h), act, nn.Dropout(0.1), nn.Linear(h, d)]
                blocks.append(nn.Sequential(*layers))
            elif kind == "glu":
                blocks.append(GLU(d, h))
            elif kind == "conv":
                blocks.append(ConvPair(d, h))
                self.ffns.append((f"blocks.{i}.conv1", f"blocks.{i}.conv2"))
            else:
                blocks.append(
                    nn.Conv1d(d, d, 3, stride=2, padding=1)
                    if rng.random() < 0.5
                    else nn.AvgPool1d(2, ceil_mode=False)
                )
            self.kinds.append(kind)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(d, 10)
        self.with_lengths = with_lengths

    def run(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(x)  # (B, T, D)
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            if lengths is not None:  # keep padding out of every block's input
                steps = torch.arange(h.shape[1], device=h.device)
                h = h * (steps[None] < lengths[:, None]).unsqueeze(-1)
            if kind == "down":
                h = block(h.transpose(1, 2)).transpose(1, 2)
                if lengths is not None:
                    k, s, p = 3, 2, 1
                    if isinstance(block, nn.AvgPool1d):
                        k, s, p = 2, 2, 0
                    lengths = torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1
            elif kind == "seq":
                h = h + block(h)
            else:
                h = block(h)
        if lengths is None:
            return self.head(h.mean(1))
        mask = (torch.arange(h.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


class WithLengths(RandomNet):
    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.run(x, lengths)


class WithoutLengths(RandomNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, None)


def config(**dp: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "model": {"name": "tests:random", "max_length": 64},
            "dynamic_pruning_config": {"bucket": 2, **dp},
        }
    )


def random_network(seed: int, with_lengths: bool, **dp: object) -> GatedNetwork:
    from models.layers import _find_pairs

    rng = random.Random(seed)
    torch.manual_seed(seed)
    cls = WithLengths if with_lengths else WithoutLengths
    module = cls(rng, with_lengths)
    while all(k == "down" for k in module.kinds):  # at least one FFN
        module = cls(rng, with_lengths)
    ffns: list[tuple[str, ...]] | None = None
    if module.ffns:  # conv pairs are named, so name the pattern-found ones too
        ffns = [
            (f"{path}.0", f"{path}.3")
            if kind == "sequential"
            else tuple(f"{path}.{a}" for a in attrs)
            for path, _, attrs, kind in _find_pairs(module)
        ]
        ffns += module.ffns
    net = attach_gates(module, config(**dp), ffns=ffns).eval()
    for gate in net.static_gates():  # close some channels, leave some partly open
        data = next(gate.parameters()).data
        data[::3] = -10.0
        data[1::4] = -0.8
    with torch.no_grad():
        for _, g in net.dynamic_gates():
            if g.predictor is not None:
                for p in g.predictor.parameters():
                    p.normal_(0, 0.5)
    return net


SETTINGS = [
    GateSettings("dense"),
    GateSettings("static", bucket=2),
    GateSettings("static", keep_ratio=0.5, bucket=2),
    GateSettings("dynamic", keep_ratio=0.5, bucket=2),
    GateSettings("dynamic", keep_ratio=0.25, bucket=2, dynamic_weight=1.0),
    GateSettings("dynamic", threshold=0.3, bucket=2),
]
LENGTHS = {1: [23], 3: [9, 23, 14], 8: [3, 23, 9, 23, 6, 7, 23, 12]}


def batch(size: int, with_lengths: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(size)
    lengths = torch.tensor(LENGTHS[size]) if with_lengths else torch.full((size,), 23)
    x = torch.full((size, 23, 1), 5.0)  # non-zero padding must not leak
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = torch.randn(n, 1, generator=gen)
    return x, lengths


@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "no-lengths"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("global_pool", [True, False], ids=["global", "per-step"])
def test_random_networks_plans_equal_the_masked_reference(
    seed: int, with_lengths: bool, global_pool: bool
) -> None:
    net = random_network(seed, with_lengths, predictor_config={"use_global_pool": global_pool})
    assert net.takes_lengths is with_lengths and net.padding_invariant is with_lengths
    assert net.gated()
    for settings in SETTINGS:
        strategies = [Strategy("dense"), Strategy("gather", 1), Strategy("gather", 3)]
        for strategy in strategies:
            plan = compile_plan(net, settings, calibrate=False, strategy=strategy)
            for size in (1, 3, 8):
                x, lengths = batch(size, with_lengths)
                with torch.inference_mode():
                    ref = net(x, lengths, settings)
                    out = plan(x, lengths)
                assert (out.logits - ref.logits).abs().max() < 1e-4, (settings, strategy)
                assert list(out.kept) == list(ref.kept)
                for name in ref.kept:
                    assert torch.equal(out.kept[name].float(), ref.kept[name].float()), name
                assert torch.equal(out.dense_macs, ref.dense_macs)
                gathered = strategy.kind == "gather" and settings.keep_ratio is not None
                if settings.mode != "dynamic" or (gathered and global_pool):
                    assert torch.equal(out.macs, ref.macs), (settings, strategy)
                else:  # the dense fallback and bucket padding run more than they keep
                    assert bool((out.macs >= ref.macs).all())
                if size == 3:  # each request alone gives what it gave in the batch
                    for i in range(size):
                        n = int(lengths[i]) if with_lengths else 23
                        with torch.inference_mode():
                            solo = plan(x[i : i + 1, :n], lengths[i : i + 1].clamp(max=n))
                        assert (solo.logits - out.logits[i]).abs().max() < 1e-4


def test_padding_dependent_networks_refuse_mixed_lengths() -> None:
    net = random_network(0, with_lengths=False)
    x, lengths = batch(3, with_lengths=True)
    plan = compile_plan(net, GateSettings("dense"), calibrate=False)
    with pytest.raises(Exception, match="depend on padding"):
        plan(x, lengths)


class Stock(nn.Module):
    def __init__(self, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(1, 32)
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_stock_transformer_encoder_is_gated_not_fast_pathed(
    batch_first: bool, norm_first: bool
) -> None:
    """nn.TransformerEncoderLayer's inference fast path calls neither linear; the gated layer
    takes its slow path, equal to the stock eval forward in dense mode."""
    import copy

    torch.manual_seed(0)
    stock = Stock(batch_first, norm_first).eval()
    original = copy.deepcopy(stock)
    net = attach_gates(stock, config()).eval()
    assert [layer.name for layer in net.gated()] == ["enc.layers.0", "enc.layers.1"]
    x = torch.randn(3, 20, 1)
    lengths = torch.full((3,), 20)
    with torch.inference_mode():
        want = original(x)
        got = net(x, lengths, GateSettings("dense")).logits
        assert (got - want).abs().max() < 1e-5
        for settings in SETTINGS:
            ref = net(x, lengths, settings)
            plan = compile_plan(net, settings, calibrate=False, strategy=Strategy("gather", 1))
            assert (plan(x, lengths).logits - ref.logits).abs().max() < 1e-4
            if settings.mode == "dynamic" and settings.keep_ratio == 0.5:
                assert (ref.logits - want).abs().max() > 1e-4  # the gates act


def test_attach_errors_name_the_module() -> None:
    class NoFFN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(1, 4), nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)).mean(1)  # no activation between: not an FFN

    with pytest.raises(ArchitectureError, match=r"found no FFN in NoFFN.*<root> \(a, b\)"):
        attach_gates(NoFFN(), config())
    with pytest.raises(ArchitectureError, match="no module 'a.fc9'"):
        attach_gates(NoFFN(), config(), ffns=[("a.fc9", "b")])
    with pytest.raises(ArchitectureError, match="must be nn.Linear or nn.Conv1d"):
        attach_gates(nn.Sequential(nn.Linear(1, 4), nn.ReLU()), config(), ffns=[("0", "1")])
    with pytest.raises(ArchitectureError, match="reads 3 channels"):
        mismatched = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(3, 2))
        attach_gates(mismatched, config(), ffns=[("0", "2")])


def test_export_of_an_attached_network_rebuilds_from_its_factory(tmp_path: Path) -> None:
    """A pruned user network is rebuilt by its factory, then the recorded widths applied."""
    cfg = ModelConfig.model_validate(
        {
            "model": {
                "name": "examples.recurrent.network:build",
                "max_length": 64,
                "args": {"width": 16, "hidden": 32, "blocks": 2},
            },
            "dynamic_pruning_config": {"bucket": 2},
        }
    )
    from models import build_network

    torch.manual_seed(0)
    net = build_network(cfg).eval()
    assert net.takes_lengths and net.padding_invariant
    with torch.no_grad():
        for i, gate in enumerate(net.static_gates()):
            next(gate.parameters()).data[:: 2 + 2 * i] = -10.0  # each layer: its own width
    save_checkpoint(net, tmp_path / "src")
    report = export_checkpoint(tmp_path / "src", tmp_path / "dst")
    exported = load_checkpoint(tmp_path / "dst")
    assert exported.gated_widths() == report.kept and len(set(report.kept.values())) == 2
    assert report.static_macs_after == report.static_macs_before
    x, lengths = batch(3, with_lengths=True)
    for settings in (
        GateSettings("static", bucket=2),
        GateSettings("dynamic", keep_ratio=0.5, bucket=2),
    ):
        with torch.inference_mode():
            ref = net(x, lengths, settings)
            out = exported(x, lengths, settings)
            plan = compile_plan(exported, settings, calibrate=False, strategy=Strategy("gather", 1))
            fast = plan(x, lengths)
        assert (out.logits - ref.logits).abs().max() < 1e-4
        assert (fast.logits - ref.logits).abs().max() < 1e-4


def test_flops_of_a_network_never_seen_are_counted_by_torch() -> None:
    """The stock encoder's attention (not gated) is counted by torch's FLOP counter: dense MACs
    equal a hand count of every matmul, for any length."""
    torch.manual_seed(0)
    net = attach_gates(Stock(), config()).eval()
    d, ffn, layers = 32, 64, 2
    for t in (1, 7, 40):
        x = torch.randn(2, t, 1)
        with torch.inference_mode():
            out = net(x, torch.full((2,), t), GateSettings("dense"))
        per_layer = t * (3 * d * d + d * d + 2 * d * ffn) + 2 * t * t * d
        hand = t * d + layers * per_layer + d * 10
        assert out.dense_macs.tolist() == [hand, hand]


def test_ffns_are_found_by_data_flow() -> None:
    """Functional activations, GLU products and two FFNs in one module are found by tracing the
    forward's data flow; a linear used twice is ambiguous and named."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(1, 8)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)  # F.gelu between
            self.gate, self.up, self.down = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            h = h + self.fc2(F.dropout(F.gelu(self.fc1(h)), 0.1, self.training))
            h = h + self.down(self.up(h) * F.silu(self.gate(h)))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    net = attach_gates(Mixed(), config()).eval()
    assert [(layer.name, layer.n) for layer in net.gated()] == [("fc1", 16), ("gate", 12)]
    x, lengths = batch(3, with_lengths=False)
    for settings in SETTINGS:
        with torch.inference_mode():
            ref = net(x, lengths, settings)
            plan = compile_plan(net, settings, calibrate=False, strategy=Strategy("gather", 1))
            assert (plan(x, lengths).logits - ref.logits).abs().max() < 1e-4

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x))) + self.fc2(self.act(self.fc1(x)))

    with pytest.raises(ArchitectureError, match="called more than once.*ambiguous"):
        attach_gates(Twice(), config())


def test_macs_of_downsampling_networks_are_exact_at_every_length() -> None:
    """Strided convs floor the lengths: the rest is one quadratic per residue class of the
    length modulo the product of the strides, checked against torch's count at each length."""
    from models.flops import _rest_at

    net = random_network(3, with_lengths=True)
    module = net.module  # type: ignore[attr-defined]
    downs = [b for k, b in zip(module.kinds, module.blocks, strict=True) if k == "down"]
    assert downs and net.length_period == 2 ** len(downs)
    model = net.mac_model
    assert model.coef is not None and model.coef.shape[0] == net.length_period
    for length in range(4, 65):  # shorter inputs pool down to nothing: the network cannot run
        assert float(model.rest(torch.tensor([length]))[0]) == _rest_at(net, length), length


def test_checkpoints_record_the_mac_count_so_loading_runs_no_counter(tmp_path: Path) -> None:
    """torch's FLOP counter imports its compiler stack (~70 MB resident) on first use: a server
    loading a saved checkpoint must not need it."""
    import subprocess
    import sys

    from models.flops import MacModel

    net = random_network(0, with_lengths=True)
    cfg = ModelConfig.model_validate(
        {"model": {"name": "tests.utils.factories:tiny_user", "max_length": 64}}
    )
    from models import build_network

    user = build_network(cfg).eval()
    save_checkpoint(user, tmp_path / "ck")
    code = (
        "import sys; from models import load_checkpoint, compile_plan, GateSettings; "
        f"n = load_checkpoint({str(tmp_path / 'ck')!r}); "
        "compile_plan(n, GateSettings('dynamic', keep_ratio=0.5)); "
        "print('_mac_model' in n.__dict__, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    assert out == ["True", "False"]
    # A record made for another structure is not trusted.
    record = user.mac_model.to_dict(user)
    assert MacModel.from_dict(record, user) is not None
    assert MacModel.from_dict(record, net) is None


class Reuse(nn.Module):
    """An MLP applied twice in a row and once more on another input, outputs held together;
    a second FFN whose hidden activation is also read elsewhere (not gateable); an unused one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.fc1, self.act, self.fc2 = nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)
        self.spare = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = self.mlp(self.mlp(h))
        b = self.mlp(2 * h)
        hidden = self.act(self.fc1(h))
        c = self.fc2(hidden) + hidden.mean(-1, keepdim=True)
        return self.head((a + b + c).mean(1))


def test_layers_called_twice_outputs_held_and_reused_activations() -> None:
    torch.manual_seed(0)
    net = attach_gates(Reuse(), config()).eval()
    # fc1's activation is also read outside fc2: gating it would change that read, so it is not
    # an FFN; the other two are.
    assert [layer.name for layer in net.gated()] == ["mlp", "spare"]
    x, lengths = batch(3, with_lengths=False)
    for settings in [*SETTINGS, GateSettings("dynamic", threshold=1.0, bucket=2)]:
        for strategy in (Strategy("dense"), Strategy("gather", 1), Strategy("gather", 3)):
            plan = compile_plan(net, settings, calibrate=False, strategy=strategy)
            with torch.inference_mode():
                ref = net(x, lengths, settings)
                out = plan(x, lengths)
            assert (out.logits - ref.logits).abs().max() < 1e-4, (settings, strategy)
            assert torch.equal(out.kept["spare"], torch.zeros(3))  # never ran: kept nothing
            if settings.mode == "dense":  # three calls of mlp counted, none of spare
                assert torch.equal(out.macs, ref.dense_macs)
            assert torch.equal(out.dense_macs, ref.dense_macs)
            gathered = strategy.kind == "gather" and settings.keep_ratio is not None
            if settings.mode != "dynamic" or gathered:
                assert torch.equal(out.macs, ref.macs)


class PostNorm(GatedNetwork):
    """A built-in-style network whose gated FFN takes its own input as the residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from models.gates import DynamicStructuredGate
        from models.layers import GatedFFN, GatedLinear

        self.config = cfg
        self.embed = nn.Linear(1, 8)
        self.fc1, self.fc2 = GatedLinear(8, 16), GatedLinear(16, 8)
        self.gate = DynamicStructuredGate(16, 8, cfg)
        self.ffn = GatedFFN("ffn", [self.fc1], self.fc2, self.gate, act=F.gelu)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def compute(
        self, x: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(self.ffn(h, residual=h))  # the input is the residual: no in-place add
        mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
        return self.head((h * mask).sum(1) / mask.sum(1))


def test_a_residual_that_is_the_input_is_not_accumulated_in_place() -> None:
    torch.manual_seed(0)
    net = PostNorm(config()).eval()
    x, lengths = batch(3, with_lengths=True)
    for settings in SETTINGS:
        plan = compile_plan(net, settings, calibrate=False, strategy=Strategy("gather", 1))
        with torch.inference_mode():
            assert (plan(x, lengths).logits - net(x, lengths, settings).logits).abs().max() < 1e-4


def test_unsupported_conv_geometry_is_refused() -> None:
    class StridedOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv1d(1, 8, 3, padding=1), nn.Conv1d(8, 4, 1, stride=2)

    with pytest.raises(ArchitectureError, match="must be 1×1, stride 1, no padding"):
        attach_gates(StridedOut(), config(), ffns=[("conv1", "conv2")])


def test_ceil_mode_pooling_lengths_are_exact() -> None:
    """The gated layer after a ceil_mode pool sees each request's own length: a request
    batched with a longer one counts the MACs of its solo run. (Its logits may differ: a
    partial last window averages padding, which this module lets through.)"""
    from models.layers import _out_length

    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 3, 1)]:
        pool = nn.AvgPool1d(k, s, p, ceil_mode=True)
        for n in range(max(1, k - 2 * p), 20):
            want = pool(torch.zeros(1, 1, n)).shape[-1]
            assert int(_out_length(torch.tensor([n]), k, s, p, 1, ceil=True)[0]) == want

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(1, 8)
            self.pool = nn.AvgPool1d(2, ceil_mode=True)
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            valid = (torch.arange(x.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
            h = self.pool((self.embed(x) * valid).transpose(1, 2)).transpose(1, 2)
            short = torch.div(lengths + 1, 2, rounding_mode="floor")  # ceil(L / 2)
            h = h + self.fc2(self.act(self.fc1(h)))
            m = (torch.arange(h.shape[1])[None] < short[:, None]).unsqueeze(-1)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    net = attach_gates(Pooled(), config()).eval()
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    x = torch.randn(2, 10, 1)
    lengths = torch.tensor([7, 10])
    plan = compile_plan(net, settings, calibrate=False, strategy=Strategy("gather", 1))
    with torch.inference_mode():
        both = plan(x, lengths)
        solo = plan(x[:1, :7], lengths[:1])
    assert both.macs[0] == solo.macs[0] and both.macs[1] != solo.macs[0]


def test_the_contract_is_declared_and_refused_when_not_served(tmp_path: Path) -> None:
    from models import ModelContract, TensorSpec
    from service.engine import Engine, EngineError

    net = attach_gates(Reuse(), config())
    assert net.contract() == ModelContract.default(1, 10)
    bert_like = ModelContract(
        inputs=(
            TensorSpec("input_ids", "INT64", (-1, -1), length_dim=1),
            TensorSpec("attention_mask", "INT64", (-1, -1), optional=True, length_dim=1),
        ),
        outputs=(TensorSpec("logits", "FP32", (-1, 2)),),
    )
    assert bert_like.unservable() is None
    two_outputs = ModelContract(
        inputs=bert_like.inputs,
        outputs=(TensorSpec("logits", "FP32", (-1, 2)), TensorSpec("hidden", "FP32", (-1, -1, 8))),
    )
    assert "serves one FP32 output" in str(two_outputs.unservable())
    fp16 = ModelContract(inputs=(TensorSpec("x", "FP16", (-1, -1)),),  # type: ignore[arg-type]
                         outputs=bert_like.outputs)
    assert "served datatypes" in str(fp16.unservable())
    unpadded = ModelContract(inputs=(TensorSpec("x", "FP32", (-1, 3, -1)),), outputs=fp16.outputs)
    assert "T its length" in str(unpadded.unservable())
    cfg = ModelConfig.model_validate(
        {"model": {"name": "tests.utils.factories:tiny_user", "max_length": 64}}
    )
    from models import build_network

    save_checkpoint(build_network(cfg), tmp_path / "repo" / "bert")
    import tests.utils.factories as factories

    original = factories.TinyUserNet.__init__

    def declaring(self: nn.Module, *a: object, **k: object) -> None:
        original(self, *a, **k)  # type: ignore[arg-type]
        self.gated_contract = two_outputs

    factories.TinyUserNet.__init__ = declaring  # type: ignore[method-assign]
    try:
        with pytest.raises(EngineError, match="model 'bert': declares outputs"):
            Engine.load(tmp_path / "repo", "cpu")
    finally:
        factories.TinyUserNet.__init__ = original  # type: ignore[method-assign]


def test_a_fixed_shape_input_is_served_alone_and_fully_fixed() -> None:
    """An input without a length (an image) is served when it is the contract's one input and
    every dimension after the batch is fixed; anything else is refused, naming the problem."""
    from models import ModelContract, TensorSpec

    image = TensorSpec("pixel_values", "FP32", (-1, 3, 32, 32))
    out = (TensorSpec("logits", "FP32", (-1, 10)),)
    served = ModelContract(inputs=(image,), outputs=out)
    assert served.unservable() is None and served.fixed_shape
    assert not ModelContract.default(1, 10).fixed_shape
    ids = TensorSpec("input_ids", "INT64", (-1, -1), length_dim=1)
    mask = TensorSpec("attention_mask", "INT64", (-1, -1), optional=True, length_dim=1,
                      role="mask")
    refused = {
        "beside a length input": ((image, ids), "has a fixed shape [-1, 3, 32, 32] (no length) "
                                  "beside inputs ['input_ids']; this server serves a fixed-shape "
                                  "input only as the model's one input"),
        "after a length input": ((ids, image), "beside inputs ['input_ids']"),
        "with a mask": ((image, mask), "beside inputs ['attention_mask']"),
        "two images": ((image, TensorSpec("depth", "FP32", (-1, 1, 32, 32))),
                       "beside inputs ['depth']"),
        "a dynamic dimension": ((TensorSpec("x", "FP32", (-1, 3, -1, 32)),),
                                "input 'x' has a dynamic dimension but no length_dim: "
                                "[-1, 3, -1, 32]"),
        "no dimension after the batch": ((TensorSpec("x", "FP32", (-1,)),),
                                         "input 'x' has no dimension after the batch: [-1]"),
        "a fixed batch": ((TensorSpec("x", "FP32", (4, 3, 32, 32)),),
                          "must have the batch (-1) as its first dimension, got [4, 3, 32, 32]"),
        "a mask without a length": ((ids, TensorSpec("m", "INT64", (-1, 8), role="mask")),
                                    "mask input 'm' must be INT64 or INT32 [batch, T] with T "
                                    "its length"),
        "optional": ((TensorSpec("x", "FP32", (-1, 3, 8, 8), optional=True),),
                     "declares no required data input"),
    }
    for case, (inputs, message) in refused.items():
        why = ModelContract(inputs=inputs, outputs=out).unservable()
        assert why is not None and message in why, (case, why)
    # Integers of a fixed shape are served too, with their value range.
    codes = TensorSpec("codes", "INT64", (-1, 16), value_range=(0, 255))
    assert ModelContract(inputs=(codes,), outputs=out).unservable() is None


def test_per_step_gates_after_a_strided_gated_conv_are_a_clear_error() -> None:
    """Per-step gates are computed at the conv's input resolution: with a strided conv they do
    not cover the hidden steps, and both the reference and the plans say so (no 500)."""
    from models import InvalidInputError

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv1d(1, 8, 3, stride=2, padding=1), nn.Conv1d(8, 4, 1)
            self.head = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv2(F.gelu(self.conv1(x.transpose(1, 2))))
            return self.head(h.mean(-1))

    net = attach_gates(
        Strided(), config(predictor_config={"use_global_pool": False}), ffns=[("conv1", "conv2")]
    ).eval()
    x, lengths = batch(3, with_lengths=False)
    settings = GateSettings("dynamic", keep_ratio=0.5, bucket=2)
    with pytest.raises(InvalidInputError, match="per-step gates over 23 steps, hidden has 12"):
        net(x, lengths, settings)
    plan = compile_plan(net, settings, calibrate=False)
    with pytest.raises(InvalidInputError, match="per-step gates over 23 steps"):
        plan(x, lengths)


def test_a_named_encoder_layer_ffn_takes_the_gated_slow_path() -> None:
    torch.manual_seed(0)
    net = attach_gates(
        Stock(), config(), ffns=[("enc.layers.0.linear1", "enc.layers.0.linear2")]
    ).eval()
    assert [layer.name for layer in net.gated()] == ["enc.layers.0"]
    x, lengths = batch(3, with_lengths=False)
    settings = GateSettings("dynamic", keep_ratio=0.25, bucket=2)
    with torch.inference_mode():
        gated = net(x, lengths, settings)
        dense = net(x, lengths, GateSettings("dense"))
    assert (gated.logits - dense.logits).abs().max() > 1e-4  # the gates act, no fast path
    assert float(gated.kept["enc.layers.0"][0]) == 16.0
