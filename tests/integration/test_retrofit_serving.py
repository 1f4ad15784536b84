"""Retrofitted Hugging Face encoders behind a real server (tiny HuBERT, BERT and ViT configs):
tritonclient sends raw audio of different lengths, token ids or images of the model's fixed
shape concurrently, binary and JSON; each answer equals the request's solo forward, whatever it
was batched with, and malformed requests beside them get their 400s."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from models import load_checkpoint, save_checkpoint, settings_for
from tests.integration.conftest import serving
from tests.utils.service import metric

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")  # CI installs the [hf] extra: there it must import
import transformers as tf  # noqa: E402

from models.retrofit import retrofit  # noqa: E402


def inputs(module: object, named: dict[str, np.ndarray], binary: bool = True) -> list[object]:
    """tritonclient inputs (``module``: its http or grpc client module) of named arrays, each
    in its own datatype; binary over HTTP unless ``binary`` is False."""
    out = []
    for name, value in named.items():
        inp = module.InferInput(  # type: ignore[attr-defined]
            name, list(value.shape), np_to_triton_dtype(value.dtype)
        )
        if module is triton:
            inp.set_data_from_numpy(value, binary_data=binary)
        else:
            inp.set_data_from_numpy(value)
        out.append(inp)
    return out


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


def _bert(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=40, num_labels=3)
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert-src")
    net = retrofit(tmp_path / "bert-src", {"dynamic_pruning_config": {"keep_ratio": 0.5}})
    save_checkpoint(net, tmp_path / "repo" / "bert")
    return tmp_path / "repo" / "bert"


def test_a_retrofitted_bert_serves_token_ids_and_refuses_bad_ones_alone(tmp_path: Path) -> None:
    """tritonclient sends INT64 ids (+ masks, + token types), binary and JSON, of different
    lengths, concurrently with malformed requests: every good one equals its solo forward, every
    bad one is a 400 naming its problem, over HTTP and gRPC."""
    import tritonclient.grpc as triton_grpc

    reference = load_checkpoint(_bert(tmp_path))
    rng = np.random.default_rng(0)
    settings = settings_for(reference.config, "dynamic", keep_ratio=0.5)

    def solo(ids: np.ndarray, types: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = reference(torch.from_numpy(ids), torch.tensor([ids.shape[1]]), settings,
                            {"token_type_ids": torch.from_numpy(types)})
        return out.logits.numpy()

    goods = []  # (inputs by name, expected logits)
    for i, n in enumerate((20, 13, 7, 31) * 3):
        ids = rng.integers(1, 50, (1, n), dtype=np.int64)
        types = (np.arange(n)[None] >= n // 2).astype(np.int64) if i % 3 == 0 else None
        want = solo(ids, types if types is not None else np.zeros_like(ids))
        named = {"input_ids": ids}
        if types is not None:
            named["token_type_ids"] = types
        if i % 4 == 1:  # padded by the client to 40, with its mask
            named = {k: np.pad(v, ((0, 0), (0, 40 - n))) for k, v in named.items()}
            named["attention_mask"] = (np.arange(40)[None] < n).astype(np.int64)
        goods.append((named, want))
    ok_ids = np.ones((1, 8), np.int64)
    bads = [
        ({"input_ids": np.full((1, 8), 50, np.int64)},
         "values in [50, 50]; model 'bert' accepts [0, 49]"),
        ({"input_ids": -ok_ids}, "accepts [0, 49]"),
        ({"input_ids": ok_ids, "attention_mask": np.ones((1, 7), np.int64)},
         "its [batch, T] must be 'input_ids''s, [1, 8]"),
        ({"attention_mask": np.ones((1, 8), np.int64)}, "missing input 'input_ids'"),
        ({"input_ids": ok_ids.astype(np.float32)}, "'input_ids' must be INT64, got FP32"),
        ({"input_ids": ok_ids, "attention_mask": np.array([[0, 1, 1, 1, 1, 1, 1, 1]])},
         "ones then zeros"),
        ({"input_ids": ok_ids, "attention_mask": np.zeros((1, 8), np.int64)}, "0 valid steps"),
        ({"input_ids": np.ones((1, 41), np.int64)}, "accepts at most 40"),
        ({"input_ids": ok_ids, "token_type_ids": ok_ids * 2}, "'token_type_ids' has values"),
    ]

    with serving(tmp_path / "repo", tmp_path, max_batch_size=8, max_queue_delay_ms=20) as srv:
        client = triton.InferenceServerClient(srv.address, concurrency=8)
        meta = client.get_model_metadata("bert")
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1]),
            ("token_type_ids", "INT64", [-1, -1])]
        holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # see above
        holder.sendall(b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: t\r\n"
                       b"Content-Length: 1000\r\n\r\n{")
        pending = []
        for i, (named, _) in enumerate(goods + [(b, "") for b, _ in bads]):
            pending.append(client.async_infer("bert", inputs(triton, named, i % 2 == 0),
                                              parameters={"keep_ratio": 0.5}))
        results = []
        for request in pending:
            try:
                results.append(request.get_result().as_numpy("logits"))
            except InferenceServerException as err:
                results.append(str(err))
        holder.close()
        for (_, want), got in zip(goods, results, strict=False):
            assert not isinstance(got, str), got
            np.testing.assert_allclose(got, want, atol=1e-4)
        for (_, message), got in zip(bads, results[len(goods):], strict=True):
            assert isinstance(got, str) and message in got, (message, got)
        client.close()
        assert metric(srv.url, "gated_batch_size_count", model="bert") < len(goods)

        grpc_client = triton_grpc.InferenceServerClient(srv.grpc_address)
        named, want = goods[1]
        reply = grpc_client.infer("bert", inputs(triton_grpc, named, True),
                                  parameters={"keep_ratio": 0.5})
        np.testing.assert_allclose(reply.as_numpy("logits"), want, atol=1e-4)
        with pytest.raises(triton_grpc.InferenceServerException, match="accepts \\[0, 49\\]"):
            grpc_client.infer("bert", inputs(triton_grpc, bads[0][0], True))
        grpc_client.close()


ENCODER = Path(__file__).resolve().parents[2] / "models" / "encoders" / "mnist1d-wav2vec2"


def test_the_shipped_encoder_serves_beside_a_bert(tmp_path: Path) -> None:
    """The shipped retrofitted Wav2Vec2 and a retrofitted BERT in one repository: MNIST-1D
    signals of three lengths (binary and JSON) batched together each equal their solo forward,
    the full-length ones are classified as the checkpoint's accuracy says, and BERT answers
    beside it."""
    import shutil

    from models.data import load_mnist1d

    shutil.copytree(ENCODER, tmp_path / "repo" / "mnist1d-wav2vec2")
    _bert(tmp_path)
    reference = load_checkpoint(ENCODER)
    settings = settings_for(reference.config, "dynamic")  # its own keep ratio, 0.25
    _, test = load_mnist1d()
    signals = [test.x[i : i + 1, :n, 0].numpy() for i, n in
               zip(range(24), (40, 33, 27) * 8, strict=True)]

    def solo(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = reference(torch.from_numpy(x)[:, :, None], torch.tensor([x.shape[1]]),
                            settings)
        return out.logits.numpy()

    with serving(tmp_path / "repo", tmp_path, max_batch_size=8, max_queue_delay_ms=20) as srv:
        client = triton.InferenceServerClient(srv.address, concurrency=8)
        holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # see above
        holder.sendall(b"POST /v2/models/mnist1d-wav2vec2/infer HTTP/1.1\r\nHost: t\r\n"
                       b"Content-Length: 1000\r\n\r\n{")
        pending = []
        for i, x in enumerate(signals):
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=i % 2 == 0)
            pending.append(client.async_infer("mnist1d-wav2vec2", [inp]))
        # A second client: an answered request holds its pooled connection until its body is
        # read (get_result below), so the first client's 8 may all be taken by then.
        beside = triton.InferenceServerClient(srv.address)
        ids = triton.InferInput("input_ids", [1, 5], "INT64")
        ids.set_data_from_numpy(np.array([[3, 4, 5, 6, 7]], dtype=np.int64))
        bert = beside.infer("bert", [ids])
        long = triton.InferInput("input", [1, 41], "FP32")  # past the model's max_length
        long.set_data_from_numpy(np.zeros((1, 41), np.float32))
        with pytest.raises(InferenceServerException, match="accepts at most 40"):
            beside.infer("mnist1d-wav2vec2", [long])
        beside.close()
        got = [request.get_result() for request in pending]
        holder.close()
        assert got[0].get_response()["parameters"]["keep_ratio"] == 0.25
        client.close()
        assert metric(srv.url, "gated_batch_size_count", model="mnist1d-wav2vec2") < len(signals)
    assert bert.as_numpy("logits").shape == (1, 3)
    logits = [r.as_numpy("logits") for r in got]
    for x, out in zip(signals, logits, strict=True):
        np.testing.assert_allclose(out, solo(x), atol=1e-4)
    full = [int(out.argmax()) == int(test.y[i]) for i, out in enumerate(logits) if i % 3 == 0]
    assert sum(full) >= 6, full  # 8 full-length signals; the checkpoint's accuracy is ~0.9


OUTPUTS = {"vit": "logits", "vit-encoder": "pooled"}


def _vit(tmp_path: Path, head: bool) -> Path:
    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = (tf.ViTForImageClassification if head else tf.ViTModel)(config)
    model.save_pretrained(tmp_path / f"vit-src-{head}")
    net = retrofit(tmp_path / f"vit-src-{head}", {"dynamic_pruning_config": {"keep_ratio": 0.5}})
    out = tmp_path / "repo" / ("vit" if head else "vit-encoder")
    save_checkpoint(net, out)
    return out


def test_a_retrofitted_vit_serves_images_and_refuses_bad_ones_alone(tmp_path: Path) -> None:
    """A ViT classifier and a headless ViT behind one server: tritonclient sends FP32 images
    of the model's fixed shape (one and two per request), binary and JSON over HTTP, and gRPC,
    concurrently with malformed ones; every good one equals its solo forward, whatever it was
    batched with, and every bad one is a 400 naming its problem. Metadata shows the shape."""
    import tritonclient.grpc as triton_grpc

    references = {name: load_checkpoint(_vit(tmp_path, head))
                  for name, head in (("vit", True), ("vit-encoder", False))}
    rng = np.random.default_rng(0)

    def solo(name: str, images: np.ndarray) -> np.ndarray:
        reference = references[name]
        settings = settings_for(reference.config, "dynamic", keep_ratio=0.5)
        lengths = torch.full((images.shape[0],), 5)  # 4 patches and the CLS token, every row
        with torch.no_grad():
            return reference(torch.from_numpy(images), lengths, settings).logits.numpy()

    goods = []  # (model, images, expected)
    for i in range(12):
        name = "vit" if i % 3 else "vit-encoder"
        images = rng.standard_normal((1 + i % 2, 3, 16, 16)).astype(np.float32)
        goods.append((name, images, solo(name, images)))
    nan = np.zeros((1, 3, 16, 16), np.float32)
    nan[0, 1, 4, 4] = np.nan
    bads = [
        ({"pixel_values": np.zeros((1, 3, 14, 16), np.float32)},
         "input 'pixel_values' must be [batch, 3, 16, 16], got [1, 3, 14, 16]"),
        ({"pixel_values": np.zeros((1, 16, 16), np.float32)}, "got [1, 16, 16]"),
        ({"pixel_values": np.zeros((1, 3, 16, 16), np.float64)},
         "input 'pixel_values' must be FP32, got FP64"),
        ({"pixel_values": nan}, "input 'pixel_values' contains NaN or infinite values"),
        ({"input": np.zeros((1, 3, 16, 16), np.float32)},
         "unknown input 'input'; model 'vit' takes 'pixel_values'"),
        ({}, "missing input 'pixel_values'"),
    ]

    with serving(tmp_path / "repo", tmp_path, max_batch_size=8, max_queue_delay_ms=20) as srv:
        client = triton.InferenceServerClient(srv.address, concurrency=8)
        grpc_client = triton_grpc.InferenceServerClient(srv.grpc_address)
        for name, width in (("vit", 3), ("vit-encoder", 32)):
            meta = client.get_model_metadata(name)
            assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
                ("pixel_values", "FP32", [-1, 3, 16, 16])]
            assert meta["outputs"][0]["shape"] == [-1, width]
            grpc_meta = grpc_client.get_model_metadata(name)
            assert list(grpc_meta.inputs[0].shape) == [-1, 3, 16, 16]
            assert list(grpc_client.get_model_config(name).config.input[0].dims) == [3, 16, 16]
        assert meta["outputs"][0]["name"] == "pooled"
        holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # see above
        holder.sendall(b"POST /v2/models/vit/infer HTTP/1.1\r\nHost: t\r\n"
                       b"Content-Length: 1000\r\n\r\n{")
        sent = [(n, {"pixel_values": x}) for n, x, _ in goods] + [("vit", b) for b, _ in bads]
        pending = [(OUTPUTS[name], client.async_infer(name, inputs(triton, named, i % 2 == 0),
                                                      parameters={"keep_ratio": 0.5}))
                   for i, (name, named) in enumerate(sent)]  # binary and JSON
        results = []
        for output, request in pending:
            try:
                results.append(request.get_result().as_numpy(output))
            except InferenceServerException as err:
                results.append(str(err))
        holder.close()
        for (_, _, want), got in zip(goods, results, strict=False):
            assert not isinstance(got, str), got
            np.testing.assert_allclose(got, want, atol=1e-4)
        for (_, message), got in zip(bads, results[len(goods):], strict=True):
            assert isinstance(got, str) and message in got, (message, got)
        client.close()
        # Fewer batches than requests: images were computed together.
        assert metric(srv.url, "gated_batch_size_count", model="vit") < sum(
            n == "vit" for n, _, _ in goods)

        for name, images, want in goods[:2]:
            reply = grpc_client.infer(name, inputs(triton_grpc, {"pixel_values": images}),
                                      parameters={"keep_ratio": 0.5})
            np.testing.assert_allclose(reply.as_numpy(OUTPUTS[name]), want, atol=1e-4)
        for named, message in bads[:4]:
            with pytest.raises(triton_grpc.InferenceServerException, match=re.escape(message)):
                grpc_client.infer("vit", inputs(triton_grpc, named))
        grpc_client.close()
