"""The task catalogue and the file readers: tiny fixture files in the real formats, then the real files."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from pha_core.tasks import (
    GLUE_TASKS,
    LOCAL_SOURCES,
    SUPERGLUE_TASKS,
    TASKS,
    DataError,
    Example,
    TaskSpec,
    UnknownTaskError,
    get_task,
    read_hf,
    read_local,
)

# ---------------------------------------------------------------------------------------------- catalogue

EXPECTED_LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "stsb": None,
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "boolq": ("false", "true"),
    "wic": ("false", "true"),
    "cb": ("entailment", "contradiction", "neutral"),
    "wsc": ("false", "true"),
    "scitail": ("entailment", "neutral"),
}


def test_catalogue_names_labels_and_metrics() -> None:
    assert GLUE_TASKS == ("cola", "sst2", "stsb", "mrpc", "qqp", "mnli", "qnli", "rte")
    assert SUPERGLUE_TASKS == ("boolq", "wic", "cb", "wsc")
    assert set(TASKS) == set(GLUE_TASKS) | set(SUPERGLUE_TASKS) | {"scitail"}
    for name, labels in EXPECTED_LABELS.items():
        assert TASKS[name].name == name
        assert TASKS[name].labels == labels
    assert TASKS["cola"].metrics == ("mcc",)
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    assert TASKS["mrpc"].metrics == TASKS["qqp"].metrics == ("f1", "accuracy")
    others = set(TASKS) - {"cola", "stsb", "mrpc", "qqp"}
    assert all(TASKS[name].metrics == ("accuracy",) for name in others)


def test_catalogue_is_read_only() -> None:
    with pytest.raises(TypeError):
        TASKS["new"] = TASKS["cola"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        TASKS["cola"].template = "cola: {sentence}"  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_templates_never_name_the_task(name: str) -> None:
    spec = TASKS[name]
    assert name not in spec.template.lower()
    assert spec.fields and all(field in spec.template for field in spec.fields)


def test_templates_use_hf_column_names() -> None:
    assert TASKS["sst2"].template == "sentence: {sentence}"
    assert TASKS["wic"].template == "word: {word} sentence1: {sentence1} sentence2: {sentence2}"
    assert TASKS["wsc"].fields == ("text", "span1_text", "span2_text")
    assert TASKS["qqp"].fields == ("question1", "question2")
    assert TASKS["boolq"].fields == ("question", "passage")


def test_get_task_unknown_lists_known_names() -> None:
    assert get_task("rte") is TASKS["rte"]
    with pytest.raises(UnknownTaskError) as info:
        get_task("wnli")
    assert isinstance(info.value, ValueError)
    assert "wnli" in str(info.value) and "cola" in str(info.value) and "scitail" in str(info.value)


def test_format_strips_values_and_reports_missing_fields() -> None:
    rte = get_task("rte")
    assert rte.format({"sentence1": " A man. ", "sentence2": "A person.\n", "idx": 3}) == (
        "sentence1: A man. sentence2: A person."
    )
    assert get_task("sst2").format({"sentence": "{not a placeholder} "}) == "sentence: {not a placeholder}"
    with pytest.raises(KeyError, match="sentence2"):
        rte.format({"sentence1": "x"})


def test_target_ids_words_and_bools() -> None:
    assert get_task("mnli").target(2) == "contradiction"
    assert get_task("mnli").target("neutral") == "neutral"
    assert get_task("wsc").target(True) == "true" and get_task("wsc").target(False) == "false"
    for bad in ("1", -1, 3, "Neutral", None):
        with pytest.raises(ValueError, match="mnli"):
            get_task("mnli").target(bad)


@pytest.mark.parametrize(
    ("score", "text"),
    [
        (5.0, "5.0"),
        ("3.800", "3.8"),
        (3.75, "3.8"),
        (3.7, "3.8"),  # a tie (18.5 / 5): rounded upwards
        (2.5, "2.6"),
        (4.75, "4.8"),
        (1.09, "1.0"),
        (0.0, "0.0"),
        (0.1, "0.2"),
        ("0.099", "0.0"),
    ],
)
def test_stsb_target_rounds_to_point_two(score: object, text: str) -> None:
    assert get_task("stsb").target(score) == text


@pytest.mark.parametrize("bad", ["nan", "inf", "high", True, None])
def test_stsb_target_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(ValueError):
        get_task("stsb").target(bad)


def test_example_is_frozen_and_hashable() -> None:
    example = Example(input="sentence: x", target="positive", task="sst2")
    assert {example: 1}[Example("sentence: x", "positive", "sst2")] == 1
    with pytest.raises(AttributeError):
        example.target = "negative"  # type: ignore[misc]
    assert isinstance(get_task("cola"), TaskSpec)


# ------------------------------------------------------------------------- fixture files in the real formats


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def jsonl(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def test_cola_no_header_and_last_line_without_newline(tmp_path: Path) -> None:
    write(tmp_path / "CoLA/train.tsv", 'gj04\t1\t\tOur friends won\'t buy "this".\ngj04\t0\t*\tThe more.\n')
    write(tmp_path / "CoLA/dev.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.")
    raw = read_local("cola", tmp_path)
    assert raw["train"] == [
        Example('sentence: Our friends won\'t buy "this".', "acceptable", "cola"),
        Example("sentence: The more.", "unacceptable", "cola"),
    ]
    assert [ex.target for ex in raw["validation"]] == ["acceptable", "unacceptable"]


def test_sst2_header_and_trailing_space(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\nhide new secretions \t0\na charming journey \t1\n")
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\nbleak \t0\n")
    raw = read_local("sst2", tmp_path)
    assert raw["train"][0] == Example("sentence: hide new secretions", "negative", "sst2")
    assert raw["train"][1].target == "positive"
    assert raw["validation"] == [Example("sentence: bleak", "negative", "sst2")]


def test_mrpc_bom_header_and_bare_quotes(tmp_path: Path) -> None:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = '1\t702876\t702977\tHe called " the witness " .\tAs " the witness " .\n0\t1\t2\tA .\tB .\n'
    write(tmp_path / "MRPC/train.tsv", "\ufeff" + header + rows)
    write(tmp_path / "MRPC/dev.tsv", "\ufeff" + header + rows)
    raw = read_local("mrpc", tmp_path)
    assert raw["train"][0] == Example(
        'sentence1: He called " the witness " . sentence2: As " the witness " .', "equivalent", "mrpc"
    )
    assert raw["validation"][1].target == "not_equivalent"


def test_stsb_score_column(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t{}\n"
    write(tmp_path / "STS-B/train.tsv", header + row.format("3.800") + row.format("4.750"))
    write(tmp_path / "STS-B/dev.tsv", header + row.format("0.000"))
    raw = read_local("stsb", tmp_path)
    assert [ex.target for ex in raw["train"]] == ["3.8", "4.8"]
    assert raw["validation"][0].input == "sentence1: A plane. sentence2: An air plane."


def test_qqp_recovers_the_label_joined_to_question2(tmp_path: Path) -> None:
    write(
        tmp_path / "QQP/train_subset.tsv",
        "133273\t213221\t213222\tHow is the life?\tWhich level of prepration is enough for the exam jlpt5? 0\n"
        "360472\t364011\t490273\tWhat causes it?\tWhat can cause it?\t1\n",
    )
    raw = read_local("qqp", tmp_path)
    assert list(raw) == ["train"]
    assert raw["train"][0] == Example(
        "question1: How is the life? question2: Which level of prepration is enough for the exam jlpt5?",
        "not_duplicate",
        "qqp",
    )
    assert raw["train"][1].target == "duplicate"


def test_qqp_short_row_without_label_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "QQP/train_subset.tsv", "1\t2\t3\tQuestion one?\tQuestion two?\n")
    with pytest.raises(DataError, match="line 1"):
        read_local("qqp", tmp_path)


def test_qnli_subset_ids_and_dev_words(tmp_path: Path) -> None:
    write(
        tmp_path / "QNLI/train_subset.tsv",
        'question\tsentence\tlabel\nWho?\t" OMB defines "race" as such.\t0\nWhen?\tUnrelated.\t1\n',
    )
    write(tmp_path / "QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWhat?\tThat.\tnot_entailment\n")
    raw = read_local("qnli", tmp_path)
    assert raw["train"][0] == Example('question: Who? sentence: " OMB defines "race" as such.', "entailment", "qnli")
    assert raw["train"][1].target == "not_entailment"
    assert raw["validation"] == [Example("question: What? sentence: That.", "not_entailment", "qnli")]


def test_rte_label_words(tmp_path: Path) -> None:
    text = "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n"
    write(tmp_path / "RTE/train.tsv", text)
    write(tmp_path / "RTE/dev.tsv", text)
    assert read_local("rte", tmp_path)["train"] == [
        Example("sentence1: No weapons found. sentence2: Weapons found.", "not_entailment", "rte")
    ]


def test_mnli_jsonl_label_words(tmp_path: Path) -> None:
    write(
        tmp_path / "MNLI/dev_matched.jsonl",
        jsonl([{"premise": "Nice rights", "hypothesis": "Everyone likes them ", "label": "neutral"}]) + "\n",
    )
    assert read_local("mnli", tmp_path) == {
        "validation_matched": [Example("premise: Nice rights hypothesis: Everyone likes them", "neutral", "mnli")]
    }


def test_superglue_jsonl_files(tmp_path: Path) -> None:
    write(
        tmp_path / "BoolQ/val.jsonl",
        jsonl([{"question": "is it", "passage": "It is.", "idx": 0, "label": "true"}]),
    )
    cb = jsonl([{"premise": "P.", "hypothesis": "h", "label": "neutral", "idx": 0}])
    write(tmp_path / "CB/train.jsonl", cb)
    write(tmp_path / "CB/val.jsonl", cb)
    wsc = jsonl(
        [
            {
                "text": "Mark told Pete lies. He lied.",
                "target": {"span2_index": 5, "span1_index": 0, "span1_text": "Mark", "span2_text": "He"},
                "idx": 0,
                "label": True,
            }
        ]
    )
    write(tmp_path / "WSC/train.jsonl", wsc)
    write(tmp_path / "WSC/val.jsonl", wsc)
    assert read_local("boolq", tmp_path) == {
        "validation": [Example("question: is it passage: It is.", "true", "boolq")]
    }
    assert read_local("cb", tmp_path)["validation"] == [Example("premise: P. hypothesis: h", "neutral", "cb")]
    assert read_local("wsc", tmp_path)["train"] == [
        Example("text: Mark told Pete lies. He lied. span1_text: Mark span2_text: He", "true", "wsc")
    ]


def test_wic_csv_quoting(tmp_path: Path) -> None:
    header = "index\tword\tsentence1\tsentence2\tstart1\tstart2\tend1\tend2\tlabel\n"
    rows = (
        '76\tquality\t"""The quality of mercy"" -- Shakespeare."\tA quality.\t5\t2\t12\t9\t1\n'
        "1\tapproach\tApproach a task.\tTo approach the city.\t0\t3\t8\t11\t0\n"
    )
    write(tmp_path / "WiC/train.tsv", header + rows)
    write(tmp_path / "WiC/val.tsv", header + rows)
    raw = read_local("wic", tmp_path)
    assert raw["train"][0] == Example(
        'word: quality sentence1: "The quality of mercy" -- Shakespeare. sentence2: A quality.', "true", "wic"
    )
    assert raw["validation"][1].target == "false"


