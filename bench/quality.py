"""PHA against its baselines and what a user would do instead, on fixed rows, 3 seeds, selected on validation.

    python bench/quality.py --n-train 100 --variants pha adapter hyperformer --seeds 0 1 2 \
        --steps 600 --eval-every 100 --output bench/results/quality_100_cpu.json

Rules, the same for every variant:
- rows: the splits and the evaluation rows come from split seed 42 whatever the run's seed (test: --max-eval
  rows per task, validation: --max-val); the run's seed draws the training sample, the initialisation and the
  batch order only, so every seed and variant is scored on the same test rows;
- budget: --steps optimiser steps of --batch-size, validated every --eval-every steps (GLUE average, task
  given); the test split is scored once, with the weights of the best validation point (model selection);
- next to every seed's runs, on its training sample and the same test rows: the majority class and the frozen
  probe (bench/baselines.py; C or alpha by cross-validation on the training sample).

A task-run is "constant" when every test answer is the same label: it has not learned that task. Prints mean
and spread per row and writes every number with the machine it ran on. `--deadline` (seconds) stops launching
runs when spent; runs not made are listed as skipped, never invented.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import SentenceEncoder, baseline_scores  # noqa: E402
from bench.machine import write_result  # noqa: E402
from pha_core.config import BackboneConfig, PHAConfig  # noqa: E402
from pha_core.evaluate import evaluate  # noqa: E402
from pha_core.tasks import GLUE_TASKS  # noqa: E402
from pha_core.train import TrainConfig, Trainer  # noqa: E402

SPLIT_SEED = 42


class BestOnValidation:
    """The evaluate_fn of Trainer.run: scores validation, keeps a copy of the best weights seen."""

    def __init__(self, validation: dict) -> None:
        self.validation = validation
        self.best: tuple[float, int, dict] | None = None
        self.curve: list[dict] = []

    def __call__(self, model, _split: str) -> dict:
        report = evaluate(model, self.validation)
        step = len(self.curve) + 1
        self.curve.append(report["average"])
        if self.best is None or report["average"]["given"] > self.best[0]:
            state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
            self.best = (report["average"]["given"], step, state)
        return report


def one_run(variant: str, seed: int, args: argparse.Namespace) -> tuple[dict, Trainer]:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            tasks=list(args.tasks),
            n_train=args.n_train,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            split_seed=SPLIT_SEED,
            max_eval=args.max_eval,
            eval_every=args.eval_every,
            output=out,
            device=args.device,
            log_every=args.eval_every,
        )
        started = time.perf_counter()
        init = {"decoder_init": args.decoder_init} if args.decoder_init else {}  # unset: the shipped decoder
        backbone = BackboneConfig(decoder_trainable=args.decoder_trainable, **init)
        encoding = {"encoding": args.encoding} if args.encoding else {}  # unset: the config's default
        model_cfg = PHAConfig(variant=variant, backbone=backbone, **encoding)
        trainer = Trainer(cfg, model_cfg, progress=False)
        selector = BestOnValidation({t: s["validation"][: args.max_val] for t, s in trainer.splits.items()})
        result = trainer.run(evaluate_fn=selector)
        if args.steps % args.eval_every:
            selector(trainer.model, "validation")  # the last step is a candidate too
        last = selector.curve[-1]["given"]
        best_score, best_point, state = selector.best
        trainer.model.load_state_dict(state, strict=False)
        report = evaluate(trainer.model, {t: s["test"] for t, s in trainer.splits.items()})
    tasks = {
        t: {
            "given": r["given"]["score"],
            "constant": r["given_distinct"] == 1,
            **({"retrieved": r["retrieved"]["score"], "routing": r["routing_accuracy"]} if "retrieved" in r else {}),
        }
        for t, r in report["tasks"].items()
    }
    run = {
        "variant": variant,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "train_seconds": result["train_seconds"],
        "selected_step": min(best_point * args.eval_every, args.steps),
        "validation_given": best_score,
        "validation_curve": [c["given"] for c in selector.curve],
        "last_validation_given": last,
        "average": report["average"],
        "constant_tasks": sorted(t for t, r in tasks.items() if r["constant"]),
        "tasks": tasks,
        "final_ce": result["history"][-1]["ce"],
    }
    return run, trainer


def baseline_runs(seed: int, trainer: Trainer, encoder: SentenceEncoder) -> list[dict]:
    """Majority and probe rows on this seed's training sample and the fixed test rows."""
    per_task = {t: baseline_scores(encoder, s["train"], s["test"]) for t, s in trainer.splits.items()}
    return [
        {
            "variant": name,
            "seed": seed,
            "average": {"given": statistics.fmean(scores[name] for scores in per_task.values())},
            "tasks": {t: {"given": scores[name]} for t, scores in per_task.items()},
        }
        for name in ("majority", "probe")
    ]


def summarise(runs: list[dict]) -> list[str]:
    lines = [f"{'row':<12} {'seeds':>5}  {'given avg':>14}  {'routed avg':>14}  {'routing':>14}  constant/run"]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]

        def stat(key, rows=rows):
            values = [r["average"][key] for r in rows if key in r["average"]]
            if not values:
                return f"{'-':>14}  "
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * statistics.mean(values):6.1f} ± {100 * spread:4.1f}  "

        constant = [len(r["constant_tasks"]) for r in rows if "constant_tasks" in r]
        tail = f"{statistics.mean(constant):.1f}" if constant else "-"
        stats = stat("given") + stat("retrieved") + stat("routing_accuracy")
        lines.append(f"{variant:<12} {len(rows):>5}  {stats}{tail}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS))
    p.add_argument("--variants", nargs="+", default=["pha", "adapter", "hyperformer"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=500, help="test rows per task (split seed 42)")
    p.add_argument("--max-val", type=int, default=200, help="validation rows per task for model selection")
    p.add_argument("--decoder-trainable", choices=["none", "cross_attention", "all"], default=None)
    p.add_argument("--encoding", choices=["fields", "joint"], default=None)
    p.add_argument("--decoder-init", default=None, help="a `pha pretrain` decoder file or folder (default: shipped)")
    p.add_argument("--no-baselines", action="store_true", help="skip the majority and probe rows")
    p.add_argument("--device", default="auto")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    started = time.perf_counter()
    encoder = SentenceEncoder()
    runs, skipped = [], []
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    for seed in args.seeds:
        trainer = None
        for variant in args.variants:
            if args.deadline and time.perf_counter() - started > args.deadline:
                skipped.append({"variant": variant, "seed": seed})
                continue
            run, trainer = one_run(variant, seed, args)
            runs.append(run)
            print(
                f"{variant} seed {seed}: given {run['average']['given']:.3f} "
                f"routed {run['average'].get('retrieved', float('nan')):.3f} step {run['selected_step']} "
                f"constant {run['constant_tasks']} ({run['seconds']:.0f} s)",
                flush=True,
            )
            write_result(args.output, {"settings": settings, "runs": runs, "skipped": skipped})
        if trainer is not None and not args.no_baselines:
            runs += baseline_runs(seed, trainer, encoder)
            write_result(args.output, {"settings": settings, "runs": runs, "skipped": skipped})
    print("\n".join(summarise(runs)))
    if skipped:
        print(f"skipped (deadline): {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
