"""The task table (templates, label words, metrics) and the readers of the original data files.

Inputs are formatted by field names only (``premise: ... hypothesis: ...``), never with the task name: serving
routes an unnamed request to a task by retrieval, and a task-name prefix would make that trivial and useless
(pha-method.md section 3). Placeholders are the Hugging Face ``datasets`` column names, so one template serves
the local files, the HF copies and service requests alike. Targets are the HF ClassLabel names in label-id
order; STS-B is a number string rounded to 0.2.

The local readers follow the quirks listed in the data README (``$PHA_DATA_DIR/README.md``): GLUE TSVs are
split on tabs without any quote handling (their text contains bare ``"``), WiC's TSV is CSV-quoted, MRPC has a
BOM, CoLA and QQP have no header, and one QQP row has its label glued to question2 by a space.
"""

from __future__ import annotations

import csv
import json
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType

DATA_ENV_VAR = "PHA_DATA_DIR"


class DataError(ValueError):
    """A data file is missing or does not hold what its task expects."""


class UnknownTaskError(ValueError):
    """A task name that is not in the task table (TASKS)."""


@dataclass(frozen=True)
class Example:
    """One formatted example: the model input text, the target text, and the task it belongs to.

    ``fields`` keeps the row's field values in template order (TaskSpec.fields), for what reads the fields
    apart (the frozen probe of bench/baselines.py embeds each one separately); empty when only the text is known.
    It is derived from ``input``, so it takes no part in equality.
    """

    input: str
    target: str
    task: str
    fields: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class TaskSpec:
    """How a task's rows become text.

    ``labels`` are the label words in label-id order, or None for regression (STS-B). ``hf`` is the Hugging
    Face dataset id and config, or None when there is no HF copy.
    """

    name: str
    template: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    hf: tuple[str, str] | None

    @property
    def fields(self) -> tuple[str, ...]:
        """The row fields the template reads, in template order (what a service request must provide)."""
        return template_fields(self.template)

    def values(self, row: Mapping[str, object]) -> tuple[str, ...]:
        """The row's field values in template order, stripped as format() strips them."""
        return tuple(str(row[name]).strip() for name in self.fields)

    def format(self, row: Mapping[str, object]) -> str:
        """Fill the template from ``row``; surrounding whitespace of each value is dropped.

        Stripping matters because some files pad fields (SST-2 sentences end with a space): the same text must
        give the same input whether it comes from a file, the HF copy or a request.
        """
        missing = [name for name in self.fields if name not in row]
        if missing:
            needed = list(self.fields)
            raise KeyError(f"{self.name}: row lacks field(s) {missing}; the template needs {needed}")
        return fill_template(self.template, row)

    def has_empty_field(self, row: Mapping[str, object]) -> bool:
        """True when a field the template reads is blank: such a row has no usable input."""
        return any(not str(row.get(name, "")).strip() for name in self.fields)

    def target(self, label: object) -> str:
        """The target text for a label: a label id (int or bool), a label word, or a score for regression.

        A string is taken as a label word only, never as a digit id: files that store ids are converted by
        their reader, so a word file with a stray ``1`` is reported instead of silently mapped.
        """
        if self.labels is None:
            return _stsb_target(label)
        if isinstance(label, int):  # bool is an int: False -> 0, True -> 1 (WSC)
            if 0 <= label < len(self.labels):
                return self.labels[label]
        elif isinstance(label, str) and label in self.labels:
            return label
        raise ValueError(f"label {label!r} is not one of {self.name}'s labels {list(self.labels)}")


def template_fields(template: str) -> tuple[str, ...]:
    """The placeholders of a template, in order: ``"premise: {premise} hypothesis: {hypothesis}"`` ->
    ``("premise", "hypothesis")``."""
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def template_pattern(template: str) -> re.Pattern[str]:
    """What texts written with `template` look like: its literal text, any value in each placeholder
    (``premise: {premise} hypothesis: {hypothesis}`` -> ``premise: (.*) hypothesis: (.*)``, across lines).
    A value may itself hold a marker (an STS-B sentence quoting "question: ..."), so this, not the markers
    found in a text, says whether a text fits a template."""
    parts = [
        re.escape(literal) + ("(.*)" if name else "") for literal, name, _, _ in string.Formatter().parse(template)
    ]
    return re.compile("".join(parts), re.DOTALL)


