"""What decoder pre-training buys: the same PHA recipe from the warm-started and from the pre-trained decoder.

    python bench/decoder_ab.py --n-train 100 --steps 300 --batch-size 32 --seeds 0 \
        --output bench/results/decoder_ab_100_cpu.json

Each run: `pha train` on the 8 GLUE tasks (real files under $PHA_DATA_DIR), then the test split (split seed 42,
--max-eval rows per task, the same rows for every run), answers by rank classification. Prints the GLUE average
(task given / routed) per decoder start and seed, and writes every number with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from pha_core.config import BackboneConfig, PHAConfig  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits  # noqa: E402
from pha_core.evaluate import evaluate  # noqa: E402
from pha_core.tasks import GLUE_TASKS  # noqa: E402
from pha_core.train import TrainConfig, Trainer  # noqa: E402


def one_run(start: str, seed: int, args: argparse.Namespace, test: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            tasks=list(GLUE_TASKS),
            n_train=args.n_train,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            max_eval=args.max_eval,
            output=out,
            log_every=max(1, args.steps // 10),
        )
        model_cfg = PHAConfig(backbone=BackboneConfig(decoder_init=start))
        began = time.perf_counter()
        trainer = Trainer(cfg, model_cfg, progress=False)
        result = trainer.run()
        report = evaluate(trainer.model, test)
    return {
        "decoder_init": start,
        "seed": seed,
        "train_seconds": result["train_seconds"],
        "seconds": time.perf_counter() - began,
        "final_ce": result["history"][-1]["ce"],
        "average": report["average"],
        "tasks": {
            t: {"given": r["given"]["score"], "retrieved": r.get("retrieved", {}).get("score")}
            for t, r in report["tasks"].items()
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[42], help="42: the split seed, so no train row is a test row"
    )
    p.add_argument("--starts", nargs="+", default=["warm_start", "pretrained"])
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    # Test rows fixed across runs: split seed 42 whatever the run's seed (the seed changes sample and init).
    splits = load_splits(list(GLUE_TASKS), data_dir_from_env(), seed=42, n_train=1, max_eval=args.max_eval)
    test = {t: s["test"] for t, s in splits.items()}
    runs = []
    for seed in args.seeds:
        for start in args.starts:
            run = one_run(start, seed, args, test)
            runs.append(run)
            avg = run["average"]
            print(
                f"{start:<11} seed {seed}: given {avg['given']:.3f} routed {avg.get('retrieved', float('nan')):.3f} "
                f"routing {avg.get('routing_accuracy', float('nan')):.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
    if args.output:
        args.output.write_text(
            json.dumps({"settings": vars(args) | {"output": None}, "runs": runs, "machine": machine()}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
