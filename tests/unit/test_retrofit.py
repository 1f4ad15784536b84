"""Retrofitting Hugging Face audio classifiers (tiny configs of each family): the dense mode is
the `transformers` forward, every plan is the masked reference with mixed lengths, padding
follows the front end's rule, checkpoints round-trip, the engine serves them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import load_checkpoint, save_checkpoint, settings_for
from models.errors import ArchitectureError, ConfigError
from service.cli import main

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")  # CI installs the [hf] extra: there it must import
import transformers as tf  # noqa: E402

from models.retrofit import retrofit  # noqa: E402
from tests.utils.models import assert_plans_match_reference

FAMILIES = {
    "wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2ForSequenceClassification),
    "hubert": (tf.HubertConfig, tf.HubertForSequenceClassification),
    "wavlm": (tf.WavLMConfig, tf.WavLMForSequenceClassification),
}
GATES = {"use_dynamic_pruning": True, "dynamic_pruning_config": {"keep_ratio": 0.5, "bucket": 8}}
MAX_SAMPLES = 800


def _config(family: str, norm: str = "layer") -> Any:
    extra = {"num_buckets": 16, "max_bucket_distance": 64} if family == "wavlm" else {}
    return FAMILIES[family][0](
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=5, feat_extract_norm=norm,
        conv_bias=norm == "layer", **extra,
    )


def _pretrained(tmp_path: Path, family: str, norm: str = "layer") -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = FAMILIES[family][1](_config(family, norm)).eval()
    folder = tmp_path / f"{family}-{norm}"
    model.save_pretrained(folder)
    return model, folder


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 400, 1, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([400, 300, 250])
    x[1, 300:] = 0
    x[2, 250:] = 0
    return x, lengths


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_is_the_transformers_forward_and_plans_the_masked_reference(
    tmp_path: Path, family: str
) -> None:
    original, folder = _pretrained(tmp_path, family)
    net = retrofit(folder, GATES, max_length=MAX_SAMPLES)
    assert len(net.gated_widths()) == 2 and set(net.gated_widths().values()) == {64}
    x, lengths = _batch()
    mask = (torch.arange(400)[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = original(x[..., 0], attention_mask=mask).logits
        dense = net(x, lengths, settings_for(net.config, "dense")).logits
    torch.testing.assert_close(dense, want, atol=1e-4, rtol=0)
    assert_plans_match_reference(net, x, lengths)
    # Layer-norm front ends keep padding out: a padded row equals its solo forward.
    assert net.padding_invariant
    settings = settings_for(net.config, "dynamic")
    with torch.no_grad():
        batched = net(x, lengths, settings).logits
        solo = net(x[1:2, :300], lengths[1:2], settings).logits
    torch.testing.assert_close(batched[1:2], solo, atol=1e-4, rtol=0)


def test_group_norm_front_ends_are_batched_by_length_only(tmp_path: Path) -> None:
    _, folder = _pretrained(tmp_path, "hubert", norm="group")
    net = retrofit(folder, GATES, max_length=MAX_SAMPLES)
    assert not net.padding_invariant
    x, lengths = _batch()
    with pytest.raises(Exception, match="batch only requests of one length"):
        net(x, lengths, settings_for(net.config, "dense"))


def test_checkpoint_round_trip_and_the_engine_serves_it(tmp_path: Path) -> None:
    from service.engine import Engine

    _, folder = _pretrained(tmp_path, "wavlm")
    net = retrofit(folder, GATES, max_length=MAX_SAMPLES)
    repo = tmp_path / "repo"
    save_checkpoint(net, repo / "speech")
    loaded = load_checkpoint(repo / "speech")
    x, lengths = _batch()
    settings = settings_for(net.config, "dynamic")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lengths, settings).logits,
                                   net(x, lengths, settings).logits, atol=0, rtol=0)
    engine = Engine.load(repo, "cpu")
    engine.warm_up(max_batch_rows=4)
    info = engine.models["speech"]
    assert (info.in_channels, info.num_classes, info.max_length) == (1, 5, MAX_SAMPLES)
    gate = engine.resolve_gate("speech", "dynamic", keep_ratio=0.5)
    arrays = [x[i : i + 1, : int(n)].numpy() for i, n in enumerate(lengths)]
    together = engine.infer("speech", gate, arrays)
    for array, result in zip(arrays, together, strict=True):
        [alone] = engine.infer("speech", gate, [array])
        np.testing.assert_allclose(result.logits, alone.logits, atol=1e-4)
        assert result.active_channel_ratio == pytest.approx(0.5)
    engine.close()


def test_random_init_from_a_config_and_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config("hubert").to_dict()))
    gates = tmp_path / "gates.yaml"
    gates.write_text(json.dumps(GATES))
    out = tmp_path / "ckpt"
    assert main(["retrofit", str(config), "--hf-config", "--config", str(gates),
                 "--max-length", str(MAX_SAMPLES), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gated_ffns"] == 2 and summary["gated_channels"] == 128
    net = load_checkpoint(out)
    assert net.config.model.name == "models.retrofit:hf_encoder"
    assert net.config.dynamic_pruning_config.keep_ratio == 0.5
    # A folder without a model or without weights, an unsupported family: one line, exit 2.
    (tmp_path / "empty").mkdir()
    assert main(["retrofit", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["retrofit", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # config only
    assert "cannot load the pretrained model" in capsys.readouterr().err
    with pytest.raises(ArchitectureError, match="model_type 'gpt2' is not supported"):
        retrofit({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="no config.json"):
        retrofit(tmp_path / "absent")


def test_fitting_a_retrofitted_encoder_leaves_its_base_as_it_was(tmp_path: Path) -> None:
    from models.data import Split
    from models.fit import fit

    original, folder = _pretrained(tmp_path, "hubert")
    net = retrofit(folder, GATES, max_length=MAX_SAMPLES)
    with torch.no_grad():  # a head with opinions: untrained, its logits are all near 0
        for hf in (original, net.module.hf):  # type: ignore[union-attr]
            hf.projector.weight.mul_(30)
            hf.classifier.weight.mul_(30)
    x = torch.randn(48, 400, 1, generator=torch.Generator().manual_seed(2))
    lengths = torch.randint(200, 401, (48,), generator=torch.Generator().manual_seed(3))
    x[torch.arange(400)[None, :] >= lengths[:, None]] = 0
    unlabelled = torch.full((48,), -1, dtype=torch.int64)  # distillation needs no labels
    train_set = Split(x[:32], unlabelled[:32], lengths[:32])
    test_set = Split(x[32:], unlabelled[32:], lengths[32:])
    _, report = fit(net, train_set, test_set, epochs=2, batch_size=8, progress=False)
    assert report.test_distill_after < report.test_distill_before and not report.test
    mask = (torch.arange(400)[None] < lengths[:, None]).long()
    with torch.no_grad():  # dense mode is still the untouched transformers model
        torch.testing.assert_close(
            net(x, lengths, settings_for(net.config, "dense")).logits,
            original(x[..., 0], attention_mask=mask).logits, atol=1e-4, rtol=0)


def test_the_mac_count_starts_at_the_front_ends_receptive_field(tmp_path: Path) -> None:
    from models.flops import MacModel

    _, folder = _pretrained(tmp_path, "hubert")
    net = retrofit(folder, GATES, max_length=MAX_SAMPLES)
    # Kernel 10 / stride 5, then kernel 3: three first-layer frames, 10 + 2 * 5 samples.
    assert net.min_length == 20
    assert net.length_period == 10
    model = MacModel.fit(net)
    assert model.coef is not None  # a quadratic per length class, not the per-length table