def fill_template(template: str, row: Mapping[str, object]) -> str:
    """The template filled from ``row`` (every placeholder must be there), each value stripped."""
    return template.format_map({name: str(row[name]).strip() for name in template_fields(template)})


def _stsb_target(label: object) -> str:
    """Round a similarity score to the nearest 0.2, ties upwards, and print one decimal ("3.8").

    Decimal arithmetic keeps ties exact (a float 2.5 * 5 may land on either side of 12.5), so the same score
    always gives the same target string.
    """
    if isinstance(label, bool):
        raise ValueError(f"score {label!r} is not a number")
    try:
        value = Decimal(str(label).strip())
    except InvalidOperation as exc:
        raise ValueError(f"score {label!r} is not a number") from exc
    if not value.is_finite():
        raise ValueError(f"score {label!r} is not finite")
    rounded = (value * 5).quantize(Decimal(1), rounding=ROUND_HALF_UP) / 5
    return f"{rounded:.1f}"


_PAIR = "sentence1: {sentence1} sentence2: {sentence2}"
_NLI = "premise: {premise} hypothesis: {hypothesis}"
_BOOL = ("false", "true")


def _spec(name: str, template: str, labels: tuple[str, ...] | None, hf: tuple[str, str] | None) -> TaskSpec:
    metrics = _METRICS.get(name, ("accuracy",))
    return TaskSpec(name=name, template=template, labels=labels, metrics=metrics, hf=hf)


_METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"cola": ("mcc",), "stsb": ("pearson", "spearman"), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy")}
)

GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "stsb", "mrpc", "qqp", "mnli", "qnli", "rte")
SUPERGLUE_TASKS: tuple[str, ...] = ("boolq", "wic", "cb", "wsc")

TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec("cola", "sentence: {sentence}", ("unacceptable", "acceptable"), ("nyu-mll/glue", "cola")),
            _spec("sst2", "sentence: {sentence}", ("negative", "positive"), ("nyu-mll/glue", "sst2")),
            _spec("stsb", _PAIR, None, ("nyu-mll/glue", "stsb")),
            _spec("mrpc", _PAIR, ("not_equivalent", "equivalent"), ("nyu-mll/glue", "mrpc")),
            _spec(
                "qqp",
                "question1: {question1} question2: {question2}",
                ("not_duplicate", "duplicate"),
                ("nyu-mll/glue", "qqp"),
            ),
            _spec("mnli", _NLI, ("entailment", "neutral", "contradiction"), ("nyu-mll/glue", "mnli")),
            _spec(
                "qnli",
                "question: {question} sentence: {sentence}",
                ("entailment", "not_entailment"),
                ("nyu-mll/glue", "qnli"),
            ),
            _spec("rte", _PAIR, ("entailment", "not_entailment"), ("nyu-mll/glue", "rte")),
            _spec("boolq", "question: {question} passage: {passage}", _BOOL, ("aps/super_glue", "boolq")),
            _spec("wic", "word: {word} " + _PAIR, _BOOL, ("aps/super_glue", "wic")),
            _spec("cb", _NLI, ("entailment", "contradiction", "neutral"), ("aps/super_glue", "cb")),
            _spec(
                "wsc",
                "text: {text} span1_text: {span1_text} span2_text: {span2_text}",
                _BOOL,
                ("aps/super_glue", "wsc.fixed"),
            ),
            _spec("scitail", _NLI, ("entailment", "neutral"), ("allenai/scitail", "tsv_format")),
        )
    }
)


