"""The served model contract: the named tensors a model takes and returns (docs/model-contract.md).

Plain dataclasses, no torch: the service reads a model's contract for its metadata and its
request validation. ``-1`` marks a dynamic dimension. The default contract is one FP32 input
``input`` of shape ``[batch, T, C]`` with per-request lengths, and one FP32 output ``logits``
``[batch, classes]``. A module declares another by a ``gated_contract`` attribute (a
:class:`ModelContract`): several inputs of datatypes FP32 / INT64 / INT32 sharing ``[batch, T]``
(token ids, token types), each with its pad value and value range, and at most one mask input
(``attention_mask``) that the server turns into per-row lengths. The first data input is the
network's ``x``; the others reach its forward as keyword arguments.

An input may instead have no length (``length_dim=None``, an image's ``[batch, 3, H, W]``):
every dimension after the batch is fixed, a request must match it exactly and is never padded,
and every row is the model's full length (``max_length`` steps: the tokens a ViT's encoder
sees). The server serves such an input only as the contract's one input (no mask, no other
input beside it). The server refuses, at load and naming the model, a contract it cannot serve
(:meth:`ModelContract.unservable`).
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
    # For an input: the dimension whose size is the request's length (its padding is masked);
    # None: no length, every dimension after the batch is fixed (an image).
    length_dim: int | None = None
    # "data": a tensor the network reads; "mask": 1 for valid steps then 0 (right padding),
    # which the server reads as each row's length and the network gets as ``lengths``.
    role: Literal["data", "mask"] = "data"
    # Integer inputs: the allowed values, inclusive (token ids inside the vocabulary).
    value_range: tuple[int, int] | None = None

    @property
    def shape_text(self) -> str:
        """The shape as errors name it: ``[batch, T, 1]``, ``[batch, 3, 32, 32]``."""
        dims = ["T" if i == self.length_dim else str(d) for i, d in enumerate(self.shape) if i]
        return "[" + ", ".join(["batch", *dims]) + "]"


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

    @property
    def data_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs the network reads, in order: the first is its ``x``."""
        return tuple(t for t in self.inputs if t.role == "data")

    @property
    def fixed_shape(self) -> bool:
        """Whether the network's ``x`` has no length dimension (an image): every request then
        has the declared shape and every row is the model's full length."""
        data = self.data_inputs
        return bool(data) and data[0].length_dim is None

    @property
    def mask(self) -> TensorSpec | None:
        """The mask input (its rows' lengths), if the contract has one."""
        return next((t for t in self.inputs if t.role == "mask"), None)

    def unservable(self) -> str | None:
        """None when this server can serve the contract, else why not (one line)."""
        data = self.data_inputs
        if not data or data[0].optional:
            return "declares no required data input (the network's x)"
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names):
            return f"declares inputs {names} with a repeated name"
        if sum(t.role == "mask" for t in self.inputs) > 1:
            return "declares more than one mask input"
        for spec in self.inputs:
            where = f"input {spec.name!r}"
            if spec.datatype not in ("FP32", "INT64", "INT32"):
                return f"{where} is {spec.datatype}; served datatypes: FP32, INT64, INT32"
            refused = (_fixed_unservable(spec, self.inputs) if spec.length_dim is None
                       else _length_unservable(spec))
            if refused is not None:
                return refused
            if spec.value_range is not None and spec.datatype == "FP32":
                return f"{where} is FP32 and declares a value range (integers only)"
        if len(self.outputs) != 1 or self.outputs[0].datatype != "FP32" or len(
            self.outputs[0].shape
        ) != 2:
            return (
                f"declares outputs {[t.name for t in self.outputs]}; this server serves one FP32 "
                "output [batch, classes]"
            )
        return None


def _length_unservable(spec: TensorSpec) -> str | None:
    """Why an input with a length cannot be served, or None."""
    where = f"input {spec.name!r}"
    if len(spec.shape) < 2 or spec.shape[:2] != (-1, -1) or spec.length_dim != 1:
        return f"{where} must be [batch, T, ...] with T its length, got {list(spec.shape)}"
    if any(d < 1 for d in spec.shape[2:]):
        return f"{where} has a dynamic dimension after T: {list(spec.shape)}"
    if spec.role == "mask" and (len(spec.shape) != 2 or spec.datatype == "FP32"):
        return f"mask {where} must be INT64 or INT32 [batch, T]"
    return None


def _fixed_unservable(spec: TensorSpec, inputs: tuple[TensorSpec, ...]) -> str | None:
    """Why an input without a length cannot be served, or None: every dimension after the batch
    must be fixed, and it must be the contract's one input (a length input beside it would need
    padding it cannot have, a mask would give lengths to a request that has none)."""
    where = f"input {spec.name!r}"
    shape = list(spec.shape)
    if len(shape) < 2:
        return f"{where} has no dimension after the batch: {shape}"
    if shape[0] != -1:
        return f"{where} must have the batch (-1) as its first dimension, got {shape}"
    if any(d < 1 for d in shape[1:]):
        return (
            f"{where} has a dynamic dimension but no length_dim: {shape}; without a length every "
            "dimension after the batch is fixed, and a dynamic one is served only as [batch, T, "
            "...] with T its length (length_dim=1)"
        )
    if spec.role == "mask":
        return f"mask {where} must be INT64 or INT32 [batch, T] with T its length (length_dim=1)"
    if len(inputs) > 1:
        return (
            f"{where} has a fixed shape {shape} (no length) beside inputs "
            f"{[t.name for t in inputs if t is not spec]}; this server serves a fixed-shape "
            "input only as the model's one input"
        )
    return None
