"""Train/validation/test splits, low-data sampling and proportional task mixing.

Every random choice goes through its own ``random.Random`` seeded by the caller, never the global state, so a
split or a batch order is a pure function of (data, seed) and can be rebuilt when training resumes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from pha_core.tasks import DATA_ENV_VAR, DataError, Example, get_task, read_hf, read_local

# Hyperformer's "large" tasks: validation is carved from train. Decided by the OFFICIAL train size (the local
# QQP and QNLI files are subsets) and by Hyperformer's own list, which counts SST-2 (67k rows) as large
# although pha-method.md section 5 words the rule as "under 100k".
LARGE_TASKS: frozenset[str] = frozenset({"sst2", "qqp", "mnli", "qnli"})

LARGE_VALIDATION = 1000  # rows of train held out as validation for large tasks (Hyperformer)

# Stand-in sizes for the files the data README says are missing (see split_task).
MNLI_STANDIN_TEST = 2000
MNLI_STANDIN_VALIDATION = 1000
QQP_STANDIN_VALIDATION = 1000
QQP_STANDIN_TEST = 2000
BOOLQ_STANDIN_TRAIN = 500
BOOLQ_STANDIN_VALIDATION = 500

SPLITS: tuple[str, ...] = ("train", "validation", "test")


def _shuffled(items: Sequence[Example], seed: int) -> list[Example]:
    order = list(items)
    random.Random(seed).shuffle(order)  # noqa: S311 (a seeded, reproducible split, not a secret)
    return order


def _cut(items: Sequence[Example], sizes: Sequence[int]) -> list[list[Example]]:
    """Consecutive pieces of the given sizes, then the remainder as the last piece."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(list(items[start : start + size]))
        start += size
    pieces.append(list(items[start:]))
    return pieces


def _need(task: str, raw: Mapping[str, list[Example]], split: str) -> list[Example]:
    if split not in raw:
        raise DataError(f"{task}: raw data has no {split!r} split (it has {sorted(raw)})")
    return raw[split]


