"""The decoder's memory (pha_core.source): fields split at the catalogue's markers, encoded apart, assembled."""

import dataclasses

import pytest
import torch

from pha_core.config import PHAConfig
from pha_core.model import PHAModel
from pha_core.retriever import masked_mean
from pha_core.source import MAX_FIELDS, TOKEN_NORM, encode_by_length, make_source, split_fields
from pha_core.tasks import TASKS
from tests.support.tiny import tiny_config


def test_a_formatted_row_splits_into_its_template_fields():
    for spec in TASKS.values():
        row = {name: f"value of {name}." for name in spec.fields}
        assert split_fields(spec.format(row)) == [f"{name}: value of {name}." for name in spec.fields], spec.name


def test_text_without_markers_is_one_field_and_markers_need_a_word_boundary():
    assert split_fields("hello world") == ["hello world"]
    assert split_fields("the subtext: is hidden") == ["the subtext: is hidden"]
    assert split_fields("premise:no space here") == ["premise:no space here"]
    many = " ".join(f"sentence1: s{i}" for i in range(MAX_FIELDS + 2))
    parts = split_fields(many)
    assert len(parts) == MAX_FIELDS and parts[-1].endswith(f"s{MAX_FIELDS + 1}")


def test_encoding_is_joint_by_default_and_old_checkpoints_load_joint():
    assert tiny_config().encoding == "joint" and tiny_config("t5").encoding == "joint"
    old = PHAConfig(tasks=["sst2"], encoding="fields").to_dict()
    old.pop("encoding")
    assert PHAConfig.from_dict(old).encoding == "joint"
    with pytest.raises(ValueError, match="encoding"):
        tiny_config(encoding="both")


@torch.no_grad()
def test_memory_holds_pooled_fields_pair_features_and_every_token():
    torch.manual_seed(0)
    model = PHAModel(tiny_config(encoding="fields")).eval()
    texts = ["sentence: a fine film", "premise: it rains hypothesis: the street is wet"]
    source = make_source(model.backbone, texts, 64, by_field=True)
    assert source.segment_ids.size(0) == 3 and source.owner.tolist() == [0, 1, 1]
    memory, mask = model.encode(source)
    hidden = model.backbone.encode_packed(source.segment_ids, source.segment_mask)  # the pass model.encode takes
    u = torch.nn.functional.normalize(masked_mean(hidden, source.segment_mask), dim=-1)
    slots = model.field_tokens.slots.weight
    n_tokens = source.segment_mask.sum(1).tolist()
    # Slots no input fills are dropped: u_1, u_2 (input 1 has two fields), |u - v|, u * v remain, in that order.
    assert mask.size(1) == 4 + max(n_tokens[0], n_tokens[1] + n_tokens[2])
    # Input 0: one field: u_1, no pair features, then its tokens.
    assert mask[0, :4].tolist() == [1, 0, 0, 0]
    assert torch.allclose(memory[0, 0], u[0] * TOKEN_NORM + slots[0], atol=1e-5)
    assert int(mask[0].sum()) == 1 + n_tokens[0]
    # Input 1: two fields, |u - v| and u * v, then both fields' tokens in order.
    assert mask[1, :4].tolist() == [1, 1, 1, 1]
    assert torch.allclose(memory[1, 1], u[2] * TOKEN_NORM + slots[1], atol=1e-5)
    assert torch.allclose(memory[1, 2], (u[1] - u[2]).abs() * TOKEN_NORM + slots[MAX_FIELDS], atol=1e-5)
    product = memory[1, 3] - slots[MAX_FIELDS + 1]
    assert torch.allclose(product, u[1] * u[2] * model.field_tokens.product_scale, atol=1e-4)
    assert torch.equal(memory[1, 4 : 4 + n_tokens[1]], hidden[1, : n_tokens[1]])
    after = 4 + n_tokens[1]
    assert torch.equal(memory[1, after : after + n_tokens[2]], hidden[2, : n_tokens[2]])
    assert int(mask[1].sum()) == 4 + n_tokens[1] + n_tokens[2]


@torch.no_grad()
def test_fields_encoded_in_length_chunks_equal_one_padded_call():
    torch.manual_seed(0)
    model = PHAModel(tiny_config(encoding="fields")).eval()
    texts = ["sentence1: " + "word " * n + "end. sentence2: short" for n in (1, 40, 90)] + ["sentence: tiny"]
    source = make_source(model.backbone, texts, 256, by_field=True)
    whole = model.backbone.encode(source.segment_ids, source.segment_mask)
    chunked = encode_by_length(model.backbone.encode, source, token_budget=64)
    real = source.segment_mask.bool()
    assert torch.allclose(whole[real], chunked[real], atol=1e-5)


@torch.no_grad()
def test_joint_encoding_reads_the_whole_text_as_one_sequence():
    model = PHAModel(tiny_config(encoding="joint")).eval()
    assert model.field_tokens is None
    source = model.source(["premise: it rains hypothesis: the street is wet"])
    assert source.segment_ids.size(0) == 1
    memory, mask = model.encode(source)
    assert torch.allclose(memory, model.backbone.encode(source.segment_ids, source.segment_mask), atol=1e-5)
    fields_source = make_source(model.backbone, ["premise: a hypothesis: b"], 64, by_field=True)
    with pytest.raises(ValueError, match="joint"):
        model.encode(fields_source)


@pytest.mark.parametrize("kind", ["minilm", "t5"])
@pytest.mark.parametrize("by_field", [False, True])
def test_inputs_tokenised_ahead_assemble_the_same_source(kind, by_field):
    """The server tokenises once, off the model thread (source.tokenize), and the encoder pass assembles those
    ids (source_of_tokens): the same tensors as tokenising in the pass, rows longer than the window included."""
    from pha_core.source import source_of_tokens, tokenize

    model = PHAModel(tiny_config(kind))
    texts = [
        "sentence: a fine film",
        "premise: it rains hypothesis: the street is wet",
        "sentence1: " + "many words here " * 30 + "sentence2: and a short one",
        "no markers at all, " * 12,
    ]
    tokens = tokenize(model.backbone, texts, by_field)
    assert [t.count for t in tokens] == model.backbone.count_tokens(texts)
    assert max(len(p) for t in tokens for p in t.pieces) > 32  # some rows are cut below
    ahead = source_of_tokens(model.backbone, tokens, 32)
    inline = make_source(model.backbone, texts, 32, by_field)
    for f in dataclasses.fields(inline):
        assert torch.equal(getattr(ahead, f.name), getattr(inline, f.name)), f.name
