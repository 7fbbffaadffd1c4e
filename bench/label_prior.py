"""What a checkpoint's label prior (pha_core/label_prior.py) does to its label probabilities on test rows.

    python bench/label_prior.py pha_core/assets/demo --output bench/results/label_prior_demo_cpu.json

For every label task of the checkpoint: the test rows (split seed 42, --max-eval per task, the rows `pha eval`
scores) with the task given, their labels' log-likelihoods once, then P(label | x) three ways: "without" (the
decoder's probabilities), "offsets" (label_prior.json's offsets alone) and "with" (offsets and temperature, what
`pha eval` and the server use). Prints and writes accuracy, log-loss and expected calibration error (10 bins of
the top probability) of each, per task and on average, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from pha_core.checkpoint import load_checkpoint  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits  # noqa: E402
from pha_core.files import write_atomic  # noqa: E402
from pha_core.label_prior import LabelPrior, task_log_likelihoods  # noqa: E402
from pha_core.scoring import AnswerSpace  # noqa: E402

ECE_BINS = 10  # equal-width bins of the top probability, the usual reliability-diagram choice


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray) -> float:
    top, pred = probs.max(axis=1), probs.argmax(axis=1)
    which = np.minimum((top * ECE_BINS).astype(int), ECE_BINS - 1)
    return float(
        sum(
            abs((pred[m] == gold[m]).mean() - top[m].mean()) * m.mean()
            for b in range(ECE_BINS)
            if (m := which == b).any()
        )
    )


def figures(loglik: torch.Tensor, offsets, gold: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    probs = torch.softmax((loglik + torch.tensor(offsets, dtype=torch.float64)) / temperature, dim=1).numpy()
    return {
        "accuracy": float((probs.argmax(axis=1) == gold).mean()),
        "log_loss": float(-np.log(probs[np.arange(len(gold)), gold]).mean()),
        "ece": expected_calibration_error(probs, gold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--max-eval", type=int, default=500)
    parser.add_argument("--output")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    prior = LabelPrior.load(args.checkpoint)
    if prior is None:
        sys.exit(f"{args.checkpoint} has no label prior: fit one with `pha calibrate {args.checkpoint}`")
    tasks = list(prior.offsets)
    splits = load_splits(tasks, data_dir_from_env(), seed=42, n_train=1, max_eval=args.max_eval)
    report: dict = {"checkpoint": Path(args.checkpoint).name, "machine": machine(), "tasks": {}}
    for task in tasks:
        space, rows = AnswerSpace.of_task(task), splits[task]["test"]
        loglik = task_log_likelihoods(model, task, rows)
        gold = np.array([space.words.index(e.target) for e in rows])
        entry = {"n": len(rows), "without": figures(loglik, [0.0] * len(space.words), gold)}
        entry["offsets"] = figures(loglik, prior.of(task), gold)
        entry["with"] = figures(loglik, prior.of(task), gold, prior.temperature_of(task))
        entry["temperature"] = prior.temperature_of(task)
        report["tasks"][task] = entry
        print(
            f"{task:<6} n={len(rows):<4} "
            + "  ".join(
                f"{k}: acc {v['accuracy']:.3f} log-loss {v['log_loss']:.3f} ECE {v['ece']:.3f}"
                for k, v in entry.items()
                if isinstance(v, dict)
            )
            + f"  T {entry['temperature']:.2f}",
            flush=True,
        )
    for side in ("without", "offsets", "with"):
        report[side] = {
            m: float(np.mean([t[side][m] for t in report["tasks"].values()])) for m in ("accuracy", "log_loss", "ece")
        }
        print(f"mean {side}: " + ", ".join(f"{m} {v:.4f}" for m, v in report[side].items()))
    if args.output:
        write_atomic(Path(args.output), lambda tmp: tmp.write_text(json.dumps(report, indent=1)))


if __name__ == "__main__":
    main()
