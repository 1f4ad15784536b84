"""Fitting the gates on a frozen base: only predictors (and static gates if asked) change, the
distillation loss falls, the report and checkpoint follow, and `gated fit` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_checkpoint, save_checkpoint
from models.data import load_mnist1d
from models.fit import fit
from models.train import train
from service.cli import main
from tests.unit.test_train import tiny_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network trained dense (no gating epochs), whose predictors then start random."""
    model, _ = train(tiny_cfg(epochs=2, dense_warmup_epochs=2), None, progress=False)
    with torch.no_grad():
        for p in model.predictor_parameters():
            p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(model, out)
    return out


def _split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pred = {id(p) for p in model.predictor_parameters()}  # type: ignore[operator]
    static = {id(p) for g in model.static_gates() for p in g.parameters()}  # type: ignore[operator]
    base, gates = {}, {}
    for name, p in model.named_parameters():
        (gates if id(p) in pred | static else base)[name] = p.detach().clone()
    return base, gates


def test_only_the_predictors_learn_and_the_distillation_loss_falls(trained: Path) -> None:
    model = load_checkpoint(trained)
    base_before, gates_before = _split(model)
    train_set, test_set = load_mnist1d(42)
    small = type(train_set)(train_set.x[:1024], train_set.y[:1024], train_set.lengths[:1024])
    model, report = fit(model, small, test_set, epochs=3, batch_size=128, progress=False)
    base_after, gates_after = _split(model)
    for name, value in base_before.items():
        assert torch.equal(value, base_after[name]), f"{name} changed: the base must be frozen"
    pred_names = [n for n in gates_before if "predictor" in n]
    assert pred_names and all(not torch.equal(gates_before[n], gates_after[n]) for n in pred_names)
    static_names = [n for n in gates_before if n not in pred_names]
    assert all(torch.equal(gates_before[n], gates_after[n]) for n in static_names)
    assert report.test_distill_after < report.test_distill_before
    assert set(report.test) == {"dense", "static", "dynamic"}
    assert report.trained_params < report.frozen_params
    assert all(p.requires_grad for p in model.parameters())  # left as it was found


def test_static_gates_train_when_asked(trained: Path) -> None:
    model = load_checkpoint(trained)
    _, gates_before = _split(model)
    train_set, test_set = load_mnist1d(42)
    small = type(train_set)(train_set.x[:512], train_set.y[:512], train_set.lengths[:512])
    fit(model, small, test_set, epochs=1, static_gates=True, progress=False)
    _, gates_after = _split(model)
    static_names = [n for n in gates_before if "predictor" not in n]
    assert static_names and any(not torch.equal(gates_before[n], gates_after[n])
                                for n in static_names)


def test_gated_fit_cli_on_a_tensor_file(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_set, _ = load_mnist1d(42)
    np.savez(tmp_path / "mine.npz", inputs=train_set.x[:600, :, 0].numpy(),
             labels=train_set.y[:600].numpy())
    out = tmp_path / "fitted"
    assert main(["fit", "--checkpoint", str(trained), "--out", str(out), "--data",
                 str(tmp_path / "mine.npz"), "--epochs", "2", "--keep-ratios", "0.5,0.25",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 * 4  # 480 training rows (the rest is the test split) / 128
    assert summary["test_distill_after"] < summary["test_distill_before"]
    assert {"dense_accuracy", "static_accuracy", "dynamic_accuracy"} <= set(summary)
    assert load_checkpoint(out).config == load_checkpoint(trained).config
    with pytest.raises(SystemExit) as exited:  # argparse: usage and the reason, exit 2
        main(["fit", "--checkpoint", str(trained), "--out", str(out), "--keep-ratios", "0,2"])
    assert exited.value.code == 2
    assert "keep ratios must lie in (0, 1]" in capsys.readouterr().err
