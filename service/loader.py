"""Which model the service serves: PHA_CHECKPOINT, else the bundled demo checkpoint, else an untrained default.

The untrained default exists so that `pha serve` answers on a fresh install; its predictions are meaningless, and
the start-up log says so in a WARNING. It is built from a fixed seed, so its model version (and with it every
cache key) is the same on every start and every replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from pha_core import runtime
from pha_core.calibration import RouteCalibration
from pha_core.checkpoint import CONFIG_FILE, load_checkpoint, read_meta
from pha_core.content import ContentBank
from pha_core.inference import Engine
from pha_core.label_prior import LabelPrior
from pha_core.variants import VARIANTS

from .settings import Settings

log = logging.getLogger("pha.loader")

UNTRAINED = "untrained-default"
UNTRAINED_SEED = 0


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    source: str  # the checkpoint path, "demo", or UNTRAINED
    created: datetime  # when the checkpoint was written (load time for the untrained default)
    examples: int | None  # training examples per task, when the checkpoint's recipe says
    calibration: RouteCalibration | None = None  # fitted on held-out rows (`pha calibrate`); None: not fitted
    content: ContentBank | None = None  # the trained tasks' content banks (`pha calibrate`); None: not fitted
    label_prior: LabelPrior | None = None  # the trained label tasks' offsets (`pha calibrate`); None: not fitted


def demo_checkpoint() -> Path:
    return Path(str(resources.files("pha_core"))) / "assets" / "demo"


def load_model(settings: Settings) -> LoadedModel:
    threads = runtime.set_threads(settings.torch_threads)
    device = runtime.resolve_device(settings.device)
    if settings.checkpoint:
        loaded = _from_checkpoint(Path(settings.checkpoint), str(Path(settings.checkpoint)), device, settings.precision)
    elif (demo_checkpoint() / CONFIG_FILE).is_file():
        loaded = _from_checkpoint(demo_checkpoint(), "demo", device, settings.precision)
    else:
        loaded = _untrained(device, settings.precision)
    check_servable(loaded.engine)
    log.info(
        "model loaded",
        extra={
            "source": loaded.source,
            "model_version": loaded.engine.model_version,
            "device": device,
            "precision": loaded.engine.precision,
            "torch_threads": threads,
            "tasks": loaded.engine.tasks,
            "variant": loaded.engine.config.variant,
        },
    )
    return loaded


def _from_checkpoint(path: Path, source: str, device: str, precision: str) -> LoadedModel:
    model = load_checkpoint(path, device=device)
    recipe = read_meta(path).get("recipe", {})
    n_train = recipe.get("n_train")
    created = datetime.fromtimestamp((path / CONFIG_FILE).stat().st_mtime, tz=timezone.utc)
    calibration = RouteCalibration.load(path)
    if calibration is None:
        log.warning(
            "the checkpoint has no route calibration: routed inputs are never turned away as fitting no task; "
            f"fit one with `pha calibrate {path}`"
        )
    content = ContentBank.load(path)
    if calibration is not None and content is None:
        log.warning(
            "the checkpoint has no content bank: inputs of no task's kind written in a task's template are judged "
            f"by the route cosine alone; fit one with `pha calibrate {path}`"
        )
    prior = LabelPrior.load(path)
    if prior is None:
        log.warning(
            "the checkpoint has no label prior: label probabilities are the decoder's as trained (a training mix "
            f"with up-sampled or balanced labels shifts them); fit one with `pha calibrate {path}`"
        )
    examples = n_train if isinstance(n_train, int) else None
    return LoadedModel(Engine(model, precision=precision), source, created, examples, calibration, content, prior)


def _untrained(device: str, precision: str) -> LoadedModel:
    from pha_core.config import PHAConfig
    from pha_core.model import PHAModel
    from pha_core.tasks import GLUE_TASKS

    log.warning(
        "NO CHECKPOINT: serving an UNTRAINED default model (random adapters and prototypes); its predictions are "
        "meaningless. Set PHA_CHECKPOINT to a directory written by `pha train`, or install the demo checkpoint at "
        f"{demo_checkpoint()}."
    )
    runtime.seed(UNTRAINED_SEED)
    model = PHAModel(PHAConfig(tasks=list(GLUE_TASKS))).to(device).eval()
    return LoadedModel(Engine(model, precision=precision), UNTRAINED, datetime.now(timezone.utc), None)


def check_servable(engine: Engine) -> None:
    # A task is served as its vector (`Engine.adapters_for_prototype`): adapter tables, z-conditioned adapters
    # and per-task encoder adapters need model calls the Engine does not offer.
    method = engine.config.method
    if not method.served_from_vector:
        servable = [v.name for v in VARIANTS.values() if v.served_from_vector]
        raise ValueError(
            f"a {method.name!r} model cannot be served: the service serves the variants {servable} "
            "(decoder adapters generated from a task vector)"
        )
