"""Tensor files (.npz, .safetensors) as training and evaluation data: keys, masks, lengths,
splits, the errors that name what is wrong, and `gated train` / `gated evaluate` on one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from models import ConfigError, ModelConfig, parse_config
from models.data import DataError, load_dataset, load_tensor_file
from service.cli import main


def _rows(n: int = 30, t: int = 12, c: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, t) if c is None else (n, t, c)).astype(np.float32)


def test_npz_with_a_mask_gives_lengths_and_zero_padding(tmp_path: Path) -> None:
    x = _rows(4, 6)
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], np.int64)
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.array([0, 1, 2, 3]), mask=mask)
    split = load_tensor_file(tmp_path / "d.npz", in_channels=1, max_length=6, num_classes=4)
    assert split.x.shape == (4, 6, 1) and split.x.dtype == torch.float32
    assert split.lengths.tolist() == [6, 3, 1, 5]
    assert split.y.tolist() == [0, 1, 2, 3]
    # What the server would send: the valid steps, zeros after them.
    np.testing.assert_array_equal(split.x[1, :3, 0].numpy(), x[1, :3])
    assert not split.x[1, 3:].any() and not split.x[2, 1:].any()


def test_safetensors_with_channels_and_lengths(tmp_path: Path) -> None:
    x = _rows(5, 8, 3)
    save_file({"inputs": x, "labels": np.arange(5, dtype=np.int64),
               "lengths": np.array([8, 7, 2, 8, 1], np.int64)}, str(tmp_path / "d.safetensors"))
    split = load_tensor_file(tmp_path / "d.safetensors", in_channels=3)
    assert split.x.shape == (5, 8, 3) and split.lengths.tolist() == [8, 7, 2, 8, 1]
    unlabelled = tmp_path / "u.safetensors"
    save_file({"inputs": x}, str(unlabelled))
    assert load_tensor_file(unlabelled).y.tolist() == [-1] * 5


@pytest.mark.parametrize(
    ("arrays", "kwargs", "message"),
    [
        ({"x": _rows()}, {}, "no 'inputs'"),
        ({"inputs": np.zeros((3,), np.float32)}, {}, "'inputs' must be (N, T) or (N, T, C)"),
        ({"inputs": _rows(c=2)}, {"in_channels": 1}, "2 channels; the model takes 1"),
        ({"inputs": _rows(t=50)}, {"max_length": 40}, "50 steps; the model's max_length is 40"),
        ({"inputs": np.full((2, 3), np.nan, np.float32)}, {}, "NaN or infinite"),
        ({"inputs": _rows(3), "labels": np.array([0, 1, 9])}, {"num_classes": 5},
         "'labels' must lie in [0, 5), got [0, 9]"),
        ({"inputs": _rows(3), "labels": np.array([0.5, 1, 2])}, {}, "'labels' must be (3,) int"),
        ({"inputs": _rows(2, 3), "mask": np.array([[1, 0, 1], [1, 1, 1]])}, {},
         "'mask' row 0 is not 1s followed by 0s"),
        ({"inputs": _rows(2, 3), "mask": np.ones((2, 4))}, {}, "'mask' must be (2, 3)"),
        ({"inputs": _rows(2, 3), "lengths": np.array([0, 3])}, {}, "lengths must lie in [1, 3]"),
        ({"inputs": _rows(2, 3), "lengths": np.array([1, 2]), "mask": np.ones((2, 3))}, {},
         "'lengths' or 'mask', not both"),
    ],
)
def test_bad_files_name_the_key(
    tmp_path: Path, arrays: dict[str, np.ndarray], kwargs: dict[str, int], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_tensor_file(path, **kwargs)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_tensor_file(tmp_path / "absent.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="use .npz or .safetensors"):
        load_tensor_file(tmp_path / "d.csv")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable .npz"):
        load_tensor_file(tmp_path / "broken.npz")


def _cfg(data: dict[str, object], epochs: int = 1) -> ModelConfig:
    return parse_config({
        "dynamic_pruning_config": {"bucket": 2},
        "model": {"channels": 8, "hidden": 16, "num_blocks": 1, "norm": "layer",
                  "num_classes": 10, "max_length": 40},
        "data": data,
        "training": {"epochs": epochs, "batch_size": 64, "dense_warmup_epochs": 0},
    }, "config")


def test_a_file_is_split_by_seed_or_paired_with_a_test_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=_rows(50, 10), labels=np.arange(50) % 10)
    cfg = _cfg({"dataset": "file", "path": str(tmp_path / "d.npz"), "test_fraction": 0.2})
    train, test = load_dataset(cfg)
    assert (len(train), len(test)) == (40, 10)
    rows = {tuple(r) for r in train.x[:, :, 0].tolist()}
    assert not rows & {tuple(r) for r in test.x[:, :, 0].tolist()}  # disjoint
    again, _ = load_dataset(cfg)
    assert torch.equal(again.x, train.x)  # the seed decides
    np.savez(tmp_path / "t.npz", inputs=_rows(7, 10, seed=1), labels=np.arange(7))
    paired = _cfg({"dataset": "file", "path": str(tmp_path / "d.npz"),
                   "test_path": str(tmp_path / "t.npz")})
    train, test = load_dataset(paired)
    assert (len(train), len(test)) == (50, 7)


def test_the_data_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="dataset 'file' needs path"):
        _cfg({"dataset": "file"})
    with pytest.raises(ConfigError, match="path and test_path are for dataset 'file'"):
        _cfg({"dataset": "mnist1d", "path": "x.npz"})
    with pytest.raises(ConfigError, match="dataset"):
        _cfg({"dataset": "imagenet"})


def test_gated_train_and_evaluate_on_a_tensor_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's data without code: a two-class problem (the sign of a row's mean) with
    variable lengths, in an .npz, trained and evaluated through the CLI."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=800)
    x = (rng.standard_normal((800, 20)) + (2.0 * labels - 1.0)[:, None]).astype(np.float32)
    lengths = rng.integers(10, 21, size=800)
    np.savez(tmp_path / "mine.npz", inputs=x, labels=labels, lengths=lengths)
    cfg = _cfg({"dataset": "file", "path": str(tmp_path / "mine.npz")}, epochs=3)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "ckpt"),
                 "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["dense_accuracy"] > 0.8  # chance is 0.5
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(trained["dynamic_accuracy"])
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data-seed", "7"]) == 2
    assert "--data-seed is for MNIST-1D" in capsys.readouterr().err
    # Unlabelled data cannot train from labels: one line, exit 2.
    np.savez(tmp_path / "nolabels.npz", inputs=x)
    unlabelled = _cfg({"dataset": "file", "path": str(tmp_path / "nolabels.npz")})
    config.write_text(json.dumps(unlabelled.model_dump(mode="json")))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "has no 'labels'" in capsys.readouterr().err
