"""The paper's comparisons in the small: PHA vs its ablations and baselines, same data, same budget, 3 seeds.

    python bench/quality.py --n-train 100 --variants pha adapter hyperformer no_prototype no_retriever \
        --seeds 0 1 2 --steps 300 --output bench/results/quality_100.json

Every run: `pha train` recipe on the 8 GLUE tasks (real files under $PHA_DATA_DIR), then the test split
(capped at --max-eval rows per task, seeded). Prints mean and spread per variant and writes every number as
JSON, with the machine it ran on. `--deadline` (seconds) stops launching new runs when the budget is spent;
runs not made are listed as skipped, never invented.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pha_core.config import PHAConfig  # noqa: E402
from pha_core.evaluate import evaluate  # noqa: E402
from pha_core.tasks import GLUE_TASKS  # noqa: E402
from pha_core.train import TrainConfig, Trainer  # noqa: E402


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def one_run(variant: str, seed: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            tasks=list(args.tasks),
            n_train=args.n_train,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            max_eval=args.max_eval,
            output=out,
            device=args.device,
            log_every=max(1, args.steps // 10),
        )
        started = time.perf_counter()
        trainer = Trainer(cfg, PHAConfig(variant=variant), progress=False)
        result = trainer.run()
        report = evaluate(trainer.model, {t: s["test"] for t, s in trainer.splits.items()})
    return {
        "variant": variant,
        "seed": seed,
        "n_train": args.n_train,
        "steps": args.steps,
        "seconds": time.perf_counter() - started,
        "average": report["average"],
        "tasks": {
            t: {
                "given": r["given"]["score"],
                **(
                    {"retrieved": r["retrieved"]["score"], "routing": r["routing_accuracy"]} if "retrieved" in r else {}
                ),
            }
            for t, r in report["tasks"].items()
        },
        "final_loss": result["history"][-1],
    }


def summarise(runs: list[dict]) -> list[str]:
    lines = [f"{'variant':<14} {'seeds':>5}  {'given avg':>16}  {'retrieved avg':>16}  {'routing':>14}"]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]

        def stat(key, rows=rows):
            values = [r["average"][key] for r in rows if key in r["average"]]
            if not values:
                return f"{'-':>16}"
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * statistics.mean(values):7.1f} ± {100 * spread:5.1f}  "

        lines.append(f"{variant:<14} {len(rows):>5}  {stat('given')}{stat('retrieved')}{stat('routing_accuracy')}")
    return lines


def _write(args: argparse.Namespace, runs: list[dict], skipped: list[dict]) -> None:
    """Rewritten after every run, so a run cut short by a time limit still leaves its measurements."""
    result = {"machine": machine(), "args": vars(args), "runs": runs, "skipped": skipped, "command": " ".join(sys.argv)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS))
    p.add_argument("--variants", nargs="+", default=["pha", "adapter", "hyperformer", "no_prototype", "no_retriever"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    started = time.perf_counter()
    runs, skipped = [], []
    for seed in args.seeds:
        for variant in args.variants:
            if args.deadline and time.perf_counter() - started > args.deadline:
                skipped.append({"variant": variant, "seed": seed})
                continue
            run = one_run(variant, seed, args)
            runs.append(run)
            _write(args, runs, skipped)
            print(
                f"{variant} seed {seed}: given {run['average']['given']:.3f} "
                f"retrieved {run['average'].get('retrieved', float('nan')):.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
    result = {"machine": machine(), "args": vars(args), "runs": runs, "skipped": skipped, "command": " ".join(sys.argv)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n".join(summarise(runs)))
    if skipped:
        print(f"skipped (deadline): {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
