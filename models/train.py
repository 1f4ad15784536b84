"""Train a gated network on MNIST-1D.

    gated train --config models/configs/mnist1d_conv.yaml --out runs/conv

Each step runs two passes over the batch (the sandwich rule of slimmable networks):

1. the **dense** pass (gates ignored) trains the unpruned baseline that ``dense`` mode serves;
2. after ``dense_warmup_epochs``, the **gated** pass with stochastic static gates, the predictor
   (when ``dynamic_mode``) and the serving keep policy at a keep ratio sampled from
   ``train_keep_ratios``, straight-through (docs/gates.md §4), distilled from the dense pass.

The objective is docs/gates.md §5: task loss + Lagrangian sparsity loss (λ1, λ2 by gradient ascent,
target warmed up linearly from 0) + ``dynamic_l1_weight`` · L1 of the predictor's parameters;
HardConcrete temperatures follow the docs/gates.md §1 schedule per optimizer step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import resolve_device, save_checkpoint
from models.config import GATE_MODES, ModelConfig
from models.data import DataError, load_dataset
from models.evaluate import evaluate
from models.gate_config import GateSettings
from models.gates import StaticGate, settings_for, temperature_at
from models.networks import GatedNetwork, build_network

logger = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What training measured; saved as checkpoint metadata and printed by the CLI."""

    seconds: float
    steps: int
    params: int
    test: dict[str, dict[str, object]] = field(default_factory=dict)


def expected_sparsity(model: GatedNetwork) -> torch.Tensor:
    """ŝ: expected fraction of closed structures over every static gate (docs/gates.md §5)."""
    open_, total = [], 0
    for gate in model.static_gates():
        open_.append(gate.expected_l0())
        total += gate_size(gate)
    if not open_:
        return torch.zeros(())
    return 1.0 - torch.stack(open_).sum() / total


def gate_size(gate: StaticGate) -> int:
    return int(next(gate.parameters()).numel())


def _split_parameters(
    model: GatedNetwork,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gate_ids = {id(p) for g in model.static_gates() for p in g.parameters()}
    pred_ids = {id(p) for p in model.predictor_parameters()}
    weights, gates, preds = [], [], []
    for p in model.parameters():
        if id(p) in gate_ids:
            gates.append(p)
        elif id(p) in pred_ids:
            preds.append(p)
        else:
            weights.append(p)
    return weights, gates, preds


def _distill(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(student / tau, -1),
            F.log_softmax(teacher.detach() / tau, -1),
            log_target=True,
            reduction="batchmean",
        )
        * tau
        * tau
    )


def train(
    cfg: ModelConfig,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[GatedNetwork, TrainReport]:
    """Train ``cfg`` from scratch; save a checkpoint to ``out_dir`` when given."""
    tc = cfg.training
    dev = resolve_device(device)
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    train_set, test_set = load_dataset(cfg)
    for name, split in (("training", train_set), ("test", test_set)):
        if bool((split.y < 0).any()):
            raise DataError(f"the {name} data has no 'labels': gated train fits to labels")
    model = build_network(cfg).to(dev)
    weights, gates, preds = _split_parameters(model)
    optimizer = torch.optim.AdamW(
        [
            {"params": weights, "weight_decay": tc.weight_decay},
            {"params": preds, "weight_decay": 0.0},  # regularised by the explicit L1 instead
        ],
        lr=tc.lr,
    )
    gate_opt = torch.optim.Adam(gates, lr=tc.gate_lr) if gates else None
    lambdas = torch.zeros(2, device=dev, requires_grad=True)
    # Gradient ascent on the multipliers: the Lagrangian is a min-max problem (CoFi, DPHuBERT).
    lambda_opt = torch.optim.Adam([lambdas], lr=tc.lagrangian_lr, maximize=True)

    n = len(train_set)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=tc.lr, total_steps=total_steps, pct_start=0.15
    )
    gating_start = tc.dense_warmup_epochs * steps_per_epoch
    warmup_steps = max(1, int(tc.sparsity_warmup_epochs * steps_per_epoch))
    keep_choices = tc.train_keep_ratios or [cfg.dynamic_pruning_config.keep_ratio or 1.0]
    bucket = cfg.dynamic_pruning_config.bucket
    l1 = cfg.dynamic_l1_weight
    gen = torch.Generator().manual_seed(tc.seed)
    x_all, y_all, len_all = (t.to(dev) for t in (train_set.x, train_set.y, train_set.lengths))

    started = time.monotonic()
    step = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, leave=False)
    for epoch in range(tc.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(dev)
        seen = correct = 0
        loss_sum = 0.0
        for start in range(0, n, tc.batch_size):
            idx = order[start : start + tc.batch_size]
            x, y, lengths = x_all[idx], y_all[idx], len_all[idx]
            beta = temperature_at(
                step,
                cfg.temperature,
                cfg.temperature_decay,
                cfg.temperature_decay_freq,
                cfg.min_temperature,
            )
            for gate in model.static_gates():
                gate.set_temperature(beta)

            dense = model(x, lengths, GateSettings(mode="dense"))
            loss = F.cross_entropy(dense.logits, y)
            sparsity = torch.zeros((), device=dev)
            # The gated pass trains the static gates too (docs/gates.md §3: without dynamic pruning,
            # final = static), so it runs whatever use_dynamic_pruning says.
            if step >= gating_start:
                ratio = rng.choice(keep_choices)
                settings = GateSettings(mode="dynamic", keep_ratio=ratio, bucket=bucket)
                out = model(x, lengths, settings)
                loss = loss + tc.gated_task_weight * F.cross_entropy(out.logits, y)
                if tc.distill_weight:
                    loss = loss + tc.distill_weight * _distill(
                        out.logits, dense.logits, tc.distill_temperature
                    )
                sparsity = expected_sparsity(model)
                target = tc.target_sparsity * min(1.0, (step - gating_start) / warmup_steps)
                gap = sparsity - target
                loss = loss + lambdas[0] * gap + lambdas[1] * gap * gap
                correct += int((out.logits.argmax(-1) == y).sum())
            else:
                correct += int((dense.logits.argmax(-1) == y).sum())
            if l1 and preds:
                loss = loss + l1 * sum(p.abs().sum() for p in preds)

            optimizer.zero_grad(set_to_none=True)
            lambda_opt.zero_grad(set_to_none=True)
            if gate_opt is not None:
                gate_opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            if gate_opt is not None and step >= gating_start:
                gate_opt.step()
                lambda_opt.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.update(1)
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                sparsity=f"{sparsity.item():.2f}",
                beta=f"{beta:.2f}",
            )
        logger.info(
            "epoch %d/%d loss %.4f train acc %.4f sparsity %.3f",
            epoch + 1,
            tc.epochs,
            loss_sum / seen,
            correct / seen,
            sparsity.item(),
        )
    bar.close()

    model.eval()
    report = TrainReport(
        seconds=round(time.monotonic() - started, 1),
        steps=step,
        params=sum(p.numel() for p in model.parameters()),
    )
    for mode in GATE_MODES:
        report.test[mode] = evaluate(model, test_set, settings_for(cfg, mode)).as_dict()
    if out_dir is not None:
        save_checkpoint(model, out_dir, metadata={"train": report.__dict__})
    return model, report
