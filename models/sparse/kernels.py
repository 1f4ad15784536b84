"""Kernel helpers of the plans: fused matmul + activation, unfolded convolutions, timing.

Inside a forward every kernel call costs several µs beyond its work (its code and data are
cold after the big matmuls), so the plans call as few kernels as torch allows.

oneDNN compiles and caches a kernel (a "primitive", with its scratch memory) per input shape,
up to 1,024 of them by default: over requests of ever new lengths that cache grew a serving
process by about 1 GB (the convolutional front end of an audio encoder, 150 lengths). Importing
this module bounds it (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, unless already set; read when
oneDNN first runs), and the plans' own kernels run ATen's (:class:`without_onednn`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from models.sparse.workspace import Workspace

ONEDNN_CACHE_CAPACITY = 32  # primitives: the modules a network runs itself (a front end's convs)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


def addmm_act(
    bias: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, out: torch.Tensor, act: str | None
) -> torch.Tensor:
    """out = act(bias + m1 @ m2) for act "gelu" (exact, erf), "relu" or None (no activation).

    On CPU the matmul and its activation are one call (``_addmm_activation``: the same addmm,
    then the activation in place). On CUDA that op's GELU is the tanh approximation, so GELU
    runs as two calls there.
    """
    if act is None:
        return torch.addmm(bias, m1, m2, out=out)
    if act == "relu" or out.device.type == "cpu":
        return torch._addmm_activation(bias, m1, m2, use_gelu=act == "gelu", out=out)
    torch.addmm(bias, m1, m2, out=out)
    return cast(torch.Tensor, torch.ops.aten.gelu_(out))


def act_(h: torch.Tensor, act: str | None) -> torch.Tensor:
    """The activation in place ("gelu" exact, "relu") or nothing."""
    if act == "gelu":
        return cast(torch.Tensor, torch.ops.aten.gelu_(h))
    if act == "relu":
        return h.relu_()
    return h


class without_onednn:  # noqa: N801 - used like contextlib's context managers
    """Run ATen's own CPU kernels instead of oneDNN's (the plans' gated layers and unfolded
    convolutions: ATen's cache nothing and are within noise at these sizes). The flag is
    process-wide; a plan runs on one thread at a time and restores it.
    """

    __slots__ = ("enabled",)

    def __enter__(self) -> None:
        self.enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp

    def __exit__(self, *exc: object) -> None:
        torch.backends.mkldnn.enabled = self.enabled


def unfold(
    f: torch.Tensor,
    kernel: int,
    ws: Workspace,
    padding: int | None = None,
    stride: int = 1,
    dilation: int = 1,
) -> torch.Tensor:
    """(B, T, C) -> (B, T', C·k): a conv's input windows, channel-major like the conv weight
    (H, C, k), so the conv is one matmul with the weight viewed (H, C·k). ``padding`` defaults
    to "same" for an odd kernel."""
    pad = kernel // 2 if padding is None else padding
    if kernel == 1 and pad == 0 and stride == 1:
        return f
    b, _, c = f.shape
    padded = F.pad(f, (0, 0, pad, pad)) if pad else f  # (B, T + 2p, C)
    span = dilation * (kernel - 1) + 1
    windows = padded.unfold(1, span, stride)  # (B, T', C, span), a view
    if dilation > 1:
        windows = windows[..., ::dilation]
    out = ws.get("unfold", windows.shape, f).copy_(windows)
    return out.view(b, windows.shape[1], c * kernel)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