def split_task(task: str, raw: Mapping[str, list[Example]], seed: int = 42) -> dict[str, list[Example]]:
    """Turn the raw splits of ``task`` into disjoint "train", "validation" and "test" lists.

    The Hyperformer rule (pha-method.md section 5):
      - small tasks: train = the full train set; validation and test = the two halves of a seeded shuffle of
        the original validation set (test gets the extra row when the count is odd);
      - large tasks (LARGE_TASKS: sst2, qqp, mnli, qnli by official size): validation = 1000 seeded rows of
        train, train = the rest, test = the original validation set;
      - MNLI with its full files: validation = validation_mismatched, test = validation_matched;
      - raw data that already has all three splits (SciTail) is used as it is.

    Stand-ins for the files the data README says are missing (all seeded, all disjoint):
      - MNLI, only dev_matched: split by premise (the data README's rule; no premise in two splits): whole
        premise groups in a seeded order fill test to >= 2000 rows, then validation to >= 1000, train the rest;
      - QQP, only a train subset: validation = 1000 seeded rows, test = the next 2000, train = the rest;
      - BoolQ, only its validation file: a seeded 1000-row pool is the few-shot source, split 500 train /
        500 validation; test = every other row (2270), so evaluation never sees a training row.

    Raises DataError when a needed raw split is absent or a result would be empty.
    """
    get_task(task)
    if all(split in raw for split in SPLITS):
        result = {split: list(raw[split]) for split in SPLITS}
    elif task == "mnli":
        result = _split_mnli(raw, seed)
    elif task == "qqp" and "validation" not in raw:
        pool = _shuffled(_need(task, raw, "train"), seed)
        validation, test, train = _cut(pool, (QQP_STANDIN_VALIDATION, QQP_STANDIN_TEST))
        result = {"train": train, "validation": validation, "test": test}
    elif task == "boolq" and "train" not in raw:
        pool = _shuffled(_need(task, raw, "validation"), seed)
        train, validation, test = _cut(pool, (BOOLQ_STANDIN_TRAIN, BOOLQ_STANDIN_VALIDATION))
        result = {"train": train, "validation": validation, "test": test}
    elif task in LARGE_TASKS:
        validation, train = _cut(_shuffled(_need(task, raw, "train"), seed), (LARGE_VALIDATION,))
        result = {"train": train, "validation": validation, "test": list(_need(task, raw, "validation"))}
    else:
        original = _shuffled(_need(task, raw, "validation"), seed)
        validation, test = _cut(original, (len(original) // 2,))
        result = {"train": list(_need(task, raw, "train")), "validation": validation, "test": test}
    empty = [split for split in SPLITS if not result[split]]
    if empty:
        sizes = {split: len(rows) for split, rows in raw.items()}
        raise DataError(f"{task}: split(s) {empty} would be empty (raw sizes {sizes})")
    return result


def _split_mnli(raw: Mapping[str, list[Example]], seed: int) -> dict[str, list[Example]]:
    matched = _need("mnli", raw, "validation_matched")
    if "train" not in raw:  # the local stand-in: everything comes from dev_matched, split by premise
        return _split_by_premise(matched, seed)
    if "validation_mismatched" in raw:
        return {
            "train": list(raw["train"]),
            "validation": list(raw["validation_mismatched"]),
            "test": list(matched),
        }
    validation, train = _cut(_shuffled(raw["train"], seed), (LARGE_VALIDATION,))
    return {"train": train, "validation": validation, "test": list(matched)}


def _split_by_premise(rows: Sequence[Example], seed: int) -> dict[str, list[Example]]:
    """Test, then validation, filled with whole premise groups in a seeded order; train gets the rest.

    Most dev_matched premises carry three hypotheses, one per label: rows cut one by one put a premise's
    siblings on both sides, and a model can answer a test row by elimination (458 of 500 test rows did).
    Groups are whole, so test and validation reach at least their stand-in sizes, by less than one group more.
    """
    groups: dict[str, list[Example]] = {}
    for row in rows:
        groups.setdefault(row.fields[0] if row.fields else row.input, []).append(row)
    order = _shuffled(list(groups), seed)
    result: dict[str, list[Example]] = {"test": [], "validation": [], "train": []}
    targets = (("test", MNLI_STANDIN_TEST), ("validation", MNLI_STANDIN_VALIDATION))
    for premise in order:
        split = next((name for name, size in targets if len(result[name]) < size), "train")
        result[split] += groups[premise]
    return {"train": result["train"], "validation": result["validation"], "test": result["test"]}


def low_data(
    examples: Sequence[Example], n: int | None = None, fraction: float | None = None, seed: int = 42
) -> list[Example]:
    """A seeded sample: shuffle, then keep the first ``n`` or ``round(fraction * len)`` examples.

    Give exactly one of ``n`` and ``fraction``. When ``n`` exceeds the data every example is kept (RTE has
    fewer than 4000 training rows); a fraction keeps at least one example of non-empty data. Because the
    sample is a prefix of one shuffle, a smaller n is always a subset of a larger n with the same seed.
    """
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n and fraction")
    if n is not None:
        if isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        count = n
    else:
        if not 0.0 < fraction <= 1.0:  # type: ignore[operator]
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        count = max(1, round(fraction * len(examples))) if examples else 0  # type: ignore[operator]
    return _shuffled(examples, seed)[:count]


def load_splits(
    tasks: Sequence[str],
    data_dir: Path | None,
    seed: int = 42,
    n_train: int | None = None,
    fraction: float | None = None,
    max_eval: int | None = None,
    sample_seed: int | None = None,
) -> dict[str, dict[str, list[Example]]]:
    """Read, split and sample several tasks: {task: {"train", "validation", "test"}}.

    Reads the local files under ``data_dir`` (Hugging Face when it is None), applies split_task, keeps a
    low-data sample of train when ``n_train`` or ``fraction`` is given, and caps validation and test at
    ``max_eval`` seeded rows (for quick evaluations). ``seed`` makes the splits and the capped evaluation
    rows; ``sample_seed`` (default: ``seed``) draws the training sample, so runs with different sample seeds
    are compared on the same validation and test rows.
    """
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks listed twice: {list(tasks)}")
    if max_eval is not None and max_eval < 1:
        raise ValueError(f"max_eval must be positive, got {max_eval}")
    result = {}
    for task in tasks:
        raw = read_hf(task) if data_dir is None else read_local(task, Path(data_dir))
        splits = split_task(task, raw, seed=seed)
        if n_train is not None or fraction is not None:
            draw = seed if sample_seed is None else sample_seed
            splits["train"] = low_data(splits["train"], n=n_train, fraction=fraction, seed=draw)
        if max_eval is not None:
            for split in ("validation", "test"):
                if len(splits[split]) > max_eval:
                    splits[split] = low_data(splits[split], n=max_eval, seed=seed)
        result[task] = splits
    return result


def data_dir_from_env() -> Path:
    """$PHA_DATA_DIR, or ../shared/data; a relative path is taken from the current working directory."""
    return (Path.cwd() / Path(os.environ.get(DATA_ENV_VAR, "../shared/data")).expanduser()).resolve()


class ProportionalMixer:
    """Endless batches drawn from the union of the tasks' training sets (proportional mixing).

    Each epoch is a seeded permutation of the concatenated examples, so every example is seen once per epoch
    and a task fills batches in proportion to its size; mixed-task batches are what the instance contrastive
    loss needs. Batches are always full: the last one of an epoch continues into the next permutation.

    `repeats` up-samples: a task's rows enter the pool that many times (default 1), so it fills that many
    times its share of each batch and is seen that many times per epoch.

    Epoch e's permutation depends only on (seed, e), so the position after k batches is plain arithmetic:
    state_dict() saves k and load_state_dict() resumes exactly, without replaying the draws.
    """

    def __init__(
        self,
        train_sets: Mapping[str, Sequence[Example]],
        batch_size: int,
        seed: int = 42,
        repeats: Mapping[str, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        repeats = dict(repeats or {})
        unknown = sorted(set(repeats) - set(train_sets))
        if unknown:
            raise ValueError(f"repeats name tasks that are not mixed: {', '.join(unknown)}")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in repeats.values()):
            raise ValueError(f"repeats must be whole numbers >= 1, got {repeats}")
        self._pool: tuple[Example, ...] = tuple(
            ex for task in train_sets for _ in range(repeats.get(task, 1)) for ex in train_sets[task]
        )
        if not self._pool:
            raise ValueError("no training examples to mix")
        # What the mix is made of (rows x repeats); a resumed stream must find the same.
        sizes = {task: len(rows) * repeats.get(task, 1) for task, rows in train_sets.items()}
        self.sizes: Mapping[str, int] = MappingProxyType(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self._drawn = 0
        self._epoch = -1
        self._order: list[int] = []

    @property
    def batches_drawn(self) -> int:
        return self._drawn

    @property
    def epoch_size(self) -> int:
        return len(self._pool)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self._pool)))
            # A string seed is hashed with SHA-512 by random.seed, so it is stable across runs and processes.
            random.Random(f"pha-mixer:{self.seed}:{epoch}").shuffle(order)  # noqa: S311 (seeded batch order)
            self._epoch, self._order = epoch, order
        return self._order

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        start = self._drawn * self.batch_size
        batch = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, len(self._pool))
            batch.append(self._pool[self._permutation(epoch)[offset]])
        self._drawn += 1
        return batch

    def state_dict(self) -> dict[str, object]:
        """What resuming needs, plus what must match for the resume to be the same stream."""
        return {
            "batches_drawn": self._drawn,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "sizes": dict(self.sizes),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue after state["batches_drawn"] batches; refuses a state from a different data set-up."""
        for key, mine in (("batch_size", self.batch_size), ("seed", self.seed), ("sizes", dict(self.sizes))):
            if key in state and state[key] != mine:
                raise ValueError(f"mixer state has {key}={state[key]!r}, this mixer has {mine!r}")
        drawn = state["batches_drawn"]
        if not isinstance(drawn, int) or drawn < 0:
            raise ValueError(f"batches_drawn must be a non-negative int, got {drawn!r}")
        self._drawn = drawn
