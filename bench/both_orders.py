"""Which pair tasks gain from being read in both orders of their two fields (pha_core/scoring.py BOTH_ORDERS).

    python bench/both_orders.py pha_core/assets/demo --output bench/results/both_orders_demo_cpu.json

For each task (default: the symmetric ones, STS-B, MRPC, QQP), its validation and test rows (split seed 42,
--max-eval per task, the rows `pha eval` scores) with the task given, answered two ways: as written, and by the
shipped rule for BOTH_ORDERS tasks (the mean of the two readings' probabilities, scoring.read_both_orders).
Validation is scored without the label prior (it was fitted on those rows), test with it, as `pha eval` and the
server score. A task belongs in BOTH_ORDERS when validation says so; test is the check, not the choice.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from pha_core.checkpoint import load_checkpoint  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits  # noqa: E402
from pha_core.label_prior import LabelPrior  # noqa: E402
from pha_core.metrics import score, task_metrics  # noqa: E402
from pha_core.scoring import AnswerSpace, Scored, rank, read_both_orders  # noqa: E402
from pha_core.tasks import Example, get_task  # noqa: E402

SYMMETRIC = ("stsb", "mrpc", "qqp")  # pair tasks whose answer does not depend on which field comes first


@torch.inference_mode()
def readings(model, task: str, rows: list[Example], space: AnswerSpace) -> tuple[list[Scored], list[Scored]]:
    """Every row's answer as written, and with both orders read (space.both_orders set)."""
    one, both = [], []
    for start in range(0, len(rows), 64):
        texts = [e.input for e in rows[start : start + 64]]

        def answer(batch: list[str]) -> list[Scored]:
            gold = model.task_ids([task] * len(batch))
            hidden, mask = model.encode(model.source(batch), gold)
            z = model.instance_vectors(hidden, mask) if model.retriever is not None else None
            return rank(model, hidden, mask, model.decoder_adapters(gold, z), [space] * len(batch))

        first = answer(texts)
        one += first
        both += read_both_orders([space] * len(texts), texts, first, lambda _rows, swapped: answer(swapped))
    return one, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tasks", nargs="+", default=list(SYMMETRIC))
    parser.add_argument("--max-eval", type=int, default=500)
    parser.add_argument("--output")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    prior = LabelPrior.load(args.checkpoint)
    tasks = [t for t in args.tasks if t in model.tasks]
    splits = load_splits(tasks, data_dir_from_env(), seed=42, n_train=1, max_eval=args.max_eval)
    report: dict = {"checkpoint": Path(args.checkpoint).name, "max_eval": args.max_eval, "tasks": {}}
    for task in tasks:
        template = get_task(task).template
        entry = {}
        for split, with_prior in (("validation", False), ("test", True)):
            space = prior.space_of(task) if with_prior and prior else AnswerSpace.of_task(task)
            rows = splits[task][split]
            one, both = readings(model, task, rows, replace(space, both_orders=template))
            targets = [e.target for e in rows]
            entry[split] = {
                "n": len(rows),
                "label_prior": with_prior and prior is not None,
                "one_order": score(task, task_metrics(task, [s.output for s in one], targets)),
                "both_orders": score(task, task_metrics(task, [s.output for s in both], targets)),
            }
            print(
                f"{task:<5} {split:<10} n={len(rows):<4} one order {entry[split]['one_order']:.4f}  "
                f"both orders {entry[split]['both_orders']:.4f}",
                flush=True,
            )
        report["tasks"][task] = entry
    if args.output:
        write_result(args.output, report)


if __name__ == "__main__":
    main()
