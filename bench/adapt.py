"""Few-shot transfer (paper 4.4.3): adapt the demo model to tasks it never saw, k = 4, 16, 32.

    python bench/adapt.py --tasks cb boolq --k 4 16 32 --modes prototype adapter scratch --seeds 0 1 2 \
        --output bench/results/adapt.json

Modes (pha_core/adapt.py): `prototype` trains only the new prototype (128 floats); `adapter` trains a per-task
copy of the generated adapters initialised from H(k_a); `scratch` trains a plain adapter from a fresh init on
the same k examples (the baseline). Each run reports the held-out metric, the share of held-out inputs routed
to the new prototype, the wall time of the adaptation and the retrieved source task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pha_core.adapt import adapt_task, score_adapted  # noqa: E402
from pha_core.checkpoint import load_checkpoint  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits, low_data  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"


def _write(args: argparse.Namespace, runs: list[dict]) -> None:
    """Rewritten after every run, so a run cut short by a time limit still leaves its measurements."""
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine, "args": vars(args), "runs": runs, "command": " ".join(sys.argv)}, indent=2)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--tasks", nargs="+", default=["cb", "boolq"])
    p.add_argument("--k", nargs="+", type=int, default=[4, 16, 32])
    p.add_argument("--modes", nargs="+", default=["prototype", "adapter", "scratch"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint, device=args.device)
    prototypes = model.prototypes.weight.detach().cpu().numpy()
    splits = load_splits(args.tasks, data_dir_from_env(), max_eval=args.max_eval)
    runs = []
    for task in args.tasks:
        # Few-shot examples come from train; every held-out row (CB: both halves of its 56-row validation file).
        heldout = (splits[task]["test"] + splits[task]["validation"])[: args.max_eval]
        for k in args.k:
            for seed in args.seeds:
                shots = low_data(splits[task]["train"], n=k, seed=seed)
                for mode in args.modes:
                    started = time.perf_counter()
                    result = adapt_task(model, shots, prototypes, model.tasks, mode=mode, steps=args.steps, seed=seed)
                    scores = score_adapted(model, result, heldout, prototypes)
                    runs.append(
                        {
                            "task": task,
                            "k": k,
                            "seed": seed,
                            "mode": mode,
                            "source": result.source_task,
                            "source_score": result.source_score,
                            "adapt_seconds": result.seconds,
                            "final_loss": result.final_loss,
                            "total_seconds": time.perf_counter() - started,
                            **scores,
                        }
                    )
                    _write(args, runs)
                    print(
                        f"{task} k={k} seed={seed} {mode:<9} {scores} adapt {result.seconds:.1f}s "
                        f"from {result.source_task}",
                        flush=True,
                    )
    metric = {"cb": "accuracy", "boolq": "accuracy"}
    print(f"{'task':<6} {'k':>3} {'mode':<10} {'metric':>14} {'routed':>14} {'seconds':>8}")
    for task in args.tasks:
        for k in args.k:
            for mode in args.modes:
                rows = [r for r in runs if r["task"] == task and r["k"] == k and r["mode"] == mode]
                m = [r.get(metric.get(task, "exact_match"), 0.0) for r in rows]
                routed = [r["routed_to_new"] for r in rows]
                sd = statistics.stdev(m) if len(m) > 1 else 0.0
                seconds = statistics.mean(r["adapt_seconds"] for r in rows)
                print(
                    f"{task:<6} {k:>3} {mode:<10} {100 * statistics.mean(m):7.1f} ± {100 * sd:4.1f} "
                    f"{100 * statistics.mean(routed):7.1f}%      {seconds:8.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
