"""Does a request's answer depend on whether it was served alone or in a batch?

    python bench/alone_vs_batched.py --output bench/results/alone_vs_batched_demo_cpu.json

A request served alone runs the decoder's answer step on one row, where its projections read float16 copies of
their weights (pha_core/weights.py `DecoderLinear`); in a batch they read the float32 weights. This scores the
demo's test rows (split seed 42, --max-eval per task, the rows `pha eval` scores) through the server's engine
with each row's task given, once in batches of --batch and once one row at a time, and reports per task how
many answers differ and the largest difference of any label's probability (STS-B: of the score), with the time
of each answer step and the machine it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, write_json  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits  # noqa: E402
from pha_core.scoring import AnswerSpace, Scored  # noqa: E402
from service.loader import load_model  # noqa: E402
from service.settings import Settings  # noqa: E402


def answers(engine, texts: list[str], task: str, batch: int) -> tuple[list[Scored], list[float]]:
    """Each text's answer with `task` given, `batch` rows a call; and each call's answer-step ms."""
    adapters = engine.adapters_for_prototype(engine.trained_prototypes()[engine.tasks.index(task)])
    space = AnswerSpace.of_task(task)
    out, times = [], []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        encoded = engine.encode(chunk)
        began = time.perf_counter()
        out += engine.answer(encoded, [adapters] * len(chunk), [space] * len(chunk), 8, chunk)
        times.append((time.perf_counter() - began) * 1000)
    return out, times


def difference(a: Scored, b: Scored) -> float:
    """The largest change of a label's probability (no probabilities: of the number answered, STS-B)."""
    if a.probabilities and b.probabilities:
        return max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)
    return abs(float(a.output) - float(b.output))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="checkpoint directory (default: the bundled demo)")
    p.add_argument("--max-eval", type=int, default=500, help="test rows per task")
    p.add_argument("--batch", type=int, default=16, help="rows a call in the batched pass")
    p.add_argument("--output", help="write the figures as JSON here")
    args = p.parse_args(argv)
    engine = load_model(Settings(checkpoint=args.checkpoint, redis_url="", precision="fp32")).engine
    splits = load_splits(engine.tasks, data_dir_from_env(), seed=42, max_eval=args.max_eval)
    per_task = {}
    for task in engine.tasks:
        texts = [e.input for e in splits[task]["test"]]
        batched, batched_ms = answers(engine, texts, task, args.batch)
        alone, alone_ms = answers(engine, texts, task, 1)
        gaps = [difference(a, b) for a, b in zip(alone, batched, strict=True)]
        per_task[task] = {
            "rows": len(texts),
            "answers_differ": sum(a.output != b.output for a, b in zip(alone, batched, strict=True)),
            "max_difference": max(gaps),
            "median_difference": statistics.median(gaps),
            "answer_ms_alone_p50": round(statistics.median(alone_ms), 2),
            f"answer_ms_batch_{args.batch}_p50": round(statistics.median(batched_ms), 2),
        }
        print(task, per_task[task], flush=True)
    figures = {"machine": machine(), "settings": vars(args), "tasks": per_task}
    write_json(Path(args.output) if args.output else None, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