def test_rows_with_an_empty_input_are_skipped(tmp_path: Path) -> None:
    text = "index\tsentence1\tsentence2\tlabel\n0\tA.\t \tentailment\n1\tB.\tC.\tentailment\n"
    write(tmp_path / "RTE/train.tsv", text)
    write(tmp_path / "RTE/dev.tsv", text)
    assert [ex.input for ex in read_local("rte", tmp_path)["train"]] == ["sentence1: B. sentence2: C."]


def test_missing_file_names_the_path_and_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_local("cola", tmp_path)
    assert str(tmp_path / "CoLA" / "train.tsv") in str(info.value)
    assert "PHA_DATA_DIR" in str(info.value)


def test_bad_label_names_file_line_and_allowed_labels(tmp_path: Path) -> None:
    path = write(
        tmp_path / "RTE/train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tC.\tD.\tmaybe\n",
    )
    write(tmp_path / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(DataError) as info:
        read_local("rte", tmp_path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "'maybe'" in message
    assert "not_entailment" in message


def test_id_out_of_range_is_a_bad_label(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\ngood\t2\n")
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="line 2"):
        read_local("sst2", tmp_path)


def test_malformed_rows_are_errors(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\ngood\t1\textra\n")
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="columns"):
        read_local("sst2", tmp_path)
    write(tmp_path / "MNLI/dev_matched.jsonl", '{"premise": "cut mid-rec')
    with pytest.raises(DataError, match="not valid JSON"):
        read_local("mnli", tmp_path)
    write(tmp_path / "RTE/train.tsv", "idx\ts1\ts2\tlabel\n")
    with pytest.raises(DataError, match="lacks column"):
        read_local("rte", tmp_path)


def test_tasks_without_local_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="read_hf"):
        read_local("scitail", tmp_path)
    with pytest.raises(UnknownTaskError):
        read_local("wnli", tmp_path)


def test_read_hf_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"pha-serve\[hf\]"):
        read_hf("rte")


