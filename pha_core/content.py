"""The content check: is a routed input's text like the texts its task was trained on?

Routing (Eq. 10) and its typicality (calibration.py) read z, which the retriever was trained to pull towards
some prototype: an input of no task's kind written in a task's template ("sentence: asdkjh qwe") lands near
that task's key as readily as the task's own rows do. The content check asks a second, independent question
of the same frozen encoder: embed the input's text without its template markers, adapters off, mean-pooled
over its first LAYERS layers and L2-normalised, and compare it with a bank of the task's training texts
embedded the same way. The score is the cosine to the K-th nearest bank row (a k-NN density
estimate: Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"), and its typicality,
as for the cosine, is a conformal p-value: the share of the task's held-out rows whose score is at most this
one's.

Measured on the demo (bench/routing.py, docs/results.md section 5), at the served threshold 0.02: 0.902 of
the out-of-distribution test set answered "no task fits" with 0.975 of the GLUE test rows still routed; the
cosine typicality alone: 0.808 and 0.971. Tasks without a bank (adapted ones: a handful of rows is no density
estimate) are judged by the cosine typicality.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import LEVELS
from .files import write_atomic
from .tasks import FIELD_MARKERS

# Bank rows per task: the first rows of the training sample. 250 x 384 fp16 = 192 KB a task; on the demo, 1000
# rows a task did not turn away more out-of-distribution inputs at the same coverage (runs/, session 8).
BANK_ROWS = 250
# Neighbours the score reads: the K-th nearest bank row. K = 1 follows single near-duplicates (an OOD text
# that happens to resemble one training row); 10 of 250 measured best on the demo's OOD dev half.
K = 10
# Encoder layers the content embedding reads: the first 3 of MiniLM's 6, half an encoder pass. On the demo's
# OOD dev half, layer by layer at the served threshold (GLUE test rows kept / OOD turned away): 1: 0.983 /
# 0.81, 2: 0.984 / 0.88, 3: 0.977 / 0.93, 4: 0.966 / 0.93, 5: 0.972 / 0.85, 6 (the sentence embedding):
# 0.975 / 0.91. Mid layers keep more of the surface (language, script, code punctuation) the last layers
# trade for meaning.
LAYERS = 3  # or the whole encoder, when it is shallower
FILE = "content_bank.npz"

_MARKERS = re.compile(r"(?<!\S)(?:" + "|".join(re.escape(m) for m in FIELD_MARKERS) + r")\s*")


def content_text(text: str) -> str:
    """The input without its template's field markers ("premise: a hypothesis: b" -> "a b")."""
    return " ".join(_MARKERS.sub(" ", text).split())


def content_source(model, texts: Sequence[str]):
    """The tokenised encoder input of the content check: each text without its markers, as one sequence."""
    from .source import make_source

    return make_source(model.backbone, [content_text(t) for t in texts], model.config.max_source_length, False)


def content_vectors(model, texts: Sequence[str], source=None) -> np.ndarray:
    """Unit content vectors [B, d] of formatted inputs: the frozen encoder's first LAYERS layers (adapters off)
    over each text without its markers, mean-pooled; the same whatever the model's `encoding`. `source`:
    content_source(texts), when the caller tokenised already."""
    import torch

    from .retriever import masked_mean
    from .source import encode_by_length

    if not texts:
        return np.zeros((0, model.backbone.d_model), dtype=np.float32)
    source = (source if source is not None else content_source(model, texts)).to(model.device)
    with torch.inference_mode(), model.adapter_switch.off():

        def first_layers(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.backbone.encode_first_layers(ids, mask, min(LAYERS, model.n_encoder_layers))

        hidden = encode_by_length(first_layers, source)
        pooled = masked_mean(hidden, source.segment_mask).float()
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def kth_nearest(vectors: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Cosine of each row of `vectors` [B, d] (unit) to its K-th nearest row of `bank` [n, d] (unit)."""
    sims = np.asarray(vectors, dtype=np.float32) @ np.asarray(bank, dtype=np.float32).T  # no copy when float32
    k = min(K, sims.shape[1])
    return np.partition(sims, -k, axis=1)[:, -k]


@dataclass(frozen=True)
class TaskBank:
    """One task's bank: unit vectors [n, d] of its training texts, and its held-out scores at LEVELS."""

    vectors: np.ndarray
    quantiles: np.ndarray

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        return kth_nearest(vectors, self.vectors)

    def typicality(self, vectors: np.ndarray) -> np.ndarray:
        """Share of held-out rows whose score is at most each row's (0..1)."""
        return np.interp(self.scores(vectors), self.quantiles, LEVELS, left=0.0, right=1.0)


@dataclass(frozen=True)
class ContentBank:
    """The banks of a model's trained tasks; saved next to its checkpoint."""

    banks: Mapping[str, TaskBank]

    def __contains__(self, task: str) -> bool:
        return task in self.banks

    def typicality(self, task: str, vectors: np.ndarray) -> np.ndarray | None:
        bank = self.banks.get(task)
        return None if bank is None else bank.typicality(vectors)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        arrays = {f"vectors/{t}": b.vectors.astype(np.float16) for t, b in self.banks.items()}
        arrays |= {f"quantiles/{t}": b.quantiles.astype(np.float64) for t, b in self.banks.items()}
        meta = json.dumps({"k": K, "levels": list(LEVELS)})

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to the temp name
                np.savez(f, meta=np.array(meta), **arrays)

        write_atomic(path, write)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ContentBank | None:
        """The bank stored with a checkpoint, or None when it has none."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                banks = {
                    key.split("/", 1)[1]: TaskBank(
                        vectors=data[key].astype(np.float32), quantiles=data["quantiles/" + key.split("/", 1)[1]]
                    )
                    for key in data.files
                    if key.startswith("vectors/")
                }
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path} is not a valid content bank ({exc}); refit it with `pha calibrate`") from exc
        if meta.get("levels") != list(LEVELS):
            raise ValueError(f"{path} was fitted at other levels; refit it with `pha calibrate`")
        for task, bank in banks.items():
            if bank.quantiles.shape != (len(LEVELS),) or bank.vectors.ndim != 2 or not len(bank.vectors):
                raise ValueError(f"{path}: the bank of {task!r} is malformed; refit it with `pha calibrate`")
        return cls(banks)


def fit_content_bank(
    embed: Callable[[list[str]], np.ndarray],
    train: Mapping[str, Sequence[str]],
    held_out: Mapping[str, Sequence[str]],
) -> ContentBank:
    """Banks from each task's first BANK_ROWS training texts, quantiles from its held-out texts.

    `embed` maps formatted inputs to unit content vectors (Engine.content_vectors)."""
    banks = {}
    for task, texts in train.items():
        rows, checks = list(texts[:BANK_ROWS]), list(held_out.get(task, ()))
        if not rows or not checks:
            raise ValueError(f"a content bank for {task!r} needs training and held-out rows")
        vectors = embed(rows).astype(np.float16).astype(np.float32)  # as stored, so the quantiles fit the file
        scores = kth_nearest(embed(checks), vectors).astype(np.float64)
        banks[task] = TaskBank(vectors=vectors, quantiles=np.maximum.accumulate(np.quantile(scores, LEVELS)))
    return ContentBank(banks)
