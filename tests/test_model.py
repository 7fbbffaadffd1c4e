"""The PHA model end to end on tiny random backbones: variants, mixed-task batches, checkpoints."""

import json
from typing import get_args

import pytest
import torch

from pha_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pha_core.collate import collate
from pha_core.config import VariantName
from pha_core.evaluate import predict_examples
from pha_core.model import PHAModel
from pha_core.tasks import Example
from pha_core.variants import VARIANTS
from tests.support.tiny import tiny_config

EXAMPLES = [
    Example("sentence: a gripping, funny film", "positive", "sst2"),
    Example("sentence1: the cat sat. sentence2: a cat was sitting.", "entailment", "rte"),
    Example("premise: it rains. hypothesis: the street is dry.", "contradiction", "mnli"),
    Example("sentence: dull and far too long", "negative", "sst2"),
    Example("sentence1: he left early. sentence2: he stayed all night.", "not_entailment", "rte"),
]


def _trained(cfg, steps=3, seed=0):
    torch.manual_seed(seed)
    model = PHAModel(cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    index = {t: i for i, t in enumerate(model.tasks)}
    for _ in range(steps):
        batch = collate(model.backbone, EXAMPLES, index, 64, 8)
        model(batch).total.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_the_command_line_choices_are_the_variants():
    assert set(get_args(VariantName)) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_generates(variant):
    model = _trained(tiny_config(variant=variant), steps=2)
    index = {t: i for i, t in enumerate(model.tasks)}
    parts = model(collate(model.backbone, EXAMPLES, index, 64, 8))
    assert torch.isfinite(parts.total)
    assert (parts.pro.item() != 0) == (variant == "pha")
    assert (parts.ir.item() != 0) == (variant in ("pha", "no_prototype"))
    out = predict_examples(model, EXAMPLES, max_new_tokens=4)
    assert len(out["given"]) == len(EXAMPLES)
    assert bool(out["retrieved"]) == (variant == "pha")


@pytest.mark.parametrize("encoding", ["joint", "fields"])
def test_mixed_task_batch_equals_one_task_at_a_time(encoding):
    model = _trained(tiny_config(encoding=encoding), steps=3)
    mixed = predict_examples(model, EXAMPLES, batch_size=len(EXAMPLES), max_new_tokens=6)["given"]
    alone = []
    for ex in EXAMPLES:
        alone += predict_examples(model, [ex], batch_size=1, max_new_tokens=6)["given"]
    assert mixed == alone
    # And the logits agree, not only the argmax: per-example adapters never leak across rows.
    index = {t: i for i, t in enumerate(model.tasks)}
    batch = collate(model.backbone, EXAMPLES, index, 64, 8, by_field=model.config.by_field)
    with torch.no_grad():
        h, mask = model.encode(batch.source)
        with model.decoder_context.use(model.decoder_adapters(batch.task_ids)):
            logits, _ = model.backbone.decode(batch.decoder_input_ids, h, mask)
        for row, ex in enumerate(EXAMPLES):
            one = collate(model.backbone, [ex], index, 64, 8, by_field=model.config.by_field)
            h1, mask1 = model.encode(one.source)
            with model.decoder_context.use(model.decoder_adapters(one.task_ids)):
                logits1, _ = model.backbone.decode(one.decoder_input_ids, h1, mask1)
            width = logits1.size(1)
            assert torch.allclose(logits[row, :width], logits1[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["minilm", "t5"])
def test_save_load_gives_bit_identical_generations(tmp_path, kind):
    model = _trained(tiny_config(kind), steps=3)
    before = model.greedy_decode(*_encoded(model), model.decoder_adapters(_gold(model)), 6)
    save_checkpoint(model, tmp_path / "ckpt", recipe={"steps": 3})
    loaded = load_checkpoint(tmp_path / "ckpt")
    after = loaded.greedy_decode(*_encoded(loaded), loaded.decoder_adapters(_gold(loaded)), 6)
    assert before == after
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, loaded.trainable_state_dict()[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def _encoded(model):
    with torch.no_grad():
        return model.encode(model.source([e.input for e in EXAMPLES]))


def _gold(model):
    return model.task_ids([e.task for e in EXAMPLES])


def test_checkpoint_keeps_task_order_and_only_trained_tensors(tmp_path):
    model = PHAModel(tiny_config(tasks=["rte", "sst2", "mnli"]))
    save_checkpoint(model, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["pha"]["tasks"] == ["rte", "sst2", "mnli"]
    assert load_checkpoint(tmp_path / "c").tasks == ["rte", "sst2", "mnli"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert set(stored) == set(model.trainable_state_dict())
    assert not any("embeddings.word_embeddings" in k for k in stored), "frozen backbone weights were saved"


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "nothing")
    model = PHAModel(tiny_config())
    save_checkpoint(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="bottleneck"):
        load_checkpoint(tmp_path / "c", expect=tiny_config(bottleneck=4))
    # Truncated weights file: refused, with the file named.
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "c")


def test_checkpoint_with_other_dims_does_not_fit(tmp_path):
    save_checkpoint(PHAModel(tiny_config()), tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["pha"]["bottleneck"] = 4
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "c")


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    first = PHAModel(tiny_config())
    save_checkpoint(first, tmp_path / "c", trainer_state={"step": 1})
    second = _trained(tiny_config(), steps=1, seed=1)
    save_checkpoint(second, tmp_path / "c")
    assert not (tmp_path / "c" / "trainer_state.pt").exists()
    loaded = load_checkpoint(tmp_path / "c")
    assert torch.equal(loaded.prototypes.weight, second.prototypes.weight)


def test_unknown_task_names_are_refused():
    model = PHAModel(tiny_config())
    with pytest.raises(KeyError, match="unknown task"):
        model.task_ids(["sst2", "nope"])


def test_hyperformer_needs_the_task():
    model = PHAModel(tiny_config(variant="hyperformer"))
    with pytest.raises(ValueError, match="needs the task"):
        model.encode(model.source(["x"]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant"):
        tiny_config(variant="magic")
    with pytest.raises(ValueError, match="unique"):
        tiny_config(tasks=["sst2", "sst2"])


def test_minilm_attention_kernel_follows_the_device_and_leaves_answers_unchanged():
    """On the CPU the MiniLM backbone runs eager attention (measured faster there); SDPA gives the same states."""
    torch.manual_seed(0)
    model = PHAModel(tiny_config()).eval()
    bb = model.backbone
    source = model.source(["sentence: a short one", "sentence: a somewhat longer input sentence here"])
    bb.encoder.set_attn_implementation("sdpa")
    bb.decoder.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = bb.frozen_encoder()(input_ids=source.segment_ids, attention_mask=source.segment_mask)
        hidden = bb.encode(source.segment_ids, source.segment_mask)
    assert bb.encoder.config._attn_implementation == "eager"
    assert bb.decoder.config._attn_implementation == "eager"
    mask = source.segment_mask.bool()
    torch.testing.assert_close(hidden[mask], reference.last_hidden_state[mask], rtol=1e-4, atol=1e-5)
