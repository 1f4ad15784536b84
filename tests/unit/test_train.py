"""Training on real MNIST-1D with a tiny network: determinism, schedule, objective terms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import ModelConfig, load_checkpoint, read_metadata
from models.data import load_mnist1d
from models.gates import temperature_at
from models.train import expected_sparsity, train


def tiny_cfg(**training: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "temperature_decay": 0.5,
            "temperature_decay_freq": 4,
            "dynamic_pruning_config": {"bucket": 2},
            "model": {"channels": 8, "hidden": 16, "num_blocks": 1, "norm": "layer"},
            "training": {"epochs": 1, "batch_size": 256, "dense_warmup_epochs": 0, **training},
        }
    )


def test_mnist1d_splits() -> None:
    train_set, test_set = load_mnist1d(42)
    assert (len(train_set), len(test_set)) == (4000, 1000)
    assert train_set.x.shape == (4000, 40, 1) and train_set.x.dtype == torch.float32
    assert set(test_set.y.unique().tolist()) == set(range(10))
    _, other = load_mnist1d(7)
    assert not torch.equal(other.x, test_set.x)


def test_training_is_deterministic_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=3)
    a, report = train(cfg, tmp_path / "a", progress=False)
    b, _ = train(cfg, None, progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert report.steps == 48  # 3 · ceil(4000 / 256)
    # β follows docs/gates.md §1 and is saved: the last step is 47.
    loaded = load_checkpoint(tmp_path / "a")
    beta = temperature_at(47, 1.0, 0.5, 4, 0.1)
    assert [g.beta.item() for g in loaded.static_gates()] == pytest.approx([beta])
    meta = read_metadata(tmp_path / "a")
    assert set(meta["train"]["test"]) == {"dense", "static", "dynamic"}  # type: ignore[index]
    assert report.test["dense"]["accuracy"] > 0.15  # chance is 0.1


def test_lagrangian_drives_sparsity_toward_target() -> None:
    cfg = tiny_cfg(
        epochs=4, target_sparsity=0.5, sparsity_warmup_epochs=1, gate_lr=0.2, lagrangian_lr=0.2
    )
    model, _ = train(cfg, None, progress=False)
    assert expected_sparsity(model).item() > 0.25
    # Static gates train without dynamic pruning too (final = static, docs/gates.md §3).
    static_only = cfg.model_copy(update={"use_dynamic_pruning": False})
    assert expected_sparsity(train(static_only, None, progress=False)[0]).item() > 0.25
    assert expected_sparsity(train(tiny_cfg(epochs=4), None, progress=False)[0]).item() < 0.05


def test_predictor_l1_shrinks_predictor_weights() -> None:
    def predictor_norm(weight: float) -> float:
        cfg = tiny_cfg(epochs=2).model_copy(update={"dynamic_l1_weight": weight})
        model, _ = train(cfg, None, progress=False)
        return sum(p.abs().sum().item() for p in model.predictor_parameters())

    assert predictor_norm(0.05) < 0.85 * predictor_norm(0.0)
