"""The shipped checkpoint keeps the accuracy the README states, in every gate mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import GateSettings, load_checkpoint
from models.data import load_mnist1d
from models.evaluate import EvalResult, evaluate

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "pretrained" / "mnist1d-conv"


@pytest.fixture(scope="module")
def results() -> dict[str, EvalResult]:
    model = load_checkpoint(SHIPPED)
    _, test = load_mnist1d()
    grid = {
        "dense": GateSettings("dense"),
        # the largest bucketed k whose executed FLOPs stay within each budget (see README)
        "dynamic@0.5": GateSettings("dynamic", keep_ratio=0.46, bucket=4),
        "dynamic@0.25": GateSettings("dynamic", keep_ratio=0.2, bucket=4),
        "static@0.5": GateSettings("static", keep_ratio=0.46, bucket=4),
    }
    return {name: evaluate(model, test, s) for name, s in grid.items()}


def test_shipped_checkpoint_is_small() -> None:
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size < 5 * 1024 * 1024


def test_dense_accuracy(results: dict[str, EvalResult]) -> None:
    assert results["dense"].accuracy >= 0.98
    assert results["dense"].flops_ratio == 1.0


def test_dynamic_within_half_a_point_at_half_the_flops(results: dict[str, EvalResult]) -> None:
    r = results["dynamic@0.5"]
    assert r.flops_ratio <= 0.5
    assert r.accuracy >= results["dense"].accuracy - 0.005


def test_dynamic_within_a_point_at_a_quarter_of_the_flops(results: dict[str, EvalResult]) -> None:
    r = results["dynamic@0.25"]
    assert r.flops_ratio <= 0.25
    assert r.accuracy >= results["dense"].accuracy - 0.010


def test_static_mode_executes_what_it_reports(results: dict[str, EvalResult]) -> None:
    r = results["static@0.5"]
    assert r.flops_ratio == pytest.approx(results["dynamic@0.5"].flops_ratio, abs=0.01)
    assert 0.4 < r.active_channel_ratio <= 0.5


def test_shipped_checkpoint_records_its_mac_count() -> None:
    """The server loads the shipped model without running torch's FLOP counter."""
    assert "_mac_model" in load_checkpoint(SHIPPED).__dict__
