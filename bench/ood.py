"""The out-of-distribution set: inputs that belong to none of the served tasks, for measuring abstention.

What a model trained on the GLUE tasks must answer "no task fits" to, in the shapes a client may send them:
- written for this project (bench/ood/written.json): chit-chat, everyday questions, code and shell lines,
  sentences in 24 other languages;
- gibberish: random letter strings, drawn from a fixed seed;
- texts of ../shared/data sources no GLUE task was trained on: Romanian news sentences (FLORES devtest),
  BBC summaries (XSum), and the inputs of BoolQ, WiC and WSC written with their own templates.

Single texts come twice: raw, and filled into the single-sentence template (`sentence: ...`) that a structured
input `{"sentence": ...}` produces; that second shape is the hard one, for CoLA and SST-2 take any sentence in
that form. CB and SuperGLUE-RTE are left out on purpose: their rows are written exactly as MNLI's and RTE's are
(premise/hypothesis, sentence1/sentence2) and ask the same question, so routing them to those tasks is right.

Every text falls in the half "dev" or "test" by a hash of its text: design choices (which signal, which
threshold) are made on "dev", and the figures docs/results.md quotes come from "test".
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from pha_core.tasks import fill_template, get_task, read_local

WRITTEN = Path(__file__).parent / "ood" / "written.json"
SINGLE_TEMPLATE = get_task("sst2").template  # "sentence: {sentence}", shared by CoLA and SST-2
PER_SOURCE = 100  # rows taken from each data source (each file's first rows, in file order)
GIBBERISH = 50
SEED = 0


@dataclass(frozen=True)
class OODText:
    text: str
    category: str  # chitchat, questions, code, languages, gibberish, romanian, news, boolq, wic, wsc
    shape: str  # "raw" or "template"

    @property
    def half(self) -> str:
        digest = hashlib.sha256(self.text.encode()).digest()
        return "dev" if digest[0] % 2 == 0 else "test"


def _both_shapes(texts: list[str], category: str) -> list[OODText]:
    texts = [t.strip() for t in texts if t.strip()]
    raw = [OODText(t, category, "raw") for t in texts]
    templated = [OODText(fill_template(SINGLE_TEMPLATE, {"sentence": t}), category, "template") for t in texts]
    return raw + templated


def _gibberish(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    return [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 8)))
        for _ in range(n)
    ]


def _lines(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line, _ in zip(f, range(n), strict=False) if line.strip()]


def _xsum_summaries(path: Path, n: int) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:  # the file's last record is cut mid-line (data README): skip what does not parse
                out.append(json.loads(line)["summary"])
            except (json.JSONDecodeError, KeyError):
                continue
            if len(out) == n:
                break
    return out


def _task_inputs(task: str, data_dir: Path, n: int) -> list[OODText]:
    """Inputs of a task no GLUE model was trained on, written with that task's own template."""
    splits = read_local(task, data_dir)
    rows = next(iter(splits.values()))[:n]
    return [OODText(row.input, task, "template") for row in rows]


def ood_set(data_dir: Path | None) -> list[OODText]:
    """The whole set; the data-sourced parts only when `data_dir` holds the shared data."""
    written = json.loads(WRITTEN.read_text(encoding="utf-8"))
    items: list[OODText] = []
    for category, texts in written.items():
        if not category.startswith("_"):
            items += _both_shapes(texts, category)
    items += _both_shapes(_gibberish(GIBBERISH, SEED), "gibberish")
    if data_dir is not None and Path(data_dir).is_dir():
        d = Path(data_dir)
        items += _both_shapes(_lines(d / "FLORES-ro-en" / "devtest_first100.ron_Latn", PER_SOURCE), "romanian")
        items += _both_shapes(_xsum_summaries(d / "XSum" / "dev_sample.jsonl", PER_SOURCE), "news")
        for task in ("boolq", "wic", "wsc"):
            items += _task_inputs(task, d, PER_SOURCE)
    return list({item.text: item for item in items}.values())  # one copy of a text, whatever its origins