# The literal text before each field of the task table's templates ("premise:", "sentence2:", ...): where
# source.split_fields cuts a formatted input into its fields.
FIELD_MARKERS: tuple[str, ...] = tuple(
    sorted(
        {
            literal.strip()
            for spec in TASKS.values()
            for literal, _, _, _ in string.Formatter().parse(spec.template)
            if literal.strip()
        }
    )
)


def templates_of(names: Iterable[str]) -> list[str | None]:
    """The template of each task name in the task table (None for a name it does not know)."""
    return [TASKS[n].template if n in TASKS else None for n in names]


def get_task(name: str) -> TaskSpec:
    """The spec of a task, or UnknownTaskError listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


# ----------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------

# A reader yields (line number, row with HF column names, label in the form TaskSpec.target accepts).
Row = tuple[int, dict[str, object], object]
RowReader = Callable[[Path], Iterator[Row]]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}. Set {DATA_ENV_VAR} to the folder holding the GLUE/SuperGLUE files "
            f"(e.g. {DATA_ENV_VAR}=../shared/data)."
        )
    return path


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Tab-split lines, no quote handling (GLUE text holds bare quotes); utf-8-sig drops MRPC's BOM.

    Splitting on "\\n" only (not str.splitlines) keeps rare Unicode separators inside a field.
    """
    text = _require(path).read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line:
            yield number, line.split("\t")


def _label_id(raw: str) -> object:
    """A 0/1/... id column as int; anything else passes through, for target() to report with file and line."""
    return int(raw) if raw.strip().isdigit() else raw