def _fake_datasets(splits: dict[str, list[dict[str, object]]] | Exception) -> types.ModuleType:
    module = types.ModuleType("datasets")

    def load_dataset(name: str, config: str) -> dict[str, list[dict[str, object]]]:
        if isinstance(splits, Exception):
            raise splits
        return splits

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_read_hf_converts_rows_and_drops_unlabelled_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {
        "train": [{"sentence1": "A.", "sentence2": "B.", "label": 1, "idx": 0}],
        "validation": [{"sentence1": "C.", "sentence2": "D.", "label": 0, "idx": 0}],
        "test": [{"sentence1": "E.", "sentence2": "F.", "label": -1, "idx": 0}],
    }
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows))
    assert read_hf("rte") == {
        "train": [Example("sentence1: A. sentence2: B.", "not_entailment", "rte")],
        "validation": [Example("sentence1: C. sentence2: D.", "entailment", "rte")],
    }
    scitail = {"test": [{"premise": "P.", "hypothesis": "H.", "label": "entails"}]}
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(scitail))
    assert read_hf("scitail")["test"][0].target == "entailment"


def test_read_hf_offline_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(ConnectionError("offline")))
    with pytest.raises(DataError, match="PHA_DATA_DIR") as info:
        read_hf("cola")
    assert "nyu-mll/glue/cola" in str(info.value) and "offline" in str(info.value)


