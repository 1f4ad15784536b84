"""Retrofitting Hugging Face ViT image classifiers (a tiny config), with and without a head:
the input has a fixed shape and no length, dense is the `transformers` forward, every plan is
the masked reference, the gated layers and the MAC count see every token, a request's result
does not depend on its batch mates, the engine stacks images, the CLI and tensor files work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import InvalidInputError, compile_plan, load_checkpoint, save_checkpoint, settings_for
from models.errors import ConfigError
from models.sparse import Strategy

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")  # CI installs the [hf] extra: there it must import
import transformers as tf  # noqa: E402

from models.retrofit import retrofit  # noqa: E402
from tests.utils.models import assert_plans_match_reference

GATES = {"use_dynamic_pruning": True, "dynamic_pruning_config": {"keep_ratio": 0.5, "bucket": 8}}
SIZE, PATCH, HIDDEN, FFN, LABELS = 32, 8, 32, 64, 3
TOKENS = (SIZE // PATCH) ** 2 + 1  # 16 patches and the CLS token


def _config() -> Any:
    return tf.ViTConfig(
        image_size=SIZE, patch_size=PATCH, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=FFN, num_labels=LABELS,
    )


def _pretrained(tmp_path: Path, head: bool) -> tuple[Any, Path]:
    torch.manual_seed(0)
    cls = tf.ViTForImageClassification if head else tf.ViTModel
    model = cls(_config()).eval()
    folder = tmp_path / f"vit-{head}"
    model.save_pretrained(folder)
    return model, folder


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _full(n: int) -> torch.Tensor:
    return torch.full((n,), TOKENS)


def _dense_macs() -> int:
    """Every matmul of one image at the tiny config, counted by hand over all 17 tokens."""
    patches = TOKENS - 1
    embed = patches * (3 * PATCH * PATCH) * HIDDEN  # the patch conv
    projections = 4 * TOKENS * HIDDEN * HIDDEN  # q, k, v, o
    attention = 2 * TOKENS * TOKENS * HIDDEN  # scores and their weighted sum
    ffn = TOKENS * 2 * HIDDEN * FFN
    return embed + 2 * (projections + attention + ffn) + HIDDEN * LABELS  # the CLS token's head


@pytest.mark.parametrize("head", [True, False], ids=["head", "encoder"])
def test_vit_dense_is_the_transformers_forward_and_plans_the_masked_reference(
    tmp_path: Path, head: bool
) -> None:
    original, folder = _pretrained(tmp_path, head)
    net = retrofit(folder, GATES)
    assert len(net.gated_widths()) == 2 and set(net.gated_widths().values()) == {FFN}
    contract = net.contract()
    [spec] = contract.inputs
    assert (spec.name, spec.datatype, spec.shape, spec.length_dim) == (
        "pixel_values", "FP32", (-1, 3, SIZE, SIZE), None)
    assert contract.fixed_shape and contract.unservable() is None
    assert contract.outputs[0].name == ("logits" if head else "pooled")
    assert contract.outputs[0].shape == (-1, LABELS if head else HIDDEN)
    assert net.config.model.max_length == net.fixed_length == TOKENS
    assert net.config.model.in_channels == 3
    x, lengths = _images(), _full(3)
    with torch.no_grad():
        out = original(pixel_values=x)
        # Headless: the last hidden states (after ViT's final norm) averaged over every token.
        want = out.logits if head else out.last_hidden_state.mean(1)
        dense = net(x, lengths, settings_for(net.config, "dense"))
    torch.testing.assert_close(dense.logits, want, atol=1e-4, rtol=0)
    # Every token counts; the head reads the CLS token; no pooler runs (the encoder alone is
    # built without it: pooled averages the tokens).
    assert net.module.encoder.pooler is None  # type: ignore[union-attr]
    macs = _dense_macs() - (0 if head else HIDDEN * LABELS)
    assert dense.dense_macs.tolist() == [float(macs)] * 3
    for reference, gathered in assert_plans_match_reference(net, x, lengths):
        # Only the kept channels ran, over every token: the reference's count exactly.
        torch.testing.assert_close(gathered.macs, reference.macs, atol=0, rtol=0)


def test_the_predictors_pool_over_every_token_and_requests_ignore_their_batch_mates(
    tmp_path: Path,
) -> None:
    _, folder = _pretrained(tmp_path, head=True)
    net = retrofit(folder, GATES).eval()
    assert net.mac_model.quadratic  # fitted first: its counting forward is not under test
    seen: list[torch.Tensor] = []
    hooks = [gate.register_forward_hook(lambda _m, args, _o: seen.append(args[1]))
             for _, gate in net.dynamic_gates()]
    x = _images(4)
    settings = settings_for(net.config, "dynamic", keep_ratio=0.25)
    with torch.no_grad():
        batched = net(x, _full(4), settings)
    for hook in hooks:
        hook.remove()
    assert [tuple(mask.shape) for mask in seen] == [(4, TOKENS)] * 2
    assert all(bool(mask.all()) for mask in seen)
    # Each image keeps its own channels: the same logits and MACs alone as in the batch.
    plan = compile_plan(net, settings, strategy=Strategy("gather", 1))
    with torch.no_grad():
        together = plan(x, _full(4))
        for i in range(4):
            alone = net(x[i : i + 1], _full(1), settings)
            torch.testing.assert_close(batched.logits[i : i + 1], alone.logits, atol=1e-4,
                                       rtol=0)
            torch.testing.assert_close(together.logits[i : i + 1],
                                       plan(x[i : i + 1], _full(1)).logits, atol=1e-4, rtol=0)
            assert float(together.macs[i]) == float(alone.macs[0])
    kept = {name: k.tolist() for name, k in batched.kept.items()}
    assert all(v == [16.0] * 4 for v in kept.values())  # a quarter of 64, per image


def test_vit_inputs_are_checked_and_max_length_is_the_token_count(tmp_path: Path) -> None:
    _, folder = _pretrained(tmp_path, head=True)
    net = retrofit(folder, GATES)
    dense = settings_for(net.config, "dense")
    with pytest.raises(InvalidInputError, match=r"pixel_values must have shape \[batch, 3, 32, "
                       r"32\], got \[1, 3, 30, 32\]"):
        net(torch.zeros(1, 3, 30, 32), _full(1), dense)
    with pytest.raises(InvalidInputError, match="lengths must all be 17"):
        net(torch.zeros(1, 3, 32, 32), torch.tensor([3]), dense)
    with pytest.raises(ValueError, match="every request is 17 steps, not 8"):
        net.example_input(8)
    assert retrofit(folder, GATES, max_length=TOKENS).config.model.max_length == TOKENS
    with pytest.raises(ConfigError, match="max_length 64: every image is 17 tokens"):
        retrofit(folder, GATES, max_length=64)


def test_the_engine_stacks_images_and_a_checkpoint_round_trips(tmp_path: Path) -> None:
    from service.engine import Engine, ModelInput

    for head in (True, False):
        _, folder = _pretrained(tmp_path, head)
        net = retrofit(folder, GATES)
        name = "vit" if head else "vit-encoder"
        save_checkpoint(net, tmp_path / "repo" / name)
        loaded = load_checkpoint(tmp_path / "repo" / name)
        assert loaded.fixed_length == TOKENS
        settings = settings_for(net.config, "dynamic")
        x = _images()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, _full(3), settings).logits,
                                       net(x, _full(3), settings).logits, atol=0, rtol=0)
    engine = Engine.load(tmp_path / "repo", "cpu")
    engine.warm_up(max_batch_rows=4)
    x = _images(4, seed=2).numpy()
    for name in ("vit", "vit-encoder"):
        info = engine.models[name]
        assert info.contract.inputs[0].shape == (-1, 3, SIZE, SIZE)
        assert (info.max_length, info.in_channels) == (TOKENS, 3)
        items = [ModelInput((x[0:1],)), ModelInput((x[1:3],)), ModelInput((x[3:4],))]
        gate = engine.resolve_gate(name, "dynamic", keep_ratio=0.5)
        together = engine.infer(name, gate, items)
        for item, result in zip(items, together, strict=True):
            [alone] = engine.infer(name, gate, [item])
            np.testing.assert_allclose(result.logits, alone.logits, atol=1e-4)
            assert result.active_channel_ratio == pytest.approx(0.5)
            assert result.flops_ratio < 1
        width = LABELS if name == "vit" else HIDDEN
        assert [r.logits.shape for r in together] == [(1, width), (2, width), (1, width)]
    engine.close()


def test_the_cli_retrofits_a_vit_and_tensor_files_of_images_fit_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gated retrofit` from a config (random weights, no head) and from a folder (head);
    `gated fit --data images.npz` with (N, 3, H, W) floats; MNIST-1D and images of another
    size are refused naming the shape."""
    from models.data import DataError, load_tensor_file
    from service.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config().to_dict()))
    assert main(["retrofit", str(config), "--hf-config", "--no-head", "--config",
                 str(_gates(tmp_path)), "--out", str(tmp_path / "encoder")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gated_ffns"] == 2 and summary["gated_channels"] == 2 * FFN
    assert load_checkpoint(tmp_path / "encoder").contract().outputs[0].name == "pooled"
    _, folder = _pretrained(tmp_path, head=True)
    assert main(["retrofit", str(folder), "--head", "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["retrofit", str(folder), "--max-length", "64", "--out", str(tmp_path / "x")]) == 2
    assert "every image is 17 tokens" in capsys.readouterr().err
    spec = load_checkpoint(tmp_path / "ckpt").contract().inputs[0]

    gen = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", inputs=gen.standard_normal((24, 3, SIZE, SIZE)),
             labels=gen.integers(0, LABELS, 24))
    split = load_tensor_file(tmp_path / "images.npz", max_length=TOKENS, fixed=spec)
    assert split.x.dtype == torch.float32 and split.x.shape == (24, 3, SIZE, SIZE)
    assert split.lengths.tolist() == [TOKENS] * 24
    np.savez(tmp_path / "small.npz", inputs=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match=r"small.npz: 'inputs' must be \(N, 3, 32, 32\) .* got "
                       r"shape \[4, 3, 16, 16\]"):
        load_tensor_file(tmp_path / "small.npz", max_length=TOKENS, fixed=spec)
    np.savez(tmp_path / "masked.npz", inputs=np.zeros((4, 3, SIZE, SIZE)), lengths=np.ones(4))
    with pytest.raises(DataError, match="'lengths' does not apply"):
        load_tensor_file(tmp_path / "masked.npz", max_length=TOKENS, fixed=spec)
    assert main(["fit", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "fitted"),
                 "--data", str(tmp_path / "images.npz"), "--epochs", "1", "--batch-size", "8",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] >= 2 and 0 <= report["dynamic_accuracy"] <= 1
    for command in (["evaluate"], ["fit", "--out", str(tmp_path / "y")]):
        assert main([*command, "--checkpoint", str(tmp_path / "ckpt")]) == 2
        assert ("MNIST-1D is a float signal of 40 steps; the model takes 'pixel_values' FP32 of "
                "a fixed shape: give a tensor file of (N, 3, 32, 32) inputs"
                in capsys.readouterr().err)


def _gates(tmp_path: Path) -> Path:
    path = tmp_path / "gates.yaml"
    path.write_text(json.dumps(GATES))
    return path
