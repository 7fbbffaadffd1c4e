"""Split rule, stand-ins, low-data sampling, proportional mixing; then the splits of the real files."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from pha_core.data import (
    ProportionalMixer,
    data_dir_from_env,
    load_splits,
    low_data,
    split_task,
)
from pha_core.tasks import LOCAL_SOURCES, DataError, Example, UnknownTaskError, read_local


def examples(task: str, n: int, tag: str = "") -> list[Example]:
    """Distinct synthetic examples, so set operations tell rows apart."""
    return [Example(input=f"sentence: {tag}{i}", target="x", task=task) for i in range(n)]


def assert_disjoint_cover(splits: dict[str, list[Example]], *sources: list[Example]) -> None:
    """The three splits are pairwise disjoint and use each source row at most once."""
    used = Counter(ex for rows in splits.values() for ex in rows)
    assert max(used.values()) == 1
    assert not used - Counter(ex for rows in sources for ex in rows)


# ------------------------------------------------------------------------------------------------ split rule


def test_small_task_halves_the_original_validation() -> None:
    raw = {"train": examples("cola", 50, "t"), "validation": examples("cola", 21, "v")}
    splits = split_task("cola", raw, seed=1)
    assert splits["train"] == raw["train"]
    assert (len(splits["validation"]), len(splits["test"])) == (10, 11)
    assert set(splits["validation"]) | set(splits["test"]) == set(raw["validation"])
    assert_disjoint_cover(splits, raw["train"], raw["validation"])


def test_large_task_takes_validation_from_train() -> None:
    raw = {"train": examples("sst2", 3000, "t"), "validation": examples("sst2", 100, "v")}
    splits = split_task("sst2", raw)
    assert splits["test"] == raw["validation"]
    assert (len(splits["train"]), len(splits["validation"])) == (2000, 1000)
    assert set(splits["validation"]) <= set(raw["train"])
    assert_disjoint_cover(splits, raw["train"], raw["validation"])


def test_qnli_subset_counts_as_large() -> None:
    raw = {"train": examples("qnli", 1500, "t"), "validation": examples("qnli", 30, "v")}
    splits = split_task("qnli", raw)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [500, 1000, 30]


def test_mnli_standin_carves_everything_from_dev_matched() -> None:
    raw = {"validation_matched": examples("mnli", 4000)}
    splits = split_task("mnli", raw)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1000, 1000, 2000]
    assert_disjoint_cover(splits, raw["validation_matched"])


def test_mnli_standin_never_puts_one_premise_in_two_splits() -> None:
    rows = [
        Example(f"premise: p{i} hypothesis: h{j}", "x", "mnli", fields=(f"p{i}", f"h{j}"))
        for i in range(1500)
        for j in range(3)
    ]
    splits = split_task("mnli", {"validation_matched": rows})
    premises = {name: {ex.fields[0] for ex in part} for name, part in splits.items()}
    assert not premises["train"] & premises["test"] and not premises["train"] & premises["validation"]
    assert not premises["validation"] & premises["test"]
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1497, 1002, 2001]
    assert_disjoint_cover(splits, rows)


def test_mnli_full_files_use_mismatched_and_matched() -> None:
    train, matched = examples("mnli", 2000, "t"), examples("mnli", 10, "m")
    mismatched = examples("mnli", 12, "mm")
    full = split_task("mnli", {"train": train, "validation_matched": matched, "validation_mismatched": mismatched})
    assert full == {"train": train, "validation": mismatched, "test": matched}
    no_mismatched = split_task("mnli", {"train": train, "validation_matched": matched})
    assert [len(no_mismatched[s]) for s in ("train", "validation", "test")] == [1000, 1000, 10]


def test_qqp_standin_carves_validation_and_test_from_train() -> None:
    raw = {"train": examples("qqp", 5000)}
    splits = split_task("qqp", raw)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [2000, 1000, 2000]
    assert_disjoint_cover(splits, raw["train"])


def test_boolq_standin_keeps_a_few_shot_pool_apart_from_test() -> None:
    raw = {"validation": examples("boolq", 1500)}
    splits = split_task("boolq", raw)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [500, 500, 500]
    assert_disjoint_cover(splits, raw["validation"])


def test_boolq_with_a_train_file_follows_the_small_rule() -> None:
    raw = {"train": examples("boolq", 30, "t"), "validation": examples("boolq", 10, "v")}
    splits = split_task("boolq", raw)
    assert splits["train"] == raw["train"] and len(splits["validation"]) == len(splits["test"]) == 5


def test_three_given_splits_are_kept() -> None:
    raw = {split: examples("scitail", 3, split) for split in ("train", "validation", "test")}
    assert split_task("scitail", raw) == raw


@pytest.mark.parametrize(
    ("task", "raw"),
    [
        ("cola", {"train": examples("cola", 10)}),  # no validation to halve
        ("mnli", {"train": examples("mnli", 10)}),  # no matched set for test
        ("qqp", {"validation": examples("qqp", 10)}),
    ],
)
def test_missing_raw_split_is_a_data_error(task: str, raw: dict[str, list[Example]]) -> None:
    with pytest.raises(DataError, match="has no"):
        split_task(task, raw)


@pytest.mark.parametrize(
    ("task", "raw"),
    [
        ("cola", {"train": examples("cola", 10), "validation": examples("cola", 1, "v")}),
        ("qqp", {"train": examples("qqp", 3000)}),
        ("boolq", {"validation": examples("boolq", 1000)}),
        ("sst2", {"train": examples("sst2", 1000), "validation": examples("sst2", 5, "v")}),
    ],
)
def test_empty_split_is_a_data_error(task: str, raw: dict[str, list[Example]]) -> None:
    with pytest.raises(DataError, match="would be empty"):
        split_task(task, raw)


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(UnknownTaskError):
        split_task("wnli", {"train": examples("wnli", 10), "validation": examples("wnli", 10)})


def test_splits_are_deterministic_and_the_seed_matters() -> None:
    raw = {"train": examples("qqp", 5000)}
    before = random.getstate()
    assert split_task("qqp", raw, seed=7) == split_task("qqp", raw, seed=7)
    assert split_task("qqp", raw, seed=7)["test"] != split_task("qqp", raw, seed=8)["test"]
    assert random.getstate() == before  # the global random state is never used
    small = {"train": examples("rte", 10), "validation": examples("rte", 40, "v")}
    assert split_task("rte", small, seed=1)["test"] != split_task("rte", small, seed=2)["test"]


# -------------------------------------------------------------------------------------------------- low data


def test_low_data_n_and_fraction() -> None:
    rows = examples("rte", 200)
    sample = low_data(rows, n=50, seed=3)
    assert len(sample) == 50 and len(set(sample)) == 50 and set(sample) <= set(rows)
    assert sample == low_data(rows, n=50, seed=3) and sample != low_data(rows, n=50, seed=4)
    assert low_data(rows, n=20, seed=3) == sample[:20]  # smaller samples nest in larger ones
    assert len(low_data(rows, fraction=0.03)) == 6
    assert len(low_data(rows, fraction=1.0)) == 200
    assert len(low_data(rows, fraction=0.001)) == 1
    assert sorted(low_data(rows, n=4000), key=rows.index) == rows  # more than there is: all of it


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"n": 10, "fraction": 0.5}, {"n": 0}, {"n": -3}, {"fraction": 0.0}, {"fraction": 1.5}],
)
def test_low_data_argument_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        low_data(examples("rte", 10), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- load_splits


def write_rte(root: Path, n_train: int, n_dev: int) -> None:
    folder = root / "RTE"
    folder.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = "".join(f"{i}\t{name} premise {i}.\thypothesis {i}.\tentailment\n" for i in range(n))
        (folder / name).write_text(header + rows, encoding="utf-8")


def test_load_splits_reads_splits_samples_and_caps(tmp_path: Path) -> None:
    write_rte(tmp_path, n_train=300, n_dev=41)
    full = load_splits(["rte"], tmp_path)
    assert {split: len(rows) for split, rows in full["rte"].items()} == {
        "train": 300,
        "validation": 20,
        "test": 21,
    }
    small = load_splits(["rte"], tmp_path, n_train=100, max_eval=8)["rte"]
    assert [len(small[s]) for s in ("train", "validation", "test")] == [100, 8, 8]
    assert set(small["test"]) <= set(full["rte"]["test"])
    assert len(load_splits(["rte"], tmp_path, fraction=0.1)["rte"]["train"]) == 30
    assert load_splits(["rte"], tmp_path, seed=5) == load_splits(["rte"], tmp_path, seed=5)


def test_load_splits_argument_errors(tmp_path: Path) -> None:
    write_rte(tmp_path, n_train=10, n_dev=10)
    with pytest.raises(ValueError, match="twice"):
        load_splits(["rte", "rte"], tmp_path)
    with pytest.raises(ValueError, match="max_eval"):
        load_splits(["rte"], tmp_path, max_eval=0)
    with pytest.raises(DataError, match="PHA_DATA_DIR"):
        load_splits(["cola"], tmp_path)


def test_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHA_DATA_DIR", raising=False)
    assert data_dir_from_env() == (tmp_path / ".." / "shared" / "data").resolve()
    monkeypatch.setenv("PHA_DATA_DIR", "data")
    assert data_dir_from_env() == (tmp_path / "data").resolve()
    monkeypatch.setenv("PHA_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data_dir_from_env() == (tmp_path / "elsewhere").resolve()


# --------------------------------------------------------------------------------------------------- mixing


def train_sets() -> dict[str, list[Example]]:
    return {"cola": examples("cola", 300), "rte": examples("rte", 100), "cb": examples("cb", 20)}


def test_mixer_covers_every_example_once_per_epoch() -> None:
    sets = train_sets()
    mixer = ProportionalMixer(sets, batch_size=10, seed=0)
    assert mixer.epoch_size == 420
    epoch = [ex for _ in range(42) for ex in next(mixer)]
    assert Counter(epoch) == Counter(ex for rows in sets.values() for ex in rows)
    assert mixer.batches_drawn == 42


def test_mixer_batches_are_full_across_epoch_ends() -> None:
    sets = train_sets()
    mixer = ProportionalMixer(sets, batch_size=64, seed=0)
    drawn = [next(mixer) for _ in range(20)]  # 1280 rows: three epochs and a bit
    assert all(len(batch) == 64 for batch in drawn)
    flat = [ex for batch in drawn for ex in batch]
    for epoch in range(3):
        assert len(set(flat[epoch * 420 : (epoch + 1) * 420])) == 420
    assert flat[:420] != flat[420:840]  # each epoch reshuffles


def test_mixer_is_proportional_and_mixes_tasks() -> None:
    mixer = ProportionalMixer(train_sets(), batch_size=42, seed=3)
    batches = [next(mixer) for _ in range(100)]
    counts = Counter(ex.task for batch in batches for ex in batch)
    assert counts == {"cola": 3000, "rte": 1000, "cb": 200}  # exactly 10 epochs
    assert sum(len({ex.task for ex in batch}) > 1 for batch in batches) == 100


def test_mixer_repeats_up_sample_a_task() -> None:
    mixer = ProportionalMixer(train_sets(), batch_size=42, seed=3, repeats={"cb": 3})
    assert mixer.epoch_size == 460
    counts = Counter(ex.task for _ in range(230) for ex in next(mixer))  # 9660 rows: exactly 21 epochs
    assert counts == {"cola": 300 * 21, "rte": 100 * 21, "cb": 60 * 21}
    assert mixer.state_dict()["sizes"] == {"cola": 300, "rte": 100, "cb": 60}
    # A stream with other repeats is another stream: resuming across them is refused.
    with pytest.raises(ValueError, match="sizes"):
        ProportionalMixer(train_sets(), batch_size=42, seed=3).load_state_dict(mixer.state_dict())


@pytest.mark.parametrize("repeats", [{"sst2": 2}, {"cb": 0}, {"cb": 1.5}, {"cb": True}])
def test_mixer_refuses_bad_repeats(repeats: dict) -> None:
    with pytest.raises(ValueError, match="repeats"):
        ProportionalMixer(train_sets(), batch_size=8, repeats=repeats)


def test_mixer_is_deterministic_and_leaves_global_random_alone() -> None:
    before = random.getstate()
    first = [next(ProportionalMixer(train_sets(), 16, seed=1)) for _ in range(2)]
    assert first[0] == first[1]
    a, b = ProportionalMixer(train_sets(), 16, seed=1), ProportionalMixer(train_sets(), 16, seed=2)
    assert [next(a) for _ in range(5)] != [next(b) for _ in range(5)]
    assert random.getstate() == before


def test_mixer_resumes_from_its_state() -> None:
    reference = ProportionalMixer(train_sets(), batch_size=50, seed=4)
    stream = [next(reference) for _ in range(30)]
    interrupted = ProportionalMixer(train_sets(), batch_size=50, seed=4)
    for _ in range(17):
        next(interrupted)
    state = interrupted.state_dict()
    assert state["batches_drawn"] == 17
    resumed = ProportionalMixer(train_sets(), batch_size=50, seed=4)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(13)] == stream[17:]
    assert iter(resumed) is resumed


def test_mixer_refuses_a_foreign_state_and_bad_arguments() -> None:
    mixer = ProportionalMixer(train_sets(), batch_size=8, seed=0)
    state = mixer.state_dict()
    for key, value in (("batch_size", 9), ("seed", 1), ("sizes", {"cola": 300})):
        with pytest.raises(ValueError, match=key):
            ProportionalMixer(train_sets(), batch_size=8, seed=0).load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="batches_drawn"):
        mixer.load_state_dict({"batches_drawn": -1})
    with pytest.raises(ValueError):
        ProportionalMixer(train_sets(), batch_size=0)
    with pytest.raises(ValueError):
        ProportionalMixer({"cola": []}, batch_size=4)


# ------------------------------------------------------------------------------------------ the real files


@pytest.fixture(scope="module")
def real_raw(data_dir: Path) -> dict[str, dict[str, list[Example]]]:
    return {task: read_local(task, data_dir) for task in LOCAL_SOURCES}


REAL_SPLIT_SIZES = {
    "cola": (8551, 521, 522),
    "sst2": (66349, 1000, 872),
    "stsb": (5749, 750, 750),
    "mrpc": (3668, 204, 204),
    "qqp": (20497, 1000, 2000),
    "mnli": (6813, 1001, 2001),  # whole premise groups: a split ends with the group that fills it
    "qnli": (9475, 1000, 5463),
    "rte": (2490, 138, 139),
    "boolq": (500, 500, 2270),
    "wic": (5428, 319, 319),
    "cb": (250, 28, 28),
    "wsc": (554, 52, 52),
}


@pytest.mark.data
@pytest.mark.parametrize("task", sorted(REAL_SPLIT_SIZES))
def test_real_splits(real_raw: dict[str, dict[str, list[Example]]], task: str) -> None:
    raw = real_raw[task]
    splits = split_task(task, raw, seed=42)
    assert tuple(len(splits[s]) for s in ("train", "validation", "test")) == REAL_SPLIT_SIZES[task]
    # Disjoint by row: together the splits use each raw row at most once (the files hold a few duplicates, so
    # compare multisets, not sets).
    used = Counter(ex for rows in splits.values() for ex in rows)
    assert not used - Counter(ex for rows in raw.values() for ex in rows)
    assert sum(used.values()) == sum(len(rows) for rows in splits.values())
    assert split_task(task, raw, seed=42) == splits
    assert split_task(task, raw, seed=43) != splits
    for rows in splits.values():
        assert all(not ex.input.lower().startswith(task) for ex in rows)


@pytest.mark.data
def test_real_standin_splits_share_no_text(real_raw: dict[str, dict[str, list[Example]]]) -> None:
    # The carved stand-ins (no duplicates in these files) must not leak one row into two splits.
    for task in ("mnli", "qqp", "boolq"):
        splits = split_task(task, real_raw[task])
        inputs = {split: {ex.input for ex in rows} for split, rows in splits.items()}
        assert not inputs["train"] & inputs["test"]
        assert not inputs["train"] & inputs["validation"]
        assert not inputs["validation"] & inputs["test"]
    # MNLI by premise (data README): dev_matched carries up to three hypotheses per premise.
    premises = {split: {ex.fields[0] for ex in rows} for split, rows in split_task("mnli", real_raw["mnli"]).items()}
    assert not premises["train"] & premises["test"] and not premises["validation"] & premises["test"]
    assert not premises["train"] & premises["validation"]


@pytest.mark.data
def test_real_load_splits_low_data(data_dir: Path) -> None:
    loaded = load_splits(["rte", "boolq", "cb"], data_dir, n_train=100, max_eval=50)
    assert {task: len(splits["train"]) for task, splits in loaded.items()} == {
        "rte": 100,
        "boolq": 100,
        "cb": 100,
    }
    assert all(len(splits["test"]) <= 50 for splits in loaded.values())
    mixer = ProportionalMixer({task: splits["train"] for task, splits in loaded.items()}, batch_size=30)
    assert {ex.task for ex in next(mixer)} == {"rte", "boolq", "cb"}


@pytest.mark.data
def test_sample_seed_changes_the_training_sample_only(data_dir: Path) -> None:
    one = load_splits(["rte", "mnli"], data_dir, seed=42, n_train=50, max_eval=40, sample_seed=0)
    two = load_splits(["rte", "mnli"], data_dir, seed=42, n_train=50, max_eval=40, sample_seed=1)
    for task in ("rte", "mnli"):
        assert one[task]["test"] == two[task]["test"] and one[task]["validation"] == two[task]["validation"]
        assert one[task]["train"] != two[task]["train"]
