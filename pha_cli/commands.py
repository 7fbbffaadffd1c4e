"""What each `pha` verb does, given its parsed options (app.py wires them to the command line).

The verbs that train or read models live here; `serve` and `worker` are in app.py because they only hand over
to the service package. Heavy imports (torch, transformers) happen inside the verbs, so `pha --help` is quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pha_core.config import BackboneConfig, PHAConfig

from .errors import UserError
from .options import given


def load_yaml(path: str | None) -> dict[str, Any]:
    """A recipe file: a mapping with sections `model:` and/or `train:`."""
    if not path:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise UserError(f"{path} must be a mapping with sections 'model' and/or 'train'")
    return data


def model_config(values: dict[str, Any], base: dict[str, Any]) -> PHAConfig:
    """The file's `model:` section with the model flags the user typed on top."""
    data = dict(base)
    backbone = {**(data.pop("backbone", {}) or {}), **given(BackboneConfig, values)}
    return PHAConfig(backbone=BackboneConfig(**backbone), **{**data, **given(PHAConfig, values)})


def train(values: dict[str, Any]) -> None:
    from pha_core.calibration import calibrate
    from pha_core.evaluate import evaluate, format_table
    from pha_core.label_prior import fit_label_prior
    from pha_core.params import format_report
    from pha_core.train import TrainConfig, Trainer, loss_trend

    recipe = load_yaml(values["config"])
    tcfg = TrainConfig(**{**recipe.get("train", {}), **given(TrainConfig, values)})
    trainer = Trainer(tcfg, model_config(values, recipe.get("model", {})), resume=values["resume"])
    if trainer.dist.is_main:
        print(format_report(trainer.model), flush=True)

    def eval_fn(model, split):
        return evaluate(model, {t: s[split] for t, s in trainer.splits.items()})

    result = trainer.run(eval_fn)
    if not trainer.dist.is_main:
        return
    for key in ("ce", "ir", "pro"):
        first, last = loss_trend(result["history"], key)
        print(f"{key}: {first:.4f} (first quarter) -> {last:.4f} (last quarter)")
    print(f"checkpoint written to {tcfg.output} ({result['train_seconds']:.0f} s)")
    held_out = {t: s["validation"] for t, s in trainer.splits.items()}
    prior = fit_label_prior(trainer.model, held_out)
    print(f"label prior (validation rows) written to {prior.save(tcfg.output)}")
    if trainer.model.config.routes_by_prototype:
        path = calibrate(trainer.model, held_out).save(tcfg.output)
        print(f"route calibration (validation rows) written to {path}")
        path = fit_content(trainer.model, trainer.splits).save(tcfg.output)
        print(f"content bank (training rows, validation rows) written to {path}")
    if not values["no_eval"]:
        # The prior was fitted on these rows: the table shows the decoder as trained (`pha eval` applies it).
        print("validation:\n" + format_table(evaluate(trainer.model, held_out)))


def pretrain(values: dict[str, Any]) -> None:
    from pha_core.pretrain import DECODER_FILE, PretrainConfig, Pretrainer

    cfg = PretrainConfig(**given(PretrainConfig, values))
    trainer = Pretrainer(cfg, resume=values["resume"])
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


def fit_content(model, splits: dict[str, dict[str, list]]):
    """The content bank of a model's tasks: training texts in the bank, validation texts for its quantiles."""
    from pha_core.content import embed_texts, fit_content_bank

    def texts(split: str) -> dict[str, list[str]]:
        return {t: [e.input for e in s[split]] for t, s in splits.items()}

    return fit_content_bank(lambda rows: embed_texts(model.eval(), rows), texts("train"), texts("validation"))


def _held_out(checkpoint: str, tasks: list[str], data_dir: str | None, rows: int, n_train: int = 1):
    """The validation and test rows a checkpoint's recipe split off, `rows` per task (and the first `n_train`
    rows of its training sample)."""
    from pha_core.recipes import TrainConfig
    from pha_core.train import load_data, recipe_of

    recipe = recipe_of(checkpoint)
    tcfg = TrainConfig(
        tasks=tasks,
        data_dir=data_dir or recipe.get("data_dir"),
        n_train=n_train,
        seed=recipe.get("seed", 42),
        split_seed=recipe.get("split_seed", 42),
        max_eval=rows,
    )
    return load_data(tcfg), tcfg.split_seed


