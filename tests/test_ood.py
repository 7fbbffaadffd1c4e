"""The out-of-distribution set of bench/ood.py: what it holds, each text once, two halves."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.ood import OODText, ood_set
from pha_core.source import candidates_by_template
from pha_core.tasks import GLUE_TASKS, get_task


def test_written_categories_come_raw_and_in_the_sentence_template():
    items = ood_set(None)
    counts = Counter((i.category, i.shape) for i in items)
    for category in ("chitchat", "questions", "code", "languages", "gibberish"):
        assert counts[(category, "raw")] >= 25 and counts[(category, "template")] >= 25, category
    assert len({i.text for i in items}) == len(items)
    assert {i.half for i in items} == {"dev", "test"}
    assert OODText("hello world", "chitchat", "raw").half == OODText("hello world", "code", "raw").half


@pytest.mark.data
def test_data_sources_no_glue_task_was_trained_on(data_dir):
    items = ood_set(data_dir)
    counts = Counter(i.category for i in items)
    assert counts["romanian"] == 200 and counts["news"] == 200
    assert all(counts[t] >= 95 for t in ("boolq", "wic", "wsc"))
    # BoolQ, WiC and WSC rows are written with their own templates, which no GLUE task's template matches;
    # the sentence-shaped ones match CoLA's and SST-2's: the hard part of the set.
    templates = [get_task(t).template for t in GLUE_TASKS]
    shaped = [i for i in items if i.category in ("boolq", "wic", "wsc")]
    assert not candidates_by_template([i.text for i in shaped], templates).any()
    sentences = [i.text for i in items if i.shape == "template" and i.category == "news"]
    allowed = candidates_by_template(sentences, templates)
    assert allowed[:, GLUE_TASKS.index("cola")].all() and allowed[:, GLUE_TASKS.index("sst2")].all()
