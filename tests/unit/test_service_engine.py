"""Engine: repository loading, gate resolution, forward equal to the model's, padding invariance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_checkpoint
from service.engine import Engine, EngineError, GateConfig
from service.errors import InvalidInput
from tests.utils.service import TINY_MAX_LENGTH, reference_logits


@pytest.fixture(scope="module")
def engine(tiny_repository: Path) -> Engine:
    return Engine.load(tiny_repository, "cpu", torch_threads=1)


def test_scan_and_load(engine: Engine, tiny_repository: Path, tmp_path: Path) -> None:
    assert Engine.scan(tiny_repository) == ["tiny", "tiny2"]
    info = engine.models["tiny"]
    assert (info.in_channels, info.num_classes, info.max_length) == (1, 10, TINY_MAX_LENGTH)
    assert info.layers == ("blocks.0", "blocks.1")
    assert info.config_gate == GateConfig("dynamic", 0.5)
    with pytest.raises(EngineError, match="no model folders"):
        Engine.scan(tmp_path)
    with pytest.raises(EngineError, match="not a directory"):
        Engine.scan(tmp_path / "absent")


def test_broken_checkpoint_names_the_model(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("model: {channels: 4}\n")
    with pytest.raises(EngineError, match="model 'bad'.*model.safetensors"):
        Engine.load(tmp_path, "cpu")


def test_resolve_gate_is_canonical_and_validated(engine: Engine) -> None:
    assert engine.resolve_gate("tiny", "dense", 0.3, 0.2, 0.9) == GateConfig("dense")
    assert engine.resolve_gate("tiny", "dynamic") == GateConfig("dynamic", 0.5)
    assert engine.resolve_gate("tiny", "dynamic", 0.25, 0.9) == GateConfig("dynamic", 0.25)
    assert engine.resolve_gate("tiny", "static", None, 0.5, 0.7) == GateConfig("static", None, 0.5)
    with pytest.raises(InvalidInput, match="allowed: dense, static, dynamic"):
        engine.resolve_gate("tiny", "sparse")
    with pytest.raises(InvalidInput, match="keep_ratio"):
        engine.resolve_gate("tiny", "dynamic", 0.0)


@pytest.mark.parametrize("mode", ["dense", "static", "dynamic"])
def test_infer_equals_model_forward(engine: Engine, tiny_repository: Path, mode: str) -> None:
    net = load_checkpoint(tiny_repository / "tiny")
    x = np.random.default_rng(0).standard_normal((3, 20, 1)).astype(np.float32)
    [result] = engine.infer("tiny", engine.resolve_gate("tiny", mode), [x])
    np.testing.assert_allclose(result.logits, reference_logits(net, x, mode), atol=1e-5)
    # flops_ratio counts what ran: a plan whose calibration picked the dense fallback runs every
    # open channel plus the predictor, a little over 1 on this tiny model.
    assert 0.0 < result.flops_ratio < 1.1 and 0.0 < result.active_channel_ratio <= 1.0
    assert len(result.layer_active_ratios) == 2
    if mode == "dense":
        assert result.active_channel_ratio == result.flops_ratio == 1.0
    if mode == "dynamic":
        assert result.active_channel_ratio < 1.0


def test_mixed_lengths_in_one_batch_equal_solo(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    gate = engine.resolve_gate("tiny", "dynamic", 0.5)
    inputs = [
        rng.standard_normal((rows, length, 1)).astype(np.float32)
        for rows, length in [(1, 40), (2, 7), (1, TINY_MAX_LENGTH), (3, 23)]
    ]
    together = engine.infer("tiny", gate, inputs)
    for x, batched in zip(inputs, together, strict=True):
        [solo] = engine.infer("tiny", gate, [x])
        np.testing.assert_allclose(batched.logits, solo.logits, atol=1e-5)
        assert batched.active_channel_ratio == pytest.approx(solo.active_channel_ratio)


def test_settings_that_run_the_same_plan_share_it(engine: Engine) -> None:
    x = np.random.default_rng(0).standard_normal((1, 9, 1)).astype(np.float32)
    plans = engine._models["tiny"].plans
    # Keep ratios that bucket to the same k execute the same plan (12 open channels, bucket 2:
    # k = 6 for both).
    a = engine.resolve_gate("tiny", "dynamic", keep_ratio=0.5)
    b = engine.resolve_gate("tiny", "dynamic", keep_ratio=0.45)
    c = engine.resolve_gate("tiny", "dynamic", keep_ratio=0.25)
    assert a != b and a.key == b.key != c.key
    engine.infer("tiny", a, [x])
    before = len(plans)
    [ra] = engine.infer("tiny", a, [x])
    [rb] = engine.infer("tiny", b, [x])
    assert len(plans) == before and np.array_equal(ra.logits, rb.logits)
    # Static mode ignores the blend weight; dense ignores every knob.
    assert (
        engine.resolve_gate("tiny", "static", 0.5, None, 0.1).key
        == engine.resolve_gate("tiny", "static", 0.5, None, 0.9).key
    )
    assert engine.resolve_gate("tiny", "dense", 0.3).key == ("dense",)


def test_blend_weights_and_thresholds_are_run_time_values_of_one_plan(
    engine: Engine, tiny_repository: Path
) -> None:
    net = load_checkpoint(tiny_repository / "tiny")
    x = np.random.default_rng(3).standard_normal((2, 17, 1)).astype(np.float32)
    plans = engine._models["tiny"].plans
    weights = [engine.resolve_gate("tiny", "dynamic", 0.5, None, w) for w in (0.2, 0.6, 1.0)]
    taus = [engine.resolve_gate("tiny", "dynamic", None, t) for t in (0.3, 0.5, 0.7)]
    assert len({g.key for g in weights}) == 1 and len({g.key for g in taus}) == 1
    # ...and one batch: each request runs with its own values, alone or beside the others.
    assert len({g.batch_key for g in weights}) == 1 and len({g.batch_key for g in taus}) == 1
    for gates in (weights, taus):
        together = engine.infer("tiny", gates, [x, x[:1], x])
        for gate, item, result in zip(gates, [x, x[:1], x], together, strict=True):
            [alone] = engine.infer("tiny", gate, [item])
            knobs = {"keep_ratio": gate.keep_ratio, "threshold": gate.threshold,
                     "dynamic_weight": gate.dynamic_weight}
            want = reference_logits(net, item, "dynamic", **knobs)
            np.testing.assert_allclose(alone.logits, want, atol=1e-5)
            np.testing.assert_allclose(result.logits, want, atol=1e-5)
    assert len({id(plans[g.key]) for g in weights + taus}) == 2
    with pytest.raises(ValueError, match="one batch runs one plan"):
        engine.infer("tiny", [weights[0], taus[0]], [x, x])
    # Keep ratios that bucket to the same counts are one plan, so one batch too.
    near = engine.resolve_gate("tiny", "dynamic", 0.4999, None, 0.6)
    assert near.key == weights[0].key and near.keep_ratio != weights[0].keep_ratio
    mixed = engine.infer("tiny", [weights[0], near], [x, x])
    np.testing.assert_allclose(
        mixed[1].logits, reference_logits(net, x, "dynamic", keep_ratio=0.5, dynamic_weight=0.6),
        atol=1e-5,
    )


def test_static_configurations_of_one_plan_share_a_batch(
    engine: Engine, tiny_repository: Path
) -> None:
    """Static mode with no threshold and with one that keeps every open channel (static
    values of the tiny model are 0 or 1) are one plan; a blend weight does not act there."""
    net = load_checkpoint(tiny_repository / "tiny")
    x = np.random.default_rng(4).standard_normal((1, 17, 1)).astype(np.float32)
    gates = [engine.resolve_gate("tiny", "static"),
             engine.resolve_gate("tiny", "static", None, 0.5),
             engine.resolve_gate("tiny", "static", None, 0.025, 0.3)]
    assert len({g.batch_key for g in gates}) == 1
    want = reference_logits(net, x, "static")
    for result in engine.infer("tiny", gates, [x, x, x]):
        np.testing.assert_allclose(result.logits, want, atol=1e-5)


def test_a_reload_that_splits_a_batch_runs_each_plan(engine: Engine, tiny_repository: Path) -> None:
    """Configurations resolved before a hot reload as one plan may be several after it: the
    batch runs as one batch per plan, each request answered as alone."""
    import dataclasses

    net = load_checkpoint(tiny_repository / "tiny")
    x = np.random.default_rng(5).standard_normal((1, 17, 1)).astype(np.float32)
    keep = engine.resolve_gate("tiny", "dynamic", 0.5, None, 0.2)
    tau = engine.resolve_gate("tiny", "dynamic", None, 0.4)
    stale = [dataclasses.replace(g, key=keep.key, generation=g.generation - 1)
             for g in (keep, tau, keep)]
    assert len({g.batch_key for g in stale}) == 1  # one batch before the "reload"
    got = engine.infer("tiny", stale, [x, x, x[:, :9]])
    knobs = [{"keep_ratio": 0.5, "dynamic_weight": 0.2}, {"threshold": 0.4},
             {"keep_ratio": 0.5, "dynamic_weight": 0.2}]
    for result, item, k in zip(got, [x, x, x[:, :9]], knobs, strict=True):
        np.testing.assert_allclose(result.logits, reference_logits(net, item, "dynamic", **k),
                                   atol=1e-5)


@pytest.fixture
def sealed(tiny_repository: Path) -> Engine:
    engine = Engine.load(tiny_repository, "cpu", torch_threads=1)
    engine.warm_up(max_batch_rows=2, keep_ratios=(0.25, 1.0))
    return engine


def test_after_warm_up_no_request_compiles_a_plan(
    sealed: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.sparse.plan

    loaded = sealed._models["tiny"]
    # The set, the checkpoint's own keep ratio (0.5) included.
    assert loaded.keep_ratios == (0.25, 0.5, 1.0)
    compiled = dict(loaded.plans)
    monkeypatch.setattr(models.sparse.plan, "compile_plan", None)  # any compile would fail
    x = np.ones((1, 9, 1), dtype=np.float32)
    for mode in ("dense", "static", "dynamic"):
        for knobs in ({}, {"keep_ratio": 0.25}, {"keep_ratio": 0.5}, {"keep_ratio": 1.0}):
            sealed.infer("tiny", sealed.resolve_gate("tiny", mode, **knobs), [x])
    for tau in (0.1, 0.9):
        sealed.infer("tiny", sealed.resolve_gate("tiny", "dynamic", threshold=tau), [x])
    with pytest.raises(InvalidInput, match=r"'keep_ratio': got 0\.3; this server serves "
                       r"keep_ratio in \{0\.25, 0\.5, 1\} \(setting keep_ratios"):
        sealed.resolve_gate("tiny", "dynamic", keep_ratio=0.3)
    with pytest.raises(InvalidInput, match="keep_ratio"):
        sealed.resolve_gate("tiny", "static", keep_ratio=0.7)
    # A static threshold selects a fixed set: served where it matches a compiled plan (the tiny
    # model's static gates are 0 or 1, so any threshold keeps every open channel)...
    sealed.resolve_gate("tiny", "static", threshold=0.37)
    # ...refused where its set has no plan (graded gates: 0.37 keeps 7 of 12 open channels).
    graded = [(layer, torch.where(v > 0, torch.linspace(0.05, 1.0, v.numel()), v))
              for layer, v in loaded.network._static_values()]
    monkeypatch.setitem(loaded.network.__dict__, "_statics", graded)
    with pytest.raises(InvalidInput, match="'threshold': got 0.38; in static mode"):
        sealed.resolve_gate("tiny", "static", threshold=0.38)
    assert loaded.plans == compiled


def test_a_reload_of_the_same_architecture_times_nothing(
    sealed: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.sparse.plan

    timed: list[object] = []
    real = models.sparse.plan._calibrate
    monkeypatch.setattr(
        models.sparse.plan, "_calibrate", lambda *a, **k: timed.append(a) or real(*a, **k)
    )
    before = sealed._models["tiny"]
    sealed.load_model("tiny")
    after = sealed._models["tiny"]
    assert after is not before and after.sealed and set(after.plans) == set(before.plans)
    assert timed == []


def test_warm_up_compiles_every_mode_and_sizes_the_shared_buffers(engine: Engine) -> None:
    engine.warm_up(max_batch_rows=3)
    for name in ("tiny", "tiny2"):
        plans = engine._models[name].plans
        modes = {key[0] for key in plans}
        assert modes == {"dense", "static", "dynamic"}
        # Every plan of the engine shares its buffers: memory is that of the largest batch.
        assert all(plan._ws is engine._workspace for plan in plans.values())
    sizes = {role: buf.numel() for role, buf in engine._workspace._bufs.items()}
    assert sizes
    # The largest batch warm-up ran (3 rows at max_length, padded) allocates nothing new.
    x = np.ones((3, TINY_MAX_LENGTH, 1), dtype=np.float32)
    for mode in ("dense", "static", "dynamic"):
        for knobs in ({}, {"keep_ratio": 0.25}, {"keep_ratio": 0.75}, {"keep_ratio": 1.0}):
            gate = engine.resolve_gate("tiny", mode, **knobs)
            engine.infer("tiny", gate, [x[:2], x[2:, :-5]])
            engine.infer("tiny", gate, [x])
    assert {role: buf.numel() for role, buf in engine._workspace._bufs.items()} == sizes
    # A model loaded later is warmed up the same way before it serves.
    engine.load_model("tiny")
    reloaded = engine._models["tiny"]
    assert {key[0] for key in reloaded.plans} == {"dense", "static", "dynamic"}
    assert reloaded.calib_batches == (1, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_missing_cuda_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match=r"GATED_DEVICE.*no CUDA device"):
        Engine.check_device("cuda")
    Engine.check_device("auto")


def test_a_gate_resolved_before_a_reload_is_resolved_again(engine: Engine) -> None:
    """Plan keys belong to one load of a model: a request resolved before a hot reload runs
    the plan of its own configuration on the new network."""
    gate = engine.resolve_gate("tiny", "dynamic", 0.25)
    engine.load_model("tiny")
    fresh = engine.resolve_gate("tiny", "dynamic", 0.25)
    assert fresh.generation != gate.generation and fresh.key == gate.key
    x = np.random.default_rng(3).standard_normal((2, 11, 1)).astype(np.float32)
    [old] = engine.infer("tiny", gate, [x])
    [new] = engine.infer("tiny", fresh, [x])
    np.testing.assert_array_equal(old.logits, new.logits)


def test_a_configuration_the_reloaded_model_does_not_serve_fails_its_request_only(
    sealed: Engine,
) -> None:
    """A request resolved before a hot reload whose keep ratio the new model does not serve
    gets its 400; its batch mates are answered."""
    import dataclasses

    x = np.random.default_rng(6).standard_normal((1, 17, 1)).astype(np.float32)
    served = sealed.resolve_gate("tiny", "dynamic", 0.25)
    old = served.generation - 1
    ok = dataclasses.replace(served, generation=old)
    gone = dataclasses.replace(served, keep_ratio=0.75, generation=old)  # not served now
    first, second, third = sealed.infer("tiny", [ok, gone, ok], [x, x, x])
    assert isinstance(second, InvalidInput) and "keep_ratio" in str(second)
    [alone] = sealed.infer("tiny", served, [x])
    for result in (first, third):
        assert not isinstance(result, InvalidInput)
        np.testing.assert_allclose(result.logits, alone.logits, atol=1e-6)


def test_an_audio_front_end_wider_than_the_calibration_length_warms_up(tmp_path: Path) -> None:
    """The warm-up's short requests are never shorter than the network runs: a Wav2Vec2-style
    front end whose receptive field (here 130 samples, bert-base-sized ones 400) exceeds the
    64 steps plans are calibrated at."""
    tf = pytest.importorskip("transformers")
    from models import save_checkpoint
    from models.retrofit import retrofit

    torch.manual_seed(0)
    config = tf.HubertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(110, 5), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=2, feat_extract_norm="layer",
    )
    tf.HubertForSequenceClassification(config).save_pretrained(tmp_path / "src")
    net = retrofit(tmp_path / "src", {"dynamic_pruning_config": {"keep_ratio": 0.5}},
                   max_length=400)
    assert net.min_length > 64
    save_checkpoint(net, tmp_path / "repo" / "speech")
    engine = Engine.load(tmp_path / "repo", "cpu", torch_threads=1)
    try:
        engine.warm_up(max_batch_rows=2, keep_ratios=(0.5, 1.0))
        x = np.ones((1, net.min_length, 1), np.float32)
        (result,) = engine.infer("speech", engine.resolve_gate("speech", "dynamic"), [x])
        assert not isinstance(result, InvalidInput) and result.logits.shape == (1, 2)
    finally:
        engine.close()


def test_auto_threads_give_a_small_model_one_and_a_base_size_one_every_core(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch_threads "auto": the warm-up times the largest batch; the compute thread runs each
    model's batches on the threads chosen for it."""
    import service.engine as engine_module

    name = Engine.scan(tiny_repository)[0]
    small = Engine.load(tiny_repository, "cpu", "auto")
    try:
        small.warm_up(max_batch_rows=2, keep_ratios=(0.5,))
        assert small._models[name].threads == 1  # a millisecond forward: one thread
    finally:
        small.close()
    # As if the tiny model were base-size: its forward long enough, the gain large enough.
    monkeypatch.setattr(engine_module, "AUTO_THREADS_MIN_FORWARD_S", 0.0)
    monkeypatch.setattr(engine_module, "AUTO_THREADS_MIN_GAIN", 1e9)
    monkeypatch.setattr(engine_module, "_usable_cores", lambda: 2)
    big = Engine.load(tiny_repository, "cpu", "auto")
    try:
        big.warm_up(max_batch_rows=2, keep_ratios=(0.5,))
        assert big._models[name].threads == 2
        x = np.zeros((1, TINY_MAX_LENGTH, 1), np.float32)
        big.executor.submit(big.infer, name, big.resolve_gate(name, "dense"), [x]).result()
        assert big.executor.submit(torch.get_num_threads).result() == 2
    finally:
        big.close()
    fixed = Engine.load(tiny_repository, "cpu", 1)
    assert fixed._models[name].threads == 1
    fixed.close()