def _with_header(path: Path, needed: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a headed TSV as dicts; the header must name every column in ``needed``."""
    lines = _tsv_lines(path)
    first = next(lines, None)
    header = first[1] if first else []
    absent = [name for name in needed if name not in header]
    if absent:
        raise DataError(f"{path}: header {header} lacks column(s) {absent}")
    for number, fields in lines:
        if len(fields) != len(header):
            raise DataError(f"{path}, line {number}: {len(fields)} columns, header has {len(header)}")
        yield number, dict(zip(header, fields, strict=True))


def _rows_cola(path: Path) -> Iterator[Row]:
    # No header: source, label, original mark, sentence.
    for number, fields in _tsv_lines(path):
        if len(fields) != 4:
            raise DataError(f"{path}, line {number}: expected 4 columns, found {len(fields)}")
        yield number, {"sentence": fields[3]}, _label_id(fields[1])


def _rows_sst2(path: Path) -> Iterator[Row]:
    for number, row in _with_header(path, ("sentence", "label")):
        yield number, {"sentence": row["sentence"]}, _label_id(row["label"])


def _rows_mrpc(path: Path) -> Iterator[Row]:
    for number, row in _with_header(path, ("Quality", "#1 String", "#2 String")):
        pair = {"sentence1": row["#1 String"], "sentence2": row["#2 String"]}
        yield number, pair, _label_id(row["Quality"])


def _rows_stsb(path: Path) -> Iterator[Row]:
    for number, row in _with_header(path, ("sentence1", "sentence2", "score")):
        yield number, {"sentence1": row["sentence1"], "sentence2": row["sentence2"]}, row["score"]


def _rows_qqp(path: Path) -> Iterator[Row]:
    """No header: id, qid1, qid2, question1, question2, is_duplicate.

    A 5-column row whose question2 ends in " 0" or " 1" lost the tab before its label (id 133273 in the
    subset here): split the label back off instead of dropping a labelled row.
    """
    for number, fields in _tsv_lines(path):
        if len(fields) == 5:
            head, _, tail = fields[4].rpartition(" ")
            if tail not in ("0", "1") or not head:
                raise DataError(f"{path}, line {number}: 5 columns and no label to recover: {fields}")
            fields = [*fields[:4], head, tail]
        if len(fields) != 6:
            raise DataError(f"{path}, line {number}: expected 6 columns, found {len(fields)}")
        yield number, {"question1": fields[3], "question2": fields[4]}, _label_id(fields[5])


def _rows_qnli(path: Path) -> Iterator[Row]:
    """Both QNLI files: the train subset stores ids 0/1 (HF export), the GLUE dev file stores label words."""
    for number, row in _with_header(path, ("question", "sentence", "label")):
        label = row["label"]
        yield number, {"question": row["question"], "sentence": row["sentence"]}, _label_id(label)


def _rows_rte(path: Path) -> Iterator[Row]:
    for number, row in _with_header(path, ("sentence1", "sentence2", "label")):
        yield number, {"sentence1": row["sentence1"], "sentence2": row["sentence2"]}, row["label"]


def _rows_wic(path: Path) -> Iterator[Row]:
    # The HF export quotes fields CSV-style ("""The quality of mercy..."""), unlike the GLUE TSVs.
    with _require(path).open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, [])
        absent = [name for name in ("word", "sentence1", "sentence2", "label") if name not in header]
        if absent:
            raise DataError(f"{path}: header {header} lacks column(s) {absent}")
        for fields in reader:
            if len(fields) != len(header):
                where = f"{path}, line {reader.line_num}"
                raise DataError(f"{where}: {len(fields)} columns, header has {len(header)}")
            row = dict(zip(header, fields, strict=True))
            text = {name: row[name] for name in ("word", "sentence1", "sentence2")}
            yield reader.line_num, text, _label_id(row["label"])


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    text = _require(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "label" not in record:
            raise DataError(f"{path}, line {number}: expected a JSON object with a 'label'")
        yield number, record


def _jsonl_reader(fields: tuple[str, ...]) -> RowReader:
    """A reader for flat SuperGLUE-style JSONL (MNLI, CB, BoolQ): labels are words, as stored."""

    def read(path: Path) -> Iterator[Row]:
        for number, record in _jsonl(path):
            yield number, {name: record.get(name, "") for name in fields}, record["label"]

    return read


def _rows_wsc(path: Path) -> Iterator[Row]:
    # Spans sit under "target"; flatten them to the HF column names. Labels are JSON booleans.
    for number, record in _jsonl(path):
        target = record.get("target")
        spans = target if isinstance(target, dict) else {}
        row = {
            "text": record.get("text", ""),
            "span1_text": spans.get("span1_text", ""),
            "span2_text": spans.get("span2_text", ""),
        }
        yield number, row, record["label"]


@dataclass(frozen=True)
class _LocalSource:
    folder: str
    files: Mapping[str, str]  # raw split name -> file name
    reader: RowReader


_TRAIN_DEV_TSV = MappingProxyType({"train": "train.tsv", "validation": "dev.tsv"})
_TRAIN_VAL_JSONL = MappingProxyType({"train": "train.jsonl", "validation": "val.jsonl"})

LOCAL_SOURCES: Mapping[str, _LocalSource] = MappingProxyType(
    {
        "cola": _LocalSource("CoLA", _TRAIN_DEV_TSV, _rows_cola),
        "sst2": _LocalSource("SST-2", _TRAIN_DEV_TSV, _rows_sst2),
        "mrpc": _LocalSource("MRPC", _TRAIN_DEV_TSV, _rows_mrpc),
        "stsb": _LocalSource("STS-B", _TRAIN_DEV_TSV, _rows_stsb),
        "qqp": _LocalSource("QQP", MappingProxyType({"train": "train_subset.tsv"}), _rows_qqp),
        "mnli": _LocalSource(
            "MNLI",
            MappingProxyType({"validation_matched": "dev_matched.jsonl"}),
            _jsonl_reader(("premise", "hypothesis")),
        ),
        "qnli": _LocalSource(
            "QNLI", MappingProxyType({"train": "train_subset.tsv", "validation": "dev.tsv"}), _rows_qnli
        ),
        "rte": _LocalSource("RTE", _TRAIN_DEV_TSV, _rows_rte),
        "boolq": _LocalSource(
            "BoolQ", MappingProxyType({"validation": "val.jsonl"}), _jsonl_reader(("question", "passage"))
        ),
        "wic": _LocalSource("WiC", MappingProxyType({"train": "train.tsv", "validation": "val.tsv"}), _rows_wic),
        "cb": _LocalSource("CB", _TRAIN_VAL_JSONL, _jsonl_reader(("premise", "hypothesis"))),
        "wsc": _LocalSource("WSC", _TRAIN_VAL_JSONL, _rows_wsc),
    }
)


def read_file(task: str, path: Path, reader: RowReader | None = None) -> list[Example]:
    """Read one data file of ``task`` into Examples; rows with a blank input field are skipped.

    A label outside the task's label set is a DataError naming the file, the line and the allowed labels.
    """
    spec = get_task(task)
    read = reader if reader is not None else _source(task).reader
    examples = []
    for number, row, label in read(Path(path)):
        if spec.has_empty_field(row):
            continue
        try:
            target = spec.target(label)
        except ValueError as exc:
            raise DataError(f"{path}, line {number}: {exc}") from exc
        examples.append(Example(input=spec.format(row), target=target, task=task, fields=spec.values(row)))
    return examples


def _source(task: str) -> _LocalSource:
    get_task(task)
    try:
        return LOCAL_SOURCES[task]
    except KeyError:
        raise DataError(
            f"no local files for task {task!r} (local tasks: {', '.join(LOCAL_SOURCES)}); use read_hf"
        ) from None


def read_local(task: str, data_dir: Path) -> dict[str, list[Example]]:
    """The raw splits of ``task`` that exist on disk, keyed by HF split name.

    Keys are "train" and "validation", except MNLI ("validation_matched", its only file) and the tasks with a
    single file (QQP: "train", BoolQ: "validation"). data.split_task turns these into train/validation/test.
    """
    source = _source(task)
    folder = Path(data_dir) / source.folder
    return {split: read_file(task, folder / name, source.reader) for split, name in source.files.items()}


# ----------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional)
# ----------------------------------------------------------------------------------------------------

# SciTail's tsv_format stores "entails"; the task table uses the word of its snli_format ("entailment").
_HF_LABEL_ALIASES: Mapping[str, Mapping[object, object]] = MappingProxyType(
    {"scitail": MappingProxyType({"entails": "entailment"})}
)


def read_hf(task: str) -> dict[str, list[Example]]:
    """The labelled splits of ``task`` from the Hugging Face hub (needs ``pip install pha-serve[hf]``).

    Unlabelled rows (label -1, the GLUE/SuperGLUE test sets) are dropped, and so are splits left empty.
    """
    spec = get_task(task)
    if spec.hf is None:
        raise DataError(f"task {task!r} has no Hugging Face copy")
    try:
        import datasets  # lazy: an optional dependency, and slow to import
    except ImportError as exc:
        raise DataError(
            f"reading {task!r} from Hugging Face needs the `datasets` package (pip install 'pha-serve[hf]'), "
            f"or set {DATA_ENV_VAR} to the local GLUE/SuperGLUE files"
        ) from exc
    name, config = spec.hf
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # offline, unknown id, hub errors: all mean "no data from the hub"
        raise DataError(
            f"could not load {name}/{config} from Hugging Face ({type(exc).__name__}: {exc}); "
            f"if offline, set {DATA_ENV_VAR} to the local GLUE/SuperGLUE files"
        ) from exc
    aliases = _HF_LABEL_ALIASES.get(task, {})
    splits = {}
    for split, rows in loaded.items():
        examples = _hf_examples(spec, f"{name}/{config}:{split}", rows, aliases)
        if examples:
            splits[str(split)] = examples
    return splits


def _hf_examples(spec: TaskSpec, where: str, rows: object, aliases: Mapping[object, object]) -> list[Example]:
    examples = []
    for number, row in enumerate(rows, start=1):  # type: ignore[call-overload]
        label = row["label"]
        label = aliases.get(label, label)
        if label == -1 or spec.has_empty_field(row):
            continue
        try:
            target = spec.target(label)
        except ValueError as exc:
            raise DataError(f"{where}, row {number}: {exc}") from exc
        examples.append(Example(input=spec.format(row), target=target, task=spec.name, fields=spec.values(row)))
    return examples
