"""Retrofitting Hugging Face text encoders (tiny BERT / RoBERTa configs), with and without a
head, and headless audio encoders: dense is the `transformers` forward, every plan is the masked
reference with mixed lengths, token types reach the model, the engine pads by the contract."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import load_checkpoint, save_checkpoint, settings_for
from models.errors import ConfigError

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")  # CI installs the [hf] extra: there it must import
import transformers as tf  # noqa: E402

from models.retrofit import retrofit  # noqa: E402
from tests.utils.models import assert_plans_match_reference

GATES = {"use_dynamic_pruning": True, "dynamic_pruning_config": {"keep_ratio": 0.5, "bucket": 8}}
TEXT = {
    "bert": (tf.BertConfig, tf.BertForSequenceClassification, tf.BertModel),
    "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, tf.RobertaModel),
}
VOCAB = 50


def _config(family: str) -> Any:
    extra = {"pad_token_id": 1, "type_vocab_size": 1} if family == "roberta" else {}
    return TEXT[family][0](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, num_labels=3, **extra,
    )


def _pretrained(tmp_path: Path, family: str, head: bool) -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = TEXT[family][1 if head else 2](_config(family)).eval()
    folder = tmp_path / f"{family}-{head}"
    model.save_pretrained(folder)
    return model, folder


def _tokens(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of lengths 20, 13, 7, right padded with the pad token; their token types."""
    pad = 1 if family == "roberta" else 0
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 20), generator=gen)
    lengths = torch.tensor([20, 13, 7])
    steps = torch.arange(20)[None, :]
    ids[steps >= lengths[:, None]] = pad
    types = torch.zeros_like(ids)
    if family == "bert":
        types[:, 5:] = 1
        types[steps >= lengths[:, None]] = 0
    return ids, lengths, types


def _reference(original: Any, ids: torch.Tensor, lengths: torch.Tensor, types: torch.Tensor,
               head: bool) -> torch.Tensor:
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    out = original(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if head:
        return out.logits
    w = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * w).sum(1) / w.sum(1)


@pytest.mark.parametrize("head", [True, False], ids=["head", "encoder"])
@pytest.mark.parametrize("family", sorted(TEXT))
def test_text_dense_is_the_transformers_forward_and_plans_the_masked_reference(
    tmp_path: Path, family: str, head: bool
) -> None:
    original, folder = _pretrained(tmp_path, family, head)
    net = retrofit(folder, GATES)
    assert len(net.gated_widths()) == 2 and set(net.gated_widths().values()) == {64}
    contract = net.contract()
    assert [t.name for t in contract.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert contract.inputs[0].value_range == (0, VOCAB - 1)
    assert contract.outputs[0].name == ("logits" if head else "pooled")
    assert net.config.model.max_length == (38 if family == "roberta" else 40)
    ids, lengths, types = _tokens(family)
    extras = {"token_type_ids": types}
    with torch.no_grad():
        want = _reference(original, ids, lengths, types, head)
        dense = net(ids, lengths, settings_for(net.config, "dense"), extras).logits
    torch.testing.assert_close(dense, want, atol=1e-4, rtol=0)
    if family == "bert":  # the token types reach the model
        with torch.no_grad():
            untyped = net(ids, lengths, settings_for(net.config, "dense")).logits
        assert float((untyped - dense).abs().max()) > 1e-5
    assert_plans_match_reference(net, ids, lengths, extras)
    # Padding is masked: a padded row equals its solo forward, in dynamic mode too.
    assert net.padding_invariant
    settings = settings_for(net.config, "dynamic")
    with torch.no_grad():
        batched = net(ids, lengths, settings, extras).logits
        solo = net(ids[2:3, :7], lengths[2:3], settings, {"token_type_ids": types[2:3, :7]})
    torch.testing.assert_close(batched[2:3], solo.logits, atol=1e-4, rtol=0)


def test_text_max_length_is_bounded_by_the_positions(tmp_path: Path) -> None:
    _, folder = _pretrained(tmp_path, "bert", head=True)
    assert retrofit(folder, GATES, max_length=16).config.model.max_length == 16
    with pytest.raises(ConfigError, match="exceeds the model's 40 positions"):
        retrofit(folder, GATES, max_length=41)


def test_headless_audio_encoder_pools_its_valid_frames(tmp_path: Path) -> None:
    config = tf.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", conv_bias=True,
    )
    torch.manual_seed(0)
    original = tf.HubertModel(config).eval()
    original.save_pretrained(tmp_path / "hubert")
    net = retrofit(tmp_path / "hubert", GATES, max_length=800)
    assert net.contract().outputs[0].name == "pooled"
    assert net.config.model.num_classes == 32
    x = torch.randn(2, 400, 1, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([400, 250])
    x[1, 250:] = 0
    mask = (torch.arange(400)[None] < lengths[:, None]).long()
    with torch.no_grad():
        hidden = original(x[..., 0], attention_mask=mask).last_hidden_state
        frames = original._get_feature_vector_attention_mask(hidden.shape[1], mask)
        w = frames.unsqueeze(-1).float()
        want = (hidden * w).sum(1) / w.sum(1)
        got = net(x, lengths, settings_for(net.config, "dense")).logits
        solo = net(x[1:, :250], lengths[1:], settings_for(net.config, "dense")).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1:], solo, atol=1e-4, rtol=0)


