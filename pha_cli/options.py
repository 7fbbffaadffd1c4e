"""Command-line options made from the recipe dataclasses (TrainConfig, PHAConfig, PretrainConfig, ...).

A field declared with `pha_core.config.knob` is an option: its name (or its `flag`) is the option, its type the
option's type, its `doc` and default the help line. Every option defaults to None, meaning "not given", so a
value from a YAML config file is only overridden by a flag the user typed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any, get_type_hints

import typer


@dataclasses.dataclass(frozen=True)
class Knob:
    """One option of one recipe dataclass."""

    field: str  # the dataclass field
    param: str  # the Python name typer turns into the flag (`backbone_kind` -> `--backbone-kind`)
    parameter: inspect.Parameter


def knobs(recipe: type) -> list[Knob]:
    """The options of `recipe`: its fields that carry a `doc`, in declaration order."""
    hints = get_type_hints(recipe)
    found = []
    for f in dataclasses.fields(recipe):
        doc = f.metadata.get("doc")
        if not doc:
            continue
        param = (f.metadata.get("flag") or f.name).replace("-", "_")
        option = typer.Option(help=_help(doc, f.default))
        annotation = Annotated[hints[f.name] | None, option]
        parameter = inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        found.append(Knob(f.name, param, parameter))
    return found


def _help(doc: str, default: Any) -> str:
    shown = default not in (None, dataclasses.MISSING) and not isinstance(default, bool)
    return f"{doc} ({default})" if shown else doc


def given(recipe: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields of `recipe` the user set on the command line, keyed by field name."""
    return {k.field: values[k.param] for k in knobs(recipe) if values.get(k.param) is not None}
