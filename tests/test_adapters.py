"""Adapter insertion: a zero adapter leaves the backbone's outputs exactly unchanged; a non-zero one does not."""

import pytest
import torch

from pha_core.adapters import AdapterWeights, batched_adapter
from pha_core.backbones import build_backbone
from pha_core.model import PHAModel
from tests.support.tiny import tiny_config


def _source(model):
    return model.source(["sentence: a fine film", "premise: it rains hypothesis: it is wet"])


def _zero_weights(model, batch):
    d, b = model.backbone.d_model, model.config.bottleneck
    return [
        AdapterWeights(torch.zeros(batch, d, b), torch.zeros(batch, b), torch.zeros(batch, b, d), torch.zeros(batch, d))
        for _ in range(model.n_decoder_layers)
    ]


@pytest.mark.parametrize("kind", ["minilm", "t5"])
def test_zero_adapters_equal_the_plain_backbone(kind):
    torch.manual_seed(0)
    cfg = tiny_config(kind)
    plain = build_backbone(cfg.backbone).eval()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = PHAModel(cfg).eval()
    # Same frozen weights in both: copy the plain backbone's weights into the wrapped one.
    model.backbone.load_state_dict(_remap(state, model.backbone.state_dict().keys()))
    source = _source(model)
    with torch.no_grad():
        h_plain = plain.encode(source.segment_ids, source.segment_mask)
        h_pha = model.backbone.encode(source.segment_ids, source.segment_mask)  # encoder adapters start at W_up = 0
        assert torch.equal(h_plain, h_pha)
        if plain.packs_rows:  # model.encode takes the backbone's packed inference pass: the plain one's, then
            h_plain = plain.encode_packed(source.segment_ids, source.segment_mask)
            assert torch.equal(h_plain, model.backbone.encode_packed(source.segment_ids, source.segment_mask))
        h_plain, mask = model.field_tokens(h_plain, source) if model.field_tokens is not None else (h_plain, None)
        h_pha, mask = model.encode(source)
        assert torch.equal(h_plain, h_pha)
        dec_in = torch.full((2, 3), model.backbone.decoder_start_token_id)
        logits_plain, _ = plain.decode(dec_in, h_plain, mask)
        with model.decoder_context.use(_zero_weights(model, 2)):
            logits_pha, _ = model.backbone.decode(dec_in, h_pha, mask)
        assert torch.equal(logits_plain, logits_pha)
        # A non-zero adapter must change the output (the insertion is live).
        weights = _zero_weights(model, 2)
        weights[0].b_up += 1.0
        with model.decoder_context.use(weights):
            logits_changed, _ = model.backbone.decode(dec_in, h_pha, mask)
        assert not torch.allclose(logits_plain, logits_changed)


def _remap(state, target_keys):
    """Map plain-backbone keys to the wrapped names (`output.dense` -> `output.ffn_output.dense`, ...)."""
    out = {}
    for key in target_keys:
        plain_key = key.replace(".ffn_output.", ".").replace("DenseReluDense.ffn.", "DenseReluDense.")
        out[key] = state[plain_key]
    return out


def test_adapter_switch_turns_every_adapter_off():
    torch.manual_seed(0)
    model = PHAModel(tiny_config()).eval()
    for adapter in model.encoder_adapters:
        torch.nn.init.normal_(adapter.up.weight)
    source = _source(model)
    with torch.no_grad():
        on, _ = model.encode(source)
        with model.adapter_switch.off():
            off, _ = model.encode(source)
        assert not torch.allclose(on, off)


def test_batched_adapter_matches_a_loop_over_examples():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8)
    w = AdapterWeights(torch.randn(3, 8, 4), torch.randn(3, 4), torch.randn(3, 4, 8), torch.randn(3, 8))
    expected = torch.stack([torch.relu(h[i] @ w.w_down[i] + w.b_down[i]) @ w.w_up[i] + w.b_up[i] for i in range(3)])
    assert torch.allclose(batched_adapter(h, w), expected, atol=1e-5)


def test_fresh_generated_adapters_are_near_zero():
    model = PHAModel(tiny_config()).eval()
    weights = model.decoder_adapters(torch.tensor([0, 1]))
    h = torch.randn(2, 4, model.backbone.d_model)
    delta = batched_adapter(h, weights[0])
    assert delta.abs().mean() < 0.05 * h.abs().mean()
