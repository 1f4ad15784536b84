"""Fit the gates of a network whose base stays frozen: predictor fitting by distillation.

    gated fit --checkpoint DIR --out DIR2 [--epochs 5] [--static-gates] [--data file.npz]

For a pretrained or retrofitted network (``gated retrofit``) the base weights are what users
trust; only the gates learn. Each step runs the frozen network in ``dense`` mode as the teacher
(no gradient) and the gated forward at a keep ratio drawn from ``keep_ratios`` with the serving
keep policy, straight-through (docs/gates.md §4), as the student; the loss is the KL divergence
from teacher to student at ``temperature`` (plus ``label_weight`` · cross-entropy where the data
has labels) plus ``dynamic_l1_weight`` · L1 of the predictors. Only the predictors train, and
with ``static_gates`` the static gates too (HardConcrete samples, the config's temperature
schedule); every other parameter is frozen and left bit-identical, dropout and norms stay in
evaluation mode. The report has dense / static / dynamic accuracy and FLOPs on the test split.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.config import GATE_MODES
from models.data import Split
from models.evaluate import evaluate
from models.gate_config import GateSettings
from models.gates import settings_for, temperature_at
from models.networks import GatedNetwork
from models.train import _distill

logger = logging.getLogger(__name__)


@dataclass
class FitReport:
    """What fitting measured; saved as checkpoint metadata and printed by the CLI."""

    seconds: float
    steps: int
    trained_params: int
    frozen_params: int
    distill_loss_first_epoch: float  # training batches, keep ratios as sampled
    distill_loss_last_epoch: float
    # On the test split, mean over keep_ratios (eval mode): what fitting is for.
    test_distill_before: float = 0.0
    test_distill_after: float = 0.0
    test: dict[str, dict[str, object]] = field(default_factory=dict)


def fit(
    model: GatedNetwork,
    train_set: Split,
    test_set: Split,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    keep_ratios: Sequence[float] = (1.0, 0.5, 0.25),
    static_gates: bool = False,
    predictors: bool = True,
    temperature: float = 2.0,
    label_weight: float = 0.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[GatedNetwork, FitReport]:
    """Fit ``model``'s predictors (and static gates with ``static_gates``) in place; see the
    module docstring. ``predictors=False`` fits the static gates alone, the student running in
    ``static`` mode: one channel subset for every input (the baseline dynamic gating is
    measured against). Saves a checkpoint to ``out_dir`` when given."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or not keep_ratios:
        raise ValueError("fit: epochs and batch_size must be >= 1, lr > 0, keep_ratios not empty")
    if not predictors and not static_gates:
        raise ValueError("fit: nothing to fit (predictors off and static gates off)")
    gates = [gate for _, gate in model.dynamic_gates()]
    if predictors and (not gates or all(gate.predictor is None for gate in gates)):
        raise ValueError("fit: the network has no predictor to fit (use_input_gating is off)")
    device = next(model.parameters()).device
    student_mode = "dynamic" if predictors else "static"
    trained = [p for p in model.predictor_parameters()] if predictors else []
    if static_gates:
        trained += [p for g in model.static_gates() for p in g.parameters()]
    ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in ids]
    for p in frozen:
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    cfg = model.config
    bucket = cfg.dynamic_pruning_config.bucket
    l1 = cfg.dynamic_l1_weight
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(trained, lr=lr)
    x_all, y_all, len_all = (t.to(device) for t in (train_set.x, train_set.y, train_set.lengths))
    labelled = bool((y_all >= 0).all())
    n = len(train_set)
    steps_per_epoch = -(-n // batch_size)
    dynamic_modes = [(g, g.dynamic_mode) for g in gates]
    before = _test_distill(model, test_set, keep_ratios, bucket, temperature, batch_size,
                           student_mode)
    started = time.monotonic()
    epoch_losses: list[float] = []
    step = 0
    bar = tqdm(total=epochs * steps_per_epoch, desc="fit", unit="step", disable=not progress,
               leave=False)
    try:
        model.eval()  # the frozen base: no dropout, running norms
        for gate in gates:
            gate.dynamic_mode = predictors  # the predictor path, straight-through
            gate.train()
            if not static_gates:
                gate.static_gate.eval()  # deterministic static values
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                x, y, lengths = x_all[idx], y_all[idx], len_all[idx]
                if static_gates:
                    beta = temperature_at(step, cfg.temperature, cfg.temperature_decay,
                                          cfg.temperature_decay_freq, cfg.min_temperature)
                    for static in model.static_gates():
                        static.set_temperature(beta)
                with torch.no_grad():
                    teacher = model(x, lengths, GateSettings(mode="dense")).logits
                settings = GateSettings(mode=student_mode,
                                        keep_ratio=rng.choice(list(keep_ratios)), bucket=bucket)
                student = model(x, lengths, settings).logits
                distill = _distill(student, teacher, temperature)
                loss = distill
                if label_weight and labelled:
                    loss = loss + label_weight * F.cross_entropy(student, y)
                if l1 and predictors:  # frozen predictors: a constant, no gradient
                    loss = loss + l1 * sum(p.abs().sum() for p in model.predictor_parameters())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += distill.item() * len(idx)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, distill=f"{total / min(n, start + len(idx)):.4f}")
            epoch_losses.append(total / n)
            logger.info("fit epoch %d/%d distillation loss %.5f", epoch + 1, epochs,
                        epoch_losses[-1])
    finally:
        bar.close()
        for gate, was in dynamic_modes:
            gate.dynamic_mode = was
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    report = FitReport(
        seconds=round(time.monotonic() - started, 1),
        steps=step,
        trained_params=sum(p.numel() for p in trained),
        frozen_params=sum(p.numel() for p in frozen),
        distill_loss_first_epoch=round(epoch_losses[0], 6),
        distill_loss_last_epoch=round(epoch_losses[-1], 6),
        test_distill_before=round(before, 6),
        test_distill_after=round(
            _test_distill(model, test_set, keep_ratios, bucket, temperature, batch_size,
                          student_mode), 6
        ),
    )
    if bool((test_set.y >= 0).all()):
        with torch.no_grad():
            for mode in GATE_MODES:
                report.test[mode] = evaluate(model, test_set, settings_for(cfg, mode)).as_dict()
    if out_dir is not None:
        save_checkpoint(model, out_dir, metadata={"fit": report.__dict__})
    return model, report


def _test_distill(
    model: GatedNetwork, split: Split, keep_ratios: Sequence[float], bucket: int,
    temperature: float, batch_size: int, mode: str = "dynamic",
) -> float:
    """KL from the dense forward to the ``mode`` one on ``split``, mean over ``keep_ratios``."""
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            x = split.x[start : start + batch_size].to(device)
            lengths = split.lengths[start : start + batch_size].to(device)
            teacher = model(x, lengths, GateSettings(mode="dense")).logits
            for ratio in keep_ratios:
                settings = GateSettings(mode=mode, keep_ratio=ratio, bucket=bucket)
                student = model(x, lengths, settings).logits
                total += _distill(student, teacher, temperature).item() * len(x)
    return total / (len(split) * len(keep_ratios))
