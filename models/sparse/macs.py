"""Executed-MAC accounting of a plan: closed forms where counts are input independent.

A forward's MACs are the network's ungated rest (a quadratic in the length, see
:mod:`models.flops`) plus each gated layer's count over what it ran. When every layer ran an
input-independent number of channels at the network's own resolution (dense, static, a fixed
k), the whole count is one quadratic in the length, computed once per set of counts: two tensor
ops per forward instead of a few per layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models.flops import MacModel, eval_quadratic, quadratic
from models.layers import GatedLayer, Record


class PlanMacs:
    """(executed, dense) MACs per request for the records of one plan's forwards."""

    def __init__(self, model: MacModel) -> None:
        self.model = model
        self._closed: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def count(
        self,
        lengths: torch.Tensor,
        records: Mapping[GatedLayer, Record],
        with_predictor: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model.quadratic and all(
            r.const is not None
            and not r.more
            and r.length is lengths
            and (r.pred_length is None or r.pred_length is lengths)
            for r in records.values()
        ):
            key = (with_predictor, *((id(layer), r.const) for layer, r in records.items()))
            coef = self._closed.get(key)
            if coef is None:
                coef = self._closed[key] = self._fit(lengths.device, records, with_predictor)
            return eval_quadratic(coef[0], lengths), eval_quadratic(coef[1], lengths)
        return self.model.count(lengths, records, with_predictor)

    def _fit(
        self,
        device: torch.device,
        records: Mapping[GatedLayer, Record],
        with_predictor: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.tensor([0, 1, 2], device=device)
        probe = {}
        for layer, r in records.items():
            assert r.const is not None
            ran = torch.full((3,), r.const[1], dtype=torch.float64, device=device)
            pred = seq if r.pred_length is not None else None
            probe[layer] = Record(ran, ran, seq, pred, r.const)
        macs, dense = self.model.count(seq, probe, with_predictor)
        return quadratic(macs), quadratic(dense)
