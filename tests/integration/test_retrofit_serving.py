"""A retrofitted Hugging Face audio classifier (tiny HuBERT) behind a real server: tritonclient
sends raw audio of different lengths concurrently, binary and JSON; each answer equals the
request's solo forward, whatever it was batched with."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from models import load_checkpoint, save_checkpoint, settings_for
from tests.integration.conftest import serving
from tests.utils.service import metric

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")  # CI installs the [hf] extra: there it must import
import transformers as tf  # noqa: E402

from models.retrofit import retrofit  # noqa: E402


def test_a_retrofitted_encoder_serves_mixed_lengths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tf.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=5, feat_extract_norm="layer",
    )
    tf.HubertForSequenceClassification(config).save_pretrained(tmp_path / "hubert")
    net = retrofit(tmp_path / "hubert", {"dynamic_pruning_config": {"keep_ratio": 0.5}},
                   max_length=1600)
    save_checkpoint(net, tmp_path / "repo" / "speech")
    reference = load_checkpoint(tmp_path / "repo" / "speech")
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((1, n)).astype(np.float32) for n in (1600, 1210, 800, 333) * 4]

    def solo(clip: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(clip)[:, :, None]
        with torch.no_grad():
            out = reference(x, torch.tensor([clip.shape[1]]), settings_for(
                reference.config, "dynamic", keep_ratio=0.5))
        return out.logits.numpy()

    with serving(tmp_path / "repo", tmp_path, max_batch_size=8, max_queue_delay_ms=20) as srv:
        client = triton.InferenceServerClient(srv.address, concurrency=8)
        meta = client.get_model_metadata("speech")
        assert meta["inputs"][0]["shape"] == [-1, -1, 1] and meta["outputs"][0]["shape"][-1] == 5

        # A request whose body is still on its way makes the batcher wait out its delay for
        # mates (it does not when every request it knows of is queued already).
        holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        holder.sendall(b"POST /v2/models/speech/infer HTTP/1.1\r\nHost: t\r\n"
                       b"Content-Length: 1000\r\n\r\n{")
        pending = []
        for i, clip in enumerate(clips):  # all in flight at once: they share batches
            inp = triton.InferInput("input", list(clip.shape), "FP32")
            inp.set_data_from_numpy(clip, binary_data=i % 2 == 0)  # binary and JSON
            out = triton.InferRequestedOutput("logits", binary_data=i % 2 == 1)
            pending.append(client.async_infer(
                "speech", [inp], outputs=[out],
                parameters={"gate_mode": "dynamic", "keep_ratio": 0.5}))
        got = [request.get_result().as_numpy("logits") for request in pending]
        holder.close()
        # Shorter than the front end's receptive field (20 samples): refused, naming it, before
        # it could fail a batch.
        short = triton.InferInput("input", [1, 15], "FP32")
        short.set_data_from_numpy(np.ones((1, 15), np.float32))
        with pytest.raises(InferenceServerException, match="needs at least 20"):
            client.infer("speech", [short])
        client.close()
        # Fewer batches than requests: clips of different lengths were computed together.
        batches = metric(srv.url, "gated_batch_size_count", model="speech")
        assert metric(srv.url, "gated_batch_size_sum", model="speech") >= len(clips) > batches
    for clip, logits in zip(clips, got, strict=True):
        np.testing.assert_allclose(logits, solo(clip), atol=1e-4)
