"""Training throughput on the GLUE mix: examples/s of `Trainer.train_step`, measured, with the machine.

    python bench/train_speed.py --steps 20 --warmup 3 --output bench/results/train_speed_cpu.json

Builds the demo recipe's trainer (8 GLUE tasks, real files under $PHA_DATA_DIR, 2000 examples per task,
batch 128, 256 source tokens) and times `--steps` optimiser steps after `--warmup` untimed ones. Options set the
things that decide the speed (precision, length bucketing, decoder trainable, batch), so a before/after pair
is two runs of this script on the same machine. Nothing else should run on the machine meanwhile.
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
from pha_core.buckets import length_buckets  # noqa: E402
from pha_core.config import BackboneConfig, PHAConfig  # noqa: E402
from pha_core.tasks import GLUE_TASKS  # noqa: E402
from pha_core.train import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-source-length", type=int, default=256)
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per length bucket (0: one bucket)")
    p.add_argument("--decoder-trainable", default=None, help="none | cross_attention | all")
    p.add_argument("--decoder-init", default=None, help="pre-trained decoder file (default: the shipped one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--encoding", choices=["fields", "joint"], default=None, help="default: the backbone's")
    p.add_argument("--output", type=Path)
    args = p.parse_args()

    backbone = BackboneConfig(decoder_trainable=args.decoder_trainable, decoder_init=args.decoder_init)
    encoding = {} if args.encoding is None else {"encoding": args.encoding}
    model_cfg = PHAConfig(backbone=backbone, max_source_length=args.max_source_length, **encoding)
    with tempfile.TemporaryDirectory() as out:
        extra = {} if args.token_budget is None else {"token_budget": args.token_budget}
        cfg = TrainConfig(
            tasks=list(GLUE_TASKS),
            n_train=args.n_train,
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            output=out,
            device=args.device,
            precision=args.precision,
            **extra,
        )
        trainer = Trainer(cfg, model_cfg, progress=False)
        for _ in range(args.warmup):
            trainer.train_step(next(trainer.mixer))
        timed = [next(trainer.mixer) for _ in range(args.steps)]
        started = time.perf_counter()
        for batch in timed:
            trainer.train_step(batch)
        seconds = time.perf_counter() - started
        padding = source_padding(trainer, timed, cfg.token_budget, model_cfg)
    result = {
        "examples_per_s": args.steps * args.batch_size / seconds,
        "seconds_per_step": seconds / args.steps,
        "steps": args.steps,
        "source_tokens": padding,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "resolved": {
            "precision": trainer.precision,
            "token_budget": cfg.token_budget,
            "decoder_trainable": model_cfg.backbone.decoder_trainable,
            "encoding": model_cfg.encoding,
        },
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


def source_padding(trainer: Trainer, batches: list, token_budget: int, model_cfg: PHAConfig) -> dict:
    """What the timed steps' encoder calls held: real source tokens, padded tokens and buckets per step, as
    collate_buckets cuts them (counted apart from the timing); None for fields encoded apart (rows per field)."""
    if model_cfg.by_field:
        return None
    real = padded = buckets = 0
    for batch in batches:
        lengths = [
            min(n, model_cfg.max_source_length) for n in trainer.model.backbone.count_tokens([e.input for e in batch])
        ]
        groups = length_buckets(lengths, token_budget)
        real += sum(lengths)
        padded += sum(len(g) * max(lengths[i] for i in g) for g in groups)
        buckets += len(groups)
    return {
        "real": real,
        "padded": padded,
        "padded_per_real": round(padded / real, 3),
        "buckets_per_step": buckets / len(batches),
    }


if __name__ == "__main__":
    main()
