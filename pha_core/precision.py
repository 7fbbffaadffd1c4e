"""Matmul precision: bf16 where the hardware does it natively, for training and for serving.

Training (train.py, pretrain.py) runs its forward and backward passes under bf16 autocast, with the frozen
weights stored in bf16 for the run (train.FrozenInLowPrecision); the trainable parts, gradients and optimiser
stay float32. Serving can run the way the model was trained: `serve_in(model, "bf16")` stores the backbone's
weights (frozen encoder, decoder, output layer) in bf16 once, and the inference engine runs every pass under
bf16 autocast. The PHA parts (encoder adapters, retriever G, prototypes, hypernetwork) stay float32, so the
adapter sets the hypernetwork makes, and with them the adapter cache, are the same at either precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def resolve_precision(name: str, device: torch.device) -> str:
    """ "auto" -> "bf16" where bf16 matmuls are native on `device` (CUDA with bf16, CPUs with AMX or
    AVX512-BF16), else "fp32"."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The autocast context of a resolved precision (a no-op for fp32).

    On the CPU, SDPA attention takes the math kernel: the fused flash kernel's backward was 8x slower than
    fp32 there (49 ms vs 6 ms a call, 2 cores with AMX, torch 2.13). The MiniLM backbone avoids SDPA on the CPU
    altogether (backbones.ATTENTION_BY_DEVICE); this covers backbones that still call it.
    """
    if precision != "bf16":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=torch.bfloat16), kernel:
        yield


def serve_in(model, precision: str) -> str:
    """Prepare a loaded model for inference at `precision` ("auto" resolved for its device); returns the
    resolved name. bf16: the backbone's floating-point weights become bf16, for good (a serving process never
    trains; run its passes under `autocast`). At batch 1 a pass streams every weight from memory once, so half
    the bytes is most of the gain (docs/serving.md, "Benchmark", session 17)."""
    resolved = resolve_precision(precision, model.device)
    if resolved == "bf16":
        model.backbone.to(torch.bfloat16)
    return resolved
