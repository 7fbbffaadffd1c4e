"""Serving precision (pha_core.precision): the backbone in bf16 under autocast, the PHA parts float32, so the
model version and the generated adapters are those of float32 and the answers stay close to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pha_core.inference import Engine
from pha_core.model import PHAModel
from pha_core.precision import resolve_precision
from pha_core.scoring import AnswerSpace
from tests.support.tiny import tiny_config

TEXTS = ["sentence: a fine film", "premise: a man sleeps. hypothesis: nobody sleeps.", "sentence: dull"]


def _engine(kind: str, precision: str) -> Engine:
    torch.manual_seed(0)
    return Engine(PHAModel(tiny_config(kind, tasks=["sst2", "mnli"])), precision=precision)


def test_precision_names():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("kind", ["minilm", "t5"])
def test_bf16_engine_keeps_version_and_adapters_and_answers_close(kind):
    full, half = _engine(kind, "fp32"), _engine(kind, "bf16")
    assert half.precision == "bf16" and half.model_version == full.model_version
    backbone = {p.dtype for p in half.model.backbone.parameters()}
    pha_parts = {p.dtype for n, p in half.model.named_parameters() if not n.startswith("backbone.")}
    assert backbone == {torch.bfloat16} and pha_parts == {torch.float32}
    prototype = full.trained_prototypes()[0]
    assert half.adapters_for_prototype(prototype).to_bytes() == full.adapters_for_prototype(prototype).to_bytes()

    a, b = full.encode(TEXTS), half.encode(TEXTS)
    assert b.hidden.dtype == torch.bfloat16 and b.z.dtype == np.float32 and b.content.dtype == np.float32
    cos = (a.z * b.z).sum(1) / (np.linalg.norm(a.z, axis=1) * np.linalg.norm(b.z, axis=1))
    assert cos.min() > 0.98
    sets = [full.adapters_for_prototype(prototype)] * len(TEXTS)
    spaces = [AnswerSpace.of_task("sst2")] * len(TEXTS)
    for x, y in zip(full.answer(a, sets, spaces, 4), half.answer(b, sets, spaces, 4), strict=True):
        assert sum(y.probabilities.values()) == pytest.approx(1.0)
        for label, p in x.probabilities.items():
            assert y.probabilities[label] == pytest.approx(p, abs=0.05)
    assert len(half.generate(b, sets, 3)) == len(TEXTS) and len(half.generate_plain(b, 3)) == len(TEXTS)
