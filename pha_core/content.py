"""The content check: is a routed input's text like the texts its task was trained on?

Routing (Eq. 10) and its typicality (calibration.py) read z, which the retriever was trained to pull towards
some prototype: an input of no task's kind written in a task's template ("sentence: asdkjh qwe") lands near
that task's key as readily as the task's own rows do. The content check asks a second question of the same
encoder pass: the input's states after the encoder's first LAYER layers (shared adapters on, the text as
served, template markers included), mean-pooled over its tokens and L2-normalised, compared with a bank of the
task's training texts embedded the same way. The score is the cosine to the K-th nearest bank row (a k-NN
density estimate: Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"), and its
typicality, as for the cosine, is a conformal p-value: the share of the task's held-out rows whose score is at
most this one's.

The states come from the pass that serves the input (PHAModel.encode_keeping), so the check costs a mean and a
matrix product, not an encoder pass. Until session 10 it was a second pass of the frozen encoder (adapters
off) over the text without its markers, layer 3: a third of a routed input's model time on the CPU.
Measured on the demo (session 10; docs/results.md section 5 has the served figures), at the served threshold
0.02, over the OOD inputs written in a task's template (the others fit no template and are turned away before
any check) and the GLUE test rows: dev half, layer 2 / 3 / 4 / 6 of this pass: GLUE rows kept 0.989 / 0.985 /
0.969 / 0.981, template-shaped OOD turned away 0.76 / 0.73 / 0.51 / 0.28; the previous second pass 0.973 /
0.69. Tasks without a bank (adapted ones: a handful of rows is no density estimate) are judged by the cosine
typicality.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import LEVELS
from .files import write_atomic

# Bank rows per task: the first rows of the training sample. 250 x 384 fp16 = 192 KB a task; on the demo, 1000
# rows a task did not turn away more out-of-distribution inputs at the same coverage (runs/, session 8).
BANK_ROWS = 250
# Neighbours the score reads: the K-th nearest bank row. K = 1 follows single near-duplicates (an OOD text
# that happens to resemble one training row); 10 of 250 measured best on the demo's OOD dev half.
K = 10
# Encoder layer the content vector reads (of MiniLM's 6), chosen on the demo's OOD dev half (module docstring):
# early layers keep the surface (language, script, code punctuation) the last layers trade for meaning.
LAYER = 2  # or the last layer, when the encoder is shallower
# What a bank's vectors are; a bank fitted on other vectors is refused (its quantiles would not fit).
VECTORS = "encoder pass, layer 2, adapters on, markers kept"
FILE = "content_bank.npz"


def content_layer(model) -> int:
    return min(LAYER, model.n_encoder_layers)


def content_vectors(states, source) -> np.ndarray:
    """Unit content vectors [B, d]: each input's states at the content layer [N, L, d] (source rows, from
    PHAModel.encode_keeping) averaged over all of its real tokens, every field's, and L2-normalised."""
    import torch

    flat = states.reshape(-1, states.size(-1))[source.token_index].float()  # [B, T, d], one row per input
    weights = source.token_mask.unsqueeze(-1).to(flat.dtype)
    pooled = (flat * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def embed_texts(model, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Content vectors of formatted inputs, as serving computes them (bank fitting, checks)."""
    import torch

    out = [np.zeros((0, model.backbone.d_model), dtype=np.float32)]
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            source = model.source(list(texts[start : start + batch_size]))
            *_, states = model.encode_keeping(source, content_layer(model))
            out.append(content_vectors(states, source))
    return np.concatenate(out)


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
        meta = json.dumps({"k": K, "levels": list(LEVELS), "vectors": VECTORS})

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
        if meta.get("vectors") != VECTORS:
            raise ValueError(
                f"{path} holds other content vectors ({meta.get('vectors', 'a second pass, layer 3')!r}, not "
                f"{VECTORS!r}); refit it with `pha calibrate`"
            )
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

    `embed` maps formatted inputs to unit content vectors (embed_texts)."""
    banks = {}
    for task, texts in train.items():
        rows, checks = list(texts[:BANK_ROWS]), list(held_out.get(task, ()))
        if not rows or not checks:
            raise ValueError(f"a content bank for {task!r} needs training and held-out rows")
        vectors = embed(rows).astype(np.float16).astype(np.float32)  # as stored, so the quantiles fit the file
        scores = kth_nearest(embed(checks), vectors).astype(np.float64)
        banks[task] = TaskBank(vectors=vectors, quantiles=np.maximum.accumulate(np.quantile(scores, LEVELS)))
    return ContentBank(banks)
