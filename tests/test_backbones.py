"""The BERT backbone's packed inference pass (`MiniLMBackbone.encode_packed`) against BertModel's padded one."""

from pathlib import Path

import pytest
import torch

from pha_core.backbones import BackboneError
from pha_core.model import PHAModel
from pha_core.packing import Packing
from pha_core.precision import autocast
from pha_core.source import make_source
from tests.support.tiny import tiny_config

TEXTS = [
    "sentence: a warm, funny and moving film",
    "premise: " + "the committee met again on tuesday and agreed " * 6 + "hypothesis: they met",
    "sentence: dull",
    "question: who wrote it? sentence: " + "a long answer that goes on " * 3,
]


def _model(**kwargs) -> PHAModel:
    torch.manual_seed(0)
    model = PHAModel(tiny_config(**kwargs)).eval()
    with torch.no_grad():  # adapters that change the encoder (W_up starts at zero)
        for adapter in model.encoder_adapters:
            adapter.up.weight.normal_(std=0.5)
    return model


def _rows(model: PHAModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TEXTS as encoder rows: ids, mask, and where the real tokens are."""
    source = model.source(TEXTS)
    return source.segment_ids, source.segment_mask, source.segment_mask.bool()


@torch.no_grad()
def test_packed_pass_equals_the_padded_pass_on_real_tokens_and_zeroes_padding():
    model = _model()
    bb = model.backbone
    ids, mask, real = _rows(model)
    assert mask.sum(1).min() < mask.size(1)  # rows of different lengths: there is padding to take out
    whole = bb.encode(ids, mask)
    packed = bb.encode_packed(ids, mask)
    assert torch.allclose(packed[real], whole[real], atol=1e-5)
    assert not packed[~real].any()
    for layer in (0, 1, 2):
        last, kept = bb.encode_packed(ids, mask, layer)
        _, expected = bb.encode_with_layer(ids, mask, layer)
        assert torch.allclose(last[real], whole[real], atol=1e-5)
        assert torch.allclose(kept[real], expected[real], atol=1e-5), layer
    with pytest.raises(ValueError, match="2 layers, not 3"):
        bb.encode_packed(ids, mask, 3)


@torch.no_grad()
def test_rows_are_grouped_for_attention_and_come_back_in_their_order():
    bb = _model().backbone
    texts = [TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2], TEXTS[1]]  # two long rows apart, short ones between
    source = make_source(bb, texts, 256, by_field=False)
    ids, mask = source.segment_ids, source.segment_mask
    packing = Packing(mask)
    assert sum(g.rows for g in packing.groups) == len(texts) and len(packing.groups) > 1
    assert torch.equal(packing.pad(packing.unpad(ids)), ids * mask)
    packed = bb.encode_packed(ids, mask)
    for row, text in enumerate(texts):  # each row as if it were alone
        alone = make_source(bb, [text], 256, by_field=False)
        n = int(alone.segment_mask.sum())
        assert torch.allclose(packed[row, :n], bb.encode(alone.segment_ids, alone.segment_mask)[0], atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("encoding", ["joint", "fields"])
def test_the_model_encodes_with_the_packed_pass_at_inference(encoding, monkeypatch):
    model = _model(encoding=encoding)
    source = model.source(TEXTS)
    memory, mask = model.encode(source)
    calls = []
    original = type(model.backbone).encode_packed
    monkeypatch.setattr(type(model.backbone), "encode_packed", lambda *a, **k: calls.append(1) or original(*a, **k))
    again, _ = model.encode(source)
    assert calls and torch.equal(again, memory)
    monkeypatch.setattr(type(model.backbone), "packs_rows", False)  # the length-chunked pass
    chunked, chunked_mask = model.encode(source)
    assert torch.equal(chunked_mask, mask)
    assert torch.allclose(chunked[mask.bool()], memory[mask.bool()], atol=1e-5)


@torch.no_grad()
def test_packed_pass_honours_the_adapter_switch_and_autocast():
    model = _model()
    bb = model.backbone
    ids, mask, real = _rows(model)
    with model.adapter_switch.off():
        plain = bb.encode_packed(ids, mask)
        assert torch.allclose(plain[real], bb.encode(ids, mask)[real], atol=1e-5)
    assert not torch.allclose(plain[real], bb.encode_packed(ids, mask)[real], atol=1e-3)  # the adapters count
    with autocast("bf16", torch.device("cpu")):  # what serving in bf16 runs
        low, low_whole = bb.encode_packed(ids, mask), bb.encode(ids, mask)
    assert torch.allclose(low[real].float(), low_whole[real].float(), atol=0.1)


def test_packed_pass_is_for_inference_only():
    model = _model()
    model.train()
    source = model.source(TEXTS[:2])
    with pytest.raises(BackboneError, match="inference"):
        model.backbone.encode_packed(source.segment_ids, source.segment_mask)
    memory, _ = model.encode(source)  # training takes the plain pass
    assert memory.requires_grad


@pytest.mark.pretrained
@torch.no_grad()
def test_packed_pass_on_the_real_backbone_matches_bertmodel():
    from pha_core.checkpoint import load_checkpoint

    model = load_checkpoint(Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo").eval()
    bb = model.backbone
    ids, mask, real = _rows(model)
    last, kept = bb.encode_packed(ids, mask, 3)
    whole, expected = bb.encode_with_layer(ids, mask, 3)
    assert torch.allclose(last[real], whole[real], atol=1e-4)
    assert torch.allclose(kept[real], expected[real], atol=1e-4)


@torch.no_grad()
def test_tensors_made_from_weights_follow_the_weights():
    """The decoder's first step is kept between calls, and its projections read copies of their weights in
    inference mode (weights.py): a weight changed in place (an optimiser step between evaluations) must be
    seen by the next call."""
    from pha_core.backbones import Backbone

    model = _model()
    bb = model.backbone
    ids, mask, real = _rows(model)
    memory = bb.encode_packed(ids, mask)

    def served():  # what evaluation and serving run: inference mode, where the copies are read
        with torch.inference_mode():
            return bb.start_states(memory, mask).clone()

    start = served()
    assert torch.allclose(start, Backbone.start_states(bb, memory, mask), atol=1e-5)  # the plain decoder step
    value = bb.encoder.encoder.layer[0].attention.self.value.weight
    value.add_(torch.randn_like(value))
    first = bb.decoder.bert.encoder.layer[0]
    first.crossattention.self.query.weight.add_(0.1)
    first.attention.self.value.bias.add_(0.1)
    first.intermediate.dense.weight.add_(0.1)  # read as stored transposed, a copy
    moved = bb.encode_packed(ids, mask)
    assert torch.allclose(moved[real], bb.encode(ids, mask)[real], atol=1e-5)
    assert not torch.allclose(moved[real], memory[real], atol=1e-3)
    again = served()
    assert torch.allclose(again, Backbone.start_states(bb, memory, mask), atol=1e-5)
    assert not torch.allclose(again, start, atol=1e-3)
    with torch.enable_grad():  # with grad on, the weights as they are (nothing kept carries a gradient)
        memory.requires_grad_(True)
        assert bb.start_states(memory, mask).requires_grad
