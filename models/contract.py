"""The served model contract: the named tensors a model takes and returns (docs/model-contract.md).

Plain dataclasses, no torch: the service reads a model's contract for its metadata and its
request validation. ``-1`` marks a dynamic dimension. The default contract (the only one this
server serves today) is one FP32 input ``input`` of shape ``[batch, T, C]`` with per-request
lengths, and one FP32 output ``logits`` ``[batch, classes]``. A module declares another by a
``gated_contract`` attribute (a :class:`ModelContract`); the contract carries what models with
token ids, attention masks or raw audio need (datatypes, optional inputs, padding values,
several outputs), and the server refuses, at load and naming the model, a contract it cannot
serve yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DataType = Literal["FP32", "INT64", "INT32"]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the contract."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]  # -1: dynamic (the batch is always the first dimension)
    optional: bool = False  # an input a request may omit
    # What the batcher pads shorter requests with (a pad token id, mask 0, zero audio).
    pad_value: float = 0.0
    # For an input: the dimension whose size is the request's length (its padding is masked).
    length_dim: int | None = None


@dataclass(frozen=True)
class ModelContract:
    """What a served model takes and returns."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: tuple[str, ...] = field(default=())

    @staticmethod
    def default(in_channels: int, num_classes: int) -> ModelContract:
        """``input`` FP32 [batch, T, C] (T the length) -> ``logits`` FP32 [batch, classes]."""
        return ModelContract(
            inputs=(TensorSpec("input", "FP32", (-1, -1, in_channels), length_dim=1),),
            outputs=(TensorSpec("logits", "FP32", (-1, num_classes)),),
        )

    def served_today(self) -> str | None:
        """None when this server can serve the contract, else why not (one line)."""
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            return (
                f"declares inputs {[t.name for t in self.inputs]} and outputs "
                f"{[t.name for t in self.outputs]}; this server serves one FP32 input of "
                "shape [batch, T, C] and one FP32 output"
            )
        spec, out = self.inputs[0], self.outputs[0]
        if (spec.name, out.name) != ("input", "logits"):
            return f"names its tensors {spec.name!r} -> {out.name!r}; served: 'input' -> 'logits'"
        if spec.datatype != "FP32" or len(spec.shape) != 3 or out.datatype != "FP32":
            return (
                f"declares {spec.name} {spec.datatype} {list(spec.shape)} -> {out.name} "
                f"{out.datatype}; this server serves FP32 [batch, T, C] -> FP32"
            )
        return None
