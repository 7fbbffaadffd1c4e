"""What every bench result records about where it ran, and how it is written (whole, or not at all)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from pha_core.files import write_atomic


def machine() -> dict[str, Any]:
    """Platform, CPU model and count, torch version and threads, the GPU if any."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    info["threads"] = torch.get_num_threads()
    info["cpu"] = cpu_model()
    info.update(cpu_features())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_features() -> dict[str, Any]:
    """What decides the CPU's speed for this model more than its name: the widest vector instructions torch
    uses (AVX2, AVX512, ...) and whether bf16 matmuls are native, which makes "auto" precision bf16. Two
    "AMD EPYC" VMs of this workplace differed 3.5x in training throughput by these alone (docs/results.md)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def write_result(path: str | Path, data: dict[str, Any]) -> None:
    """JSON with the machine added, written atomically (a run cut short leaves the last complete file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**data, "machine": machine()}, indent=2) + "\n"
    write_atomic(out, lambda tmp: tmp.write_text(text))


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    """Print `figures` as JSON, and write them to `path` too when given (the reliability scripts' output)."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