# ------------------------------------------------------------------------------------------ the real files

# Row counts and label distributions from the data README and MANIFEST (QQP: 14,749 + the recovered row).
REAL_LABELS = {
    "cola": {
        "train": {"acceptable": 6023, "unacceptable": 2528},
        "validation": {"acceptable": 721, "unacceptable": 322},
    },
    "sst2": {
        "train": {"positive": 37569, "negative": 29780},
        "validation": {"positive": 444, "negative": 428},
    },
    "mrpc": {
        "train": {"equivalent": 2474, "not_equivalent": 1194},
        "validation": {"equivalent": 279, "not_equivalent": 129},
    },
    "qqp": {"train": {"not_duplicate": 14750, "duplicate": 8747}},
    "mnli": {"validation_matched": {"entailment": 3479, "contradiction": 3213, "neutral": 3123}},
    "qnli": {
        "train": {"not_entailment": 5248, "entailment": 5227},
        "validation": {"not_entailment": 2761, "entailment": 2702},
    },
    "rte": {
        "train": {"entailment": 1249, "not_entailment": 1241},
        "validation": {"entailment": 146, "not_entailment": 131},
    },
    "cb": {
        "train": {"contradiction": 119, "entailment": 115, "neutral": 16},
        "validation": {"contradiction": 28, "entailment": 23, "neutral": 5},
    },
    "boolq": {"validation": {"true": 2033, "false": 1237}},
    "wic": {"train": {"false": 2714, "true": 2714}, "validation": {"false": 319, "true": 319}},
    "wsc": {"train": {"false": 295, "true": 259}, "validation": {"false": 66, "true": 38}},
}


@pytest.fixture(scope="module")
def real_raw(data_dir: Path) -> dict[str, dict[str, list[Example]]]:
    return {task: read_local(task, data_dir) for task in LOCAL_SOURCES}


@pytest.mark.data
@pytest.mark.parametrize("task", sorted(REAL_LABELS))
def test_real_label_distributions(real_raw: dict[str, dict[str, list[Example]]], task: str) -> None:
    counts = {split: dict(Counter(ex.target for ex in rows)) for split, rows in real_raw[task].items()}
    assert counts == REAL_LABELS[task]


@pytest.mark.data
def test_real_row_counts_and_stsb_targets(real_raw: dict[str, dict[str, list[Example]]]) -> None:
    sizes = {task: {split: len(rows) for split, rows in raw.items()} for task, raw in real_raw.items()}
    assert sizes["cola"] == {"train": 8551, "validation": 1043}
    assert sizes["sst2"] == {"train": 67349, "validation": 872}
    assert sizes["stsb"] == {"train": 5749, "validation": 1500}
    assert sizes["qqp"] == {"train": 23497}
    assert sizes["mnli"] == {"validation_matched": 9815}
    allowed = {f"{i / 5:.1f}" for i in range(26)}
    assert {ex.target for rows in real_raw["stsb"].values() for ex in rows} <= allowed
    assert real_raw["stsb"]["train"][0] == Example(
        "sentence1: A plane is taking off. sentence2: An air plane is taking off.", "5.0", "stsb"
    )


@pytest.mark.data
def test_real_qqp_malformed_row_is_recovered(real_raw: dict[str, dict[str, list[Example]]]) -> None:
    assert real_raw["qqp"]["train"][0] == Example(
        "question1: How is the life of a math student? Could you describe your own experiences? "
        "question2: Which level of prepration is enough for the exam jlpt5?",
        "not_duplicate",
        "qqp",
    )


@pytest.mark.data
def test_real_inputs_never_start_with_the_task_name(real_raw: dict[str, dict[str, list[Example]]]) -> None:
    for task, raw in real_raw.items():
        field = get_task(task).fields[0]
        for rows in raw.values():
            for ex in rows:
                assert ex.task == task
                assert ex.input.startswith(f"{field}: ")
                assert not ex.input.lower().startswith((task + " ", task + ":"))
