"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package.

``seed`` is the dataset generation seed: 42 gives the standard 4000/1000 split; another seed
draws a fresh sample of the same distribution (a harder, unseen test set).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MNIST1D_STANDARD_SEED = 42


@dataclass(frozen=True)
class Split:
    """Sequences (N, T, 1) float32, labels (N,) int64 and lengths (N,) int64."""

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
