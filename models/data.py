"""Training and evaluation data: MNIST-1D, or a tensor file of the user's own.

MNIST-1D (Greydanus 2020) is generated offline by the ``mnist1d`` package. ``seed`` is the
dataset generation seed: 42 gives the standard 4000/1000 split; another seed draws a fresh
sample of the same distribution (a harder, unseen test set).

A **tensor file** (``data: {dataset: file, path: ...}``) is an ``.npz`` (numpy) or
``.safetensors`` file holding:

- ``inputs``: (N, T) or (N, T, C) floats, zero padded past each row's length; for a model
  whose first input is token ids (a retrofitted BERT), (N, T) integer ids; for a model whose
  input has a fixed shape (a retrofitted ViT's [batch, 3, H, W]), (N, 3, H, W) numbers of
  exactly that shape (read as float32), with neither ``lengths`` nor ``mask``;
- ``labels``: (N,) integers in [0, num_classes) (required to train from labels);
- optionally ``lengths`` (N,) integers in [1, T], or ``mask`` (N, T) of 1s then 0s (a row's
  valid steps); neither: every row is T long.

Everything is checked when loaded, and a problem is a :class:`DataError` naming the file, the
key and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.contract import TensorSpec
from models.errors import ConfigError

if TYPE_CHECKING:
    from models.config import DataConfig, ModelConfig

MNIST1D_STANDARD_SEED = 42


@dataclass(frozen=True)
class Split:
    """Inputs (N, T, C) float32 (or (N, T) token ids, or (N, *shape) of a fixed-shape input),
    labels (N,) int64 and lengths (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@lru_cache(maxsize=4)
def _generate(seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    return make_dataset(args)  # type: ignore[no-any-return]


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(-1)
    lengths = torch.full((xt.shape[0],), xt.shape[1], dtype=torch.int64)
    return Split(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), lengths)


def load_mnist1d(seed: int = MNIST1D_STANDARD_SEED) -> tuple[Split, Split]:
    """(train, test) splits of MNIST-1D generated with ``seed`` (4000 / 1000 sequences, T 40)."""
    data = _generate(seed)
    return _split(data["x"], data["y"]), _split(data["x_test"], data["y_test"])


class DataError(ConfigError):
    """A dataset cannot be used as given; the message names the file and the key."""


def load_tensor_file(
    path: str | Path, in_channels: int | None = None, max_length: int | None = None,
    num_classes: int | None = None, tokens: TensorSpec | None = None,
    fixed: TensorSpec | None = None,
) -> Split:
    """One split from an ``.npz`` or ``.safetensors`` tensor file (see the module docstring).

    ``in_channels``, ``max_length`` and ``num_classes`` are the model's, checked when given.
    ``tokens``: the model's first input when it takes integers (token ids): ``inputs`` must then
    be (N, T) integers within its value range, padded with its pad value, kept as int64.
    ``fixed``: the model's input when it has a fixed shape (FP32, no length): ``inputs`` must
    be (N, *shape) exactly, and every row is ``max_length`` (required then) steps long.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    where = str(path)
    if "inputs" not in arrays:
        raise DataError(f"{where}: no 'inputs' (keys: {sorted(arrays)})")
    if fixed is not None:
        if max_length is None:
            raise ValueError("a fixed-shape input needs the model's max_length (its rows' steps)")
        return _fixed_split(arrays, where, max_length, num_classes, fixed)
    if tokens is not None:
        return _token_split(arrays, where, max_length, num_classes, tokens)
    x = arrays["inputs"]
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{where}: 'inputs' must be (N, T) or (N, T, C) with N, T >= 1, got "
                        f"shape {list(arrays['inputs'].shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{where}: 'inputs' must hold numbers, got {x.dtype}")
    n, t, c = x.shape
    if in_channels is not None and c != in_channels:
        raise DataError(f"{where}: 'inputs' has {c} channels; the model takes {in_channels}")
    _check_steps(t, max_length, where)
    x = _finite_floats(x, where)
    lengths = _lengths(arrays, n, t, where)
    x[np.arange(t)[None, :] >= lengths[:, None]] = 0.0  # padding is zeros, as the server's
    return Split(torch.from_numpy(x), _labels(arrays, n, where, num_classes),
                 torch.from_numpy(lengths))


def _token_split(arrays: dict[str, np.ndarray], where: str, max_length: int | None,
                 num_classes: int | None, spec: TensorSpec) -> Split:
    x = arrays["inputs"]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or not np.issubdtype(x.dtype,
                                                                              np.integer):
        raise DataError(f"{where}: 'inputs' must be (N, T) integer token ids with N, T >= 1 "
                        f"(the model's {spec.name!r}), got shape {list(x.shape)} of {x.dtype}")
    n, t = x.shape
    _check_steps(t, max_length, where)
    x = np.array(x, dtype=np.int64)
    lengths = _lengths(arrays, n, t, where)
    valid = np.arange(t)[None, :] < lengths[:, None]
    if spec.value_range is not None:
        low, high = spec.value_range
        ids = x[valid]
        if ids.size and (int(ids.min()) < low or int(ids.max()) > high):
            raise DataError(f"{where}: 'inputs' holds ids in [{int(ids.min())}, "
                            f"{int(ids.max())}]; the model accepts [{low}, {high}]")
    x[~valid] = int(spec.pad_value)  # padding is the pad token, as the server's
    return Split(torch.from_numpy(x), _labels(arrays, n, where, num_classes),
                 torch.from_numpy(lengths))


def _fixed_split(arrays: dict[str, np.ndarray], where: str, steps: int,
                 num_classes: int | None, spec: TensorSpec) -> Split:
    x = arrays["inputs"]
    if x.ndim != len(spec.shape) or x.shape[1:] != spec.shape[1:] or x.shape[0] == 0:
        raise DataError(f"{where}: 'inputs' must be {_rows_of(spec)} with N >= 1 (the model's "
                        f"{spec.name!r}, a fixed shape), got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{where}: 'inputs' must hold numbers, got {x.dtype}")
    for key in ("lengths", "mask"):
        if key in arrays:
            raise DataError(f"{where}: {key!r} does not apply: the model's {spec.name!r} has a "
                            "fixed shape, every row is whole")
    x = _finite_floats(x, where)
    n = x.shape[0]
    return Split(torch.from_numpy(x), _labels(arrays, n, where, num_classes),
                 torch.full((n,), steps, dtype=torch.int64))


def _rows_of(spec: TensorSpec) -> str:
    """The (N, ...) shape a tensor file holds for a fixed-shape input."""
    return "(" + ", ".join(["N", *(str(d) for d in spec.shape[1:])]) + ")"


def _finite_floats(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as contiguous float32, refused if any value is NaN or infinite."""
    out = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{where}: 'inputs' holds NaN or infinite values")
    return out


def _check_steps(t: int, max_length: int | None, where: str) -> None:
    if max_length is not None and t > max_length:
        raise DataError(f"{where}: 'inputs' has {t} steps; the model's max_length is {max_length}")


def _labels(arrays: dict[str, np.ndarray], n: int, where: str,
            num_classes: int | None) -> torch.Tensor:
    if "labels" in arrays:
        y = arrays["labels"]
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: 'labels' must be ({n},) integers, got shape "
                            f"{list(y.shape)} of {y.dtype}")
        top = num_classes if num_classes is not None else np.iinfo(np.int64).max
        if int(y.min()) < 0 or int(y.max()) >= top:
            raise DataError(f"{where}: 'labels' must lie in [0, {top}), got "
                            f"[{int(y.min())}, {int(y.max())}]")
        return torch.from_numpy(y.astype(np.int64))
    return torch.full((n,), -1, dtype=torch.int64)  # unlabelled: -1


