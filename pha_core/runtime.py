"""Process-wide torch settings for programs that must not import torch themselves (the HTTP service).

The service keeps every tensor behind `inference.Engine`; these helpers are the only other torch calls it needs:
the device to load onto, the number of intra-op threads, and a description of both for /readyz and benchmarks.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; anything else is returned as torch spells it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(name))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count when given; return the count in force."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def seed(value: int) -> None:
    """Seed torch's global generator (a reproducible untrained default model)."""
    torch.manual_seed(value)


def describe() -> dict[str, object]:
    """What the numbers of a run depend on: torch version, threads, and the GPU if any."""
    info: dict[str, object] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
