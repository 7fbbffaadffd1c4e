"""Few-shot transfer (paper 4.4.3): adapt the demo model to tasks it never saw, k = 4, 16, 32.

    python bench/adapt.py --tasks cb boolq --k 4 16 32 --modes prototype adapter scratch --seeds 0 1 2 \
        --output bench/results/adapt.json

Modes (pha_core/adapt.py): `prototype` trains only the new prototype (128 floats); `adapter` trains a per-task
copy of the generated adapters initialised from H(k_a); `scratch` trains a plain adapter from a fresh init on
the same k examples (the baseline). Each run reports the held-out metric, the share of held-out inputs routed
to the new prototype, the wall time of the adaptation and the retrieved source task. Beside them, on the same k
shots and held-out rows: the majority class of the shots and the frozen probe (bench/baselines.py). Held-out
rows come from split seed 42 whatever the seed; the seed draws the k shots and the initialisation. As a job
does, each adapted task answers among its shots' labels with a label prior fitted on them (adapt.py step 4;
`--no-label-offsets`: the labels of the task table, no prior).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import SentenceEncoder, majority, probe  # noqa: E402
from bench.machine import write_result  # noqa: E402
from pha_core.adapt import adapt_task, score_adapted  # noqa: E402
from pha_core.calibration import RouteCalibration  # noqa: E402
from pha_core.checkpoint import load_checkpoint  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits, low_data  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"


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
    p.add_argument(
        "--no-label-offsets", action="store_true", help="skip the label prior fitted on the shots (adapt.py step 4)"
    )
    p.add_argument("--output", required=True)
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint, device=args.device)
    prototypes = model.prototypes.weight.detach().cpu().numpy()
    calibration = RouteCalibration.load(args.checkpoint)  # None: "fits_new" is not measured
    splits = load_splits(args.tasks, data_dir_from_env(), max_eval=args.max_eval)
    encoder = SentenceEncoder()
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "checkpoint")}
    settings["checkpoint"] = Path(args.checkpoint).name
    runs = []
    for task in args.tasks:
        # Few-shot examples come from train; every held-out row (CB: both halves of its 56-row validation file).
        heldout = (splits[task]["test"] + splits[task]["validation"])[: args.max_eval]
        for k in args.k:
            for seed in args.seeds:
                shots = low_data(splits[task]["train"], n=k, seed=seed)
                gold = [e.target for e in heldout]
                for name, predict in (("majority", majority), ("probe", lambda a, b: probe(encoder, a, b))):
                    predictions = predict(shots, heldout)
                    accuracy = sum(p == g for p, g in zip(predictions, gold, strict=True)) / len(gold)
                    runs.append({"task": task, "k": k, "seed": seed, "mode": name, "accuracy": accuracy})
                for mode in args.modes:
                    started = time.perf_counter()
                    # The labels a job registers (service/worker.py): the shots' own targets.
                    labels = None if args.no_label_offsets else sorted({e.target for e in shots})
                    result = adapt_task(
                        model, shots, prototypes, model.tasks, mode=mode, steps=args.steps, seed=seed, labels=labels
                    )
                    scores = score_adapted(model, result, heldout, prototypes, calibration=calibration)
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
                    write_result(args.output, {"settings": settings, "runs": runs})
                    print(
                        f"{task} k={k} seed={seed} {mode:<9} {scores} adapt {result.seconds:.1f}s "
                        f"from {result.source_task}",
                        flush=True,
                    )
    metric = {"cb": "accuracy", "boolq": "accuracy"}
    print(f"{'task':<6} {'k':>3} {'mode':<10} {'metric':>14} {'routed':>14} {'seconds':>8}")
    for task in args.tasks:
        for k in args.k:
            for mode in ["majority", "probe", *args.modes]:
                rows = [r for r in runs if r["task"] == task and r["k"] == k and r["mode"] == mode]
                m = [r.get(metric.get(task, "exact_match"), 0.0) for r in rows]
                sd = statistics.stdev(m) if len(m) > 1 else 0.0
                if "routed_to_new" in rows[0]:
                    routed = f"{100 * statistics.mean(r['routed_to_new'] for r in rows):7.1f}%"
                    if "fits_new" in rows[0]:
                        routed += f" ({100 * statistics.mean(r['fits_new'] for r in rows):.0f}% fit)"
                    seconds = f"{statistics.mean(r['adapt_seconds'] for r in rows):8.1f}"
                else:
                    routed, seconds = f"{'-':>8}", f"{'-':>8}"
                score = f"{100 * statistics.mean(m):7.1f} ± {100 * sd:4.1f}"
                print(f"{task:<6} {k:>3} {mode:<10} {score} {routed}      {seconds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