def _input_kind(first_input: TensorSpec | None) -> tuple[TensorSpec | None, TensorSpec | None]:
    """(tokens, fixed): ``first_input`` where it is integer ids, where it has a fixed shape
    (float only: a tensor file cannot give others)."""
    fixed = first_input if first_input is not None and first_input.length_dim is None else None
    if fixed is not None and fixed.datatype != "FP32":
        raise DataError(f"the model's {fixed.name!r} is {fixed.datatype} of a fixed shape: "
                        "tensor files give fixed-shape inputs as floats only")
    tokens = first_input if first_input is not None and first_input.datatype != "FP32" else None
    return tokens, fixed


def refuse_mnist1d(first_input: TensorSpec | None) -> None:
    """Raise DataError saying why MNIST-1D cannot feed a model whose first input is
    ``first_input`` (token ids, a fixed shape); nothing for a float signal."""
    tokens, fixed = _input_kind(first_input)
    if fixed is not None:
        raise DataError(f"MNIST-1D is a float signal of 40 steps; the model takes "
                        f"{fixed.name!r} {fixed.datatype} of a fixed shape: give a tensor "
                        f"file of {_rows_of(fixed)} inputs")
    if tokens is not None:
        raise DataError(f"MNIST-1D is a float signal; the model takes {tokens.name!r} "
                        f"{tokens.datatype}: give a tensor file of token ids")