def evaluate(values: dict[str, Any]) -> None:
    import torch

    from pha_core.checkpoint import load_checkpoint
    from pha_core.evaluate import evaluate, format_table
    from pha_core.files import write_atomic
    from pha_core.label_prior import LabelPrior
    from pha_core.precision import autocast, serve_in
    from pha_core.runtime import resolve_device

    if values["threads"]:
        torch.set_num_threads(values["threads"])
    model = load_checkpoint(values["checkpoint"], device=resolve_device(values["device"]))
    tasks = values["tasks"] or model.tasks
    unknown = sorted(set(tasks) - set(model.tasks))
    if unknown:
        raise UserError(f"the checkpoint has no task(s) {unknown}; it knows {model.tasks}")
    splits, split_seed = _held_out(values["checkpoint"], tasks, values["data_dir"], values["max_eval"])
    rows = {t: s[values["split"]] for t, s in splits.items()}
    prior = LabelPrior.load(values["checkpoint"]) if values["label_prior"] else None
    if values["label_prior"] and prior is None:
        print(f"no label prior in {values['checkpoint']}: probabilities as the decoder gives them (`pha calibrate`)")
    if prior is not None and values["split"] == "validation":
        print("note: the label prior was fitted on these validation rows; --no-label-prior for figures without it")
    precision = serve_in(model, values["precision"])
    with autocast(precision, model.device):
        report = evaluate(model, rows, batch_size=values["batch_size"], decoding=values["decoding"], prior=prior)
    report.update(
        checkpoint=Path(values["checkpoint"]).name,
        split=values["split"],
        max_eval=values["max_eval"],
        split_seed=split_seed,
        decoding=values["decoding"],
        precision=precision,
    )
    print(format_table(report))
    if values["output"]:
        out = Path(values["output"])
        write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        print(f"written to {out}")


def calibrate(values: dict[str, Any]) -> None:
    from pha_core.calibration import calibrate
    from pha_core.checkpoint import load_checkpoint
    from pha_core.content import BANK_ROWS
    from pha_core.label_prior import fit_label_prior

    model = load_checkpoint(values["checkpoint"])
    splits, _ = _held_out(values["checkpoint"], model.tasks, values["data_dir"], values["max_rows"], BANK_ROWS)
    held_out = {t: s["validation"] for t, s in splits.items()}
    calibration = calibrate(model, held_out)
    path = calibration.save(values["checkpoint"])
    prior = fit_label_prior(model, held_out)
    prior_path = prior.save(values["checkpoint"])
    offsets = ", ".join(f"{t} {max(v) - min(v):.2f}" for t, v in prior.offsets.items())
    temperatures = ", ".join(f"{t} {v:.2f}" for t, v in prior.temperatures.items())
    print(f"label prior (largest offset gap per task): {offsets}; temperatures: {temperatures}")
    print(f"written to {prior_path}")
    bank = fit_content(model, splits).save(values["checkpoint"])
    spreads = ", ".join(f"{t} {s.center:.3f}+-{s.scale:.3f}" for t, s in calibration.spreads.items())
    print(f"{calibration.rows} validation rows; cosine to own key (median+-IQR): {spreads}")
    print(f"confidence = sigmoid({calibration.intercept:.3f} + {calibration.slope:.3f} * margin)")
    print(f"written to {path}; content bank ({BANK_ROWS} training rows a task) to {bank}")


def params(values: dict[str, Any]) -> None:
    from pha_core.params import format_report

    if values["checkpoint"]:
        from pha_core.checkpoint import load_checkpoint

        model = load_checkpoint(values["checkpoint"])
    else:
        from pha_core.model import PHAModel
        from pha_core.tasks import GLUE_TASKS

        recipe = load_yaml(values["config"])
        mcfg = model_config(values, recipe.get("model", {}))
        mcfg.tasks = values["tasks"] or recipe.get("train", {}).get("tasks") or list(GLUE_TASKS)
        model = PHAModel(mcfg)
    print(format_report(model))


def report(values: dict[str, Any]) -> None:
    from pha_core.report import make_report

    for path in make_report(
        values["checkpoint"], Path(values["output"]), max_eval=values["max_eval"], data_dir=values["data_dir"]
    ):
        print(f"written {path}")
