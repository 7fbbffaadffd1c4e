"""Weights in inference layouts (pha_core/weights.py): `DecoderLinear`'s copies against the `nn.Linear` it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pha_core.model import PHAModel
from pha_core.weights import DecoderLinear, use_decoder_linears
from tests.support.tiny import tiny_config


def _linear(out_features: int, in_features: int) -> DecoderLinear:
    torch.manual_seed(0)
    return DecoderLinear.replacing(nn.Linear(in_features, out_features))


def test_a_decoder_linear_holds_the_linears_own_parameters_under_the_same_names():
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8)))
    weight, keys = block[0].weight, list(block.state_dict())
    use_decoder_linears(block)
    assert type(block[0]) is DecoderLinear and type(block[2][0]) is DecoderLinear
    assert block[0].weight is weight  # tied, not copied: training and checkpoints see one tensor
    assert list(block.state_dict()) == keys


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (8, 8)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_products_in_inference_mode_are_the_linears(shape, rows):
    layer = _linear(*shape)
    x = torch.randn(rows, 1, shape[1])  # [rows, width, d], as the decoder's states come
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    if rows == 1:  # float16 weight, input and output, float32 accumulation: 11 significant bits
        half = F.linear(x.half(), layer.weight.detach().half()).float() + layer.bias.detach()
        assert torch.equal(got, half)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_outside_inference_mode_or_under_autocast_the_weight_is_read_as_it_is():
    layer = _linear(24, 8)
    x = torch.randn(1, 8)
    expected = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), expected)  # training: grad on
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's own product, not a float16 copy
    with torch.enable_grad():
        assert layer(x).requires_grad


def test_copies_follow_a_weight_changed_in_place():
    layer = _linear(24, 8)
    x = torch.randn(1, 8)
    with torch.inference_mode():
        before = (layer(x), layer(x.expand(3, 8)))
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimiser step between two evaluations
    with torch.inference_mode():
        after = (layer(x), layer(x.expand(3, 8)))
    for old, new, rows in zip(before, after, (1, 3), strict=True):
        expected = F.linear(x.expand(rows, 8), layer.weight, layer.bias)
        torch.testing.assert_close(new, expected, atol=2e-2, rtol=2e-3)
        assert not torch.allclose(old, new, atol=1e-1)


@torch.no_grad()
def test_the_minilm_decoders_one_row_step_stays_within_float16_of_the_exact_one():
    """A request served alone: the decoder's answer step in inference mode (float16 copies) against the same
    step with grad off outside it (every weight as stored)."""
    torch.manual_seed(0)
    model = PHAModel(tiny_config()).eval()
    bb = model.backbone
    assert all(type(layer.intermediate.dense) is DecoderLinear for layer in bb.decoder.bert.encoder.layer)
    assert type(bb.decoder.cls.predictions.transform.dense) is DecoderLinear
    source = model.source(["sentence: a warm, funny and moving film"])
    memory, mask = model.encode(source)
    exact = bb.lm_head(bb.start_states(memory, mask))
    with torch.inference_mode():
        served = bb.lm_head(bb.start_states(memory, mask))
    torch.testing.assert_close(served, exact, atol=5e-3, rtol=5e-3)
    assert not torch.equal(served, exact)  # the float16 copies were read
