"""The `pha` command line: one typer app over both packages (pha_core: models; service: the HTTP API and worker).

`train`, `pretrain` and `params` take their recipe options from the recipe dataclasses (options.py), so a new
field with a `doc` is a new flag. Every error a user can cause ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import typer

from pha_core.config import BackboneConfig, PHAConfig
from pha_core.recipes import PretrainConfig, TrainConfig

from . import commands
from .errors import UserError
from .options import knobs

app = typer.Typer(
    name="pha",
    help="Prototype-based HyperAdapter: pre-train, train, evaluate, serve.",
    add_completion=False,
    no_args_is_help=True,
)

CheckpointArg = Annotated[str, typer.Argument(help="checkpoint directory written by `pha train`")]
DataDir = Annotated[str | None, typer.Option(help="data folder (default: the one the checkpoint was trained with)")]


def _option(name: str, annotation: Any, default: Any, doc: str) -> inspect.Parameter:
    # A switch is one flag (`--resume`), not a `--resume/--no-resume` pair: that is what the flags have always been.
    decls = ["--" + name.replace("_", "-")] if annotation is bool else []
    option = typer.Option(*decls, help=doc)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def _recipe_command(name: str, run: Callable[[dict[str, Any]], None], doc: str, *parts: Any) -> None:
    """Register `pha <name>` with the options of `parts`: recipe dataclasses or ready inspect.Parameters."""
    parameters = []
    for part in parts:
        parameters.extend([k.parameter for k in knobs(part)] if isinstance(part, type) else [part])
    names = [p.name for p in parameters]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise TypeError(f"pha {name}: options {duplicated} are declared twice")

    def command(**values: Any) -> None:
        run(values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    app.command(name, help=doc)(command)


CONFIG = _option("config", str | None, None, "YAML file with `model:` and `train:` sections")
RESUME = _option("resume", bool, False, "continue from the state in --output")

_recipe_command(
    "train",
    commands.train,
    "Multi-task training on GLUE/SuperGLUE files; writes a checkpoint and its route calibration.",
    CONFIG,
    TrainConfig,
    PHAConfig,
    BackboneConfig,
    RESUME,
    _option("no_eval", bool, False, "skip the validation table at the end"),
)
_recipe_command(
    "pretrain",
    commands.pretrain,
    "Pre-train the MiniLM decoder to read its encoder: span corruption on unlabelled text, optionally with "
    "similarity rows and a start-state readout distilled from the frozen encoder (pha_core/pretrain.py).",
    PretrainConfig,
    RESUME,
)
_recipe_command(
    "params",
    commands.params,
    "Trainable parameters by part, with their formulas, of a checkpoint or of a recipe.",
    _option("checkpoint", str | None, None, "count a trained checkpoint's model"),
    CONFIG,
    _option("tasks", list[str] | None, None, "task list (default: the config's, else the 8 GLUE tasks)"),
    PHAConfig,
    BackboneConfig,
)


@app.command("eval")
def evaluate(
    checkpoint: CheckpointArg,
    split: Annotated[Literal["validation", "test"], typer.Option(help="held-out split")] = "test",
    tasks: Annotated[list[str] | None, typer.Option(help="a subset of the checkpoint's tasks")] = None,
    data_dir: DataDir = None,
    max_eval: Annotated[int, typer.Option(help="rows per task, seeded")] = 500,
    decoding: Annotated[
        Literal["rank", "greedy"],
        typer.Option(help="rank: score every label, answer the best (STS-B: expected score); greedy: generate"),
    ] = "rank",
    label_prior: Annotated[
        bool,
        typer.Option(help="apply the checkpoint's label prior (label_prior.json, fitted on validation rows)"),
    ] = True,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    precision: Annotated[
        Literal["fp32", "bf16", "auto"],
        typer.Option(help="as the server's PHA_PRECISION: bf16 runs the backbone in bf16 (auto: where native)"),
    ] = "fp32",
    output: Annotated[str | None, typer.Option(help="write the full report as JSON here")] = None,
) -> None:
    """Per-task metrics (task given / retrieved) and routing accuracy on held-out rows."""
    commands.evaluate(locals())


@app.command()
def calibrate(
    checkpoint: CheckpointArg,
    data_dir: DataDir = None,
    max_rows: Annotated[int, typer.Option(help="validation rows per task, seeded")] = 500,
) -> None:
    """Fit a checkpoint's route calibration (typicality and confidence) and its label tasks' label prior
    (pha_core/label_prior.py) on its tasks' validation rows, and its content bank (pha_core/content.py) on their
    training and validation rows; all are written into the checkpoint (calibration.json, label_prior.json,
    content_bank.npz, each replaced atomically)."""
    commands.calibrate(locals())


@app.command()
def report(
    checkpoint: CheckpointArg,
    output: Annotated[str, typer.Option(help="folder for the pictures")] = "docs/img",
    max_eval: Annotated[int, typer.Option(help="held-out rows per task")] = 100,
    data_dir: DataDir = None,
) -> None:
    """Pictures: the prototype-instance heatmap and a 2-D projection of z (needs the `report` extra)."""
    _needs_extra("matplotlib", "report")
    commands.report(locals())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (PHA_HOST, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (PHA_PORT, 8000)")] = None,
) -> None:
    """The HTTP API; every other setting comes from PHA_* environment variables (service/settings.py)."""
    _needs_extra("fastapi", "serve")
    from service.main import serve as run

    _exit(run(host=host, port=port))


@app.command()
def worker(once: Annotated[bool, typer.Option("--once", help="process at most one job, then exit")] = False) -> None:
    """The adaptation worker: runs /adapt jobs from the Redis stream."""
    _needs_extra("redis", "serve")
    from service.worker import run_worker

    _exit(run_worker(once=once))


def _needs_extra(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{module} is not installed; install the extra: pip install 'pha-serve[{extra}]'")


def _exit(code: int | None) -> None:
    if code:
        raise typer.Exit(code)


class Invocation(NamedTuple):
    command: str
    params: dict[str, Any]


def parse(argv: list[str]) -> Invocation:
    """Parse a `pha` command line without running it (deployment files are checked with this)."""
    group = typer.main.get_command(app)
    if not argv or argv[0] not in group.commands:  # type: ignore[attr-defined]
        raise ValueError(f"not a pha command: {argv!r}")
    command = group.commands[argv[0]]  # type: ignore[attr-defined]
    context = command.make_context(f"pha {argv[0]}", _spread_lists(command, list(argv[1:])))
    return Invocation(argv[0], dict(context.params))


def _spread_lists(command: Any, argv: list[str]) -> list[str]:
    """`--tasks a b c` -> `--tasks a --tasks b --tasks c`: list options take several values after one flag, as
    they always have on this command line (click repeats the flag instead)."""
    lists = {opt for p in command.params if getattr(p, "multiple", False) for opt in p.opts}
    out: list[str] = []
    flag = None
    for i, token in enumerate(argv):
        if token.startswith("-"):
            flag = token if token in lists else None
        elif flag is not None and i > 0 and argv[i - 1] != flag:
            out.append(flag)
        out.append(token)
    return out


def _user_errors() -> tuple[type[BaseException], ...]:
    from pha_core.backbones import BackboneError
    from pha_core.checkpoint import CheckpointError
    from pha_core.tasks import DataError, UnknownTaskError

    return (UserError, BackboneError, CheckpointError, DataError, UnknownTaskError, ValueError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Run `pha` on `argv` (default: sys.argv) and return its exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads fight torch's for the cores
    argv = list(sys.argv[1:] if argv is None else argv)
    group = typer.main.get_command(app)
    verb = argv[0] if argv else ""
    if verb in group.commands:  # type: ignore[attr-defined]
        argv = [verb, *_spread_lists(group.commands[verb], argv[1:])]  # type: ignore[attr-defined]
    try:
        group.main(args=argv, prog_name="pha", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else _say(verb, exc.code))
    except _user_errors() as exc:
        if os.environ.get("PHA_DEBUG"):
            raise
        return _say(verb, exc)
    return 0


def _say(verb: str, problem: object) -> int:
    print(f"pha {verb}: error: {problem}", file=sys.stderr)
    return 2