def load_dataset(cfg: ModelConfig, first_input: TensorSpec | None = None) -> tuple[Split, Split]:
    """(train, test) splits of ``cfg.data``: MNIST-1D, or the tensor file(s) it names.
    ``first_input``: the model's first input (its contract's); integer ones read token ids,
    fixed-shape ones (an image) rows of exactly their shape."""
    data: DataConfig = cfg.data
    tokens, fixed = _input_kind(first_input)
    if data.dataset == "mnist1d":
        refuse_mnist1d(first_input)
        return load_mnist1d(data.seed)
    m = cfg.model
    assert data.path is not None  # DataConfig requires it
    train = load_tensor_file(data.path, m.in_channels, m.max_length, m.num_classes, tokens, fixed)
    if data.test_path is not None:
        return train, load_tensor_file(data.test_path, m.in_channels, m.max_length,
                                       m.num_classes, tokens, fixed)
    n = len(train)
    n_test = max(1, round(n * data.test_fraction))
    if n - n_test < 1:
        raise DataError(f"{data.path}: {n} rows cannot be split into train and test; give "
                        "test_path or more rows")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data.seed))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return _take(train, train_idx), _take(train, test_idx)


def _take(split: Split, idx: torch.Tensor) -> Split:
    return Split(split.x[idx], split.y[idx], split.lengths[idx])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable {suffix} file: {err}") from None
    raise DataError(f"{path}: unknown tensor file type {suffix!r}; use .npz or .safetensors")


def _lengths(arrays: dict[str, np.ndarray], n: int, t: int, where: str) -> np.ndarray:
    if "lengths" in arrays and "mask" in arrays:
        raise DataError(f"{where}: give 'lengths' or 'mask', not both")
    if "mask" in arrays:
        mask = arrays["mask"]
        if mask.shape != (n, t):
            raise DataError(f"{where}: 'mask' must be ({n}, {t}) like 'inputs', got "
                            f"{list(mask.shape)}")
        valid = mask != 0
        lengths = valid.sum(1).astype(np.int64)
        prefix = np.arange(t)[None, :] < lengths[:, None]
        if not np.array_equal(valid, prefix):
            row = int(np.nonzero((valid != prefix).any(1))[0][0])
            raise DataError(f"{where}: 'mask' row {row} is not 1s followed by 0s")
    elif "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
            raise DataError(f"{where}: 'lengths' must be ({n},) integers, got shape "
                            f"{list(lengths.shape)} of {lengths.dtype}")
        lengths = lengths.astype(np.int64)
    else:
        return np.full(n, t, dtype=np.int64)
    if int(lengths.min()) < 1 or int(lengths.max()) > t:
        raise DataError(f"{where}: lengths must lie in [1, {t}], got [{int(lengths.min())}, "
                        f"{int(lengths.max())}]")
    return np.asarray(lengths, dtype=np.int64)