def test_the_engine_pads_text_by_its_contract(tmp_path: Path) -> None:
    """Requests of different lengths, with and without token types and masks, batched: each
    equals its solo forward; padding uses the pad token (RoBERTa's positions depend on it)."""
    from service.engine import Engine, ModelInput

    for family in ("bert", "roberta"):
        _, folder = _pretrained(tmp_path, family, head=True)
        net = retrofit(folder, GATES)
        save_checkpoint(net, tmp_path / "repo" / family)
        loaded = load_checkpoint(tmp_path / "repo" / family)
        ids, lengths, types = _tokens(family)
        settings = settings_for(net.config, "dynamic")
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(ids, lengths, settings, {"token_type_ids": types}).logits,
                net(ids, lengths, settings, {"token_type_ids": types}).logits, atol=0, rtol=0,
            )
    engine = Engine.load(tmp_path / "repo", "cpu")
    engine.warm_up(max_batch_rows=4)
    for family in ("bert", "roberta"):
        info = engine.models[family]
        assert [t.name for t in info.contract.data_inputs] == ["input_ids", "token_type_ids"]
        ids, lengths, types = _tokens(family)
        items = [ModelInput((ids[i : i + 1, :n].numpy(), types[i : i + 1, :n].numpy()))
                 for i, n in enumerate(lengths.tolist())]
        # One request of two rows padded by its client, with its row lengths.
        items.append(ModelInput((ids[1:3].numpy(), types[1:3].numpy()), lengths[1:3].numpy()))
        gate = engine.resolve_gate(family, "dynamic", keep_ratio=0.5)
        together = engine.infer(family, gate, items)
        for item, result in zip(items[:3], together[:3], strict=True):
            [alone] = engine.infer(family, gate, [item])
            np.testing.assert_allclose(result.logits, alone.logits, atol=1e-4)
        np.testing.assert_allclose(together[3].logits, np.concatenate(
            [together[1].logits, together[2].logits]), atol=1e-4)
    engine.close()


def test_token_id_files_fit_a_retrofitted_bert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gated fit --data ids.npz` on a text model: integer ids stay ids (padded with the pad
    token), ids outside the vocabulary are refused naming the file; MNIST-1D is refused."""
    from models.data import DataError, load_tensor_file
    from service.cli import main

    _, folder = _pretrained(tmp_path, "bert", head=True)
    save_checkpoint(retrofit(folder, GATES), tmp_path / "ckpt")
    spec = load_checkpoint(tmp_path / "ckpt").contract().data_inputs[0]
    gen = np.random.default_rng(0)
    ids = gen.integers(2, VOCAB, (40, 12))
    lengths = gen.integers(4, 13, 40)
    np.savez(tmp_path / "ids.npz", inputs=ids, lengths=lengths, labels=gen.integers(0, 3, 40))
    split = load_tensor_file(tmp_path / "ids.npz", tokens=spec)
    assert split.x.dtype == torch.int64 and split.x.shape == (40, 12)
    assert int(split.x[0, lengths[0]:].sum()) == 0 if lengths[0] < 12 else True
    np.savez(tmp_path / "bad.npz", inputs=ids + VOCAB)
    with pytest.raises(DataError, match=r"bad.npz: 'inputs' holds ids in \[52, 99\]; the model "
                       r"accepts \[0, 49\]"):
        load_tensor_file(tmp_path / "bad.npz", tokens=spec)
    assert main(["fit", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "fitted"),
                 "--data", str(tmp_path / "ids.npz"), "--epochs", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] >= 1 and 0 <= report["dynamic_accuracy"] <= 1
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt")]) == 2
    assert "MNIST-1D is a float signal" in capsys.readouterr().err
