"""Hidden states and attention maps (inspection.capture) against transformers' output_hidden_states and its eager
attention's output_attentions (fp32, random tiny checkpoints, left-padded batch with audio)."""

import pytest
import torch
from helpers import two_conversations

import qwen2audio
from qwen2audio.errors import InputError
from qwen2audio.features import encoder_lengths
from qwen2audio.inspection import capture

pytestmark = pytest.mark.usefixtures("one_thread")


def batch():
    return two_conversations(text_seed=3)


@pytest.fixture(scope="module")
def eager_hf(tiny_gqa_checkpoint):
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(tiny_gqa_checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_encoder(eager_hf):
    """transformers' encoder outputs for batch()'s clips, with the key-padding mask Qwen2AudioModel.forward builds
    (5.24)."""
    from transformers.masking_utils import create_bidirectional_mask

    inputs = batch()
    feats, mask = inputs["input_features"], inputs["feature_attention_mask"]
    tower = eager_hf.model.audio_tower
    conv_lengths, _ = tower._get_feat_extract_output_lengths(mask.sum(-1))
    keys = (torch.arange(1500)[None, :] < conv_lengths[:, None]).long()
    mask4 = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(len(feats), 1500, 1),
                                      attention_mask=keys)
    with torch.no_grad():
        return tower(feats, attention_mask=mask4, output_hidden_states=True, output_attentions=True)


def test_decoder_hidden_states_and_attention_maps_match_eager_transformers(tiny_gqa_checkpoint, eager_hf):
    inputs = batch()
    model = qwen2audio.load_model(tiny_gqa_checkpoint, quiet=True)
    with torch.no_grad():
        expected = eager_hf(**inputs, output_hidden_states=True, output_attentions=True)
        with capture(model, decoder_attention=[0, 1]) as seen:
            model(**inputs)
    real = inputs["attention_mask"].bool()  # padded positions are undefined in both
    assert len(seen.decoder_hidden_states) == len(expected.hidden_states) == 3  # embeddings, layer 0, final norm
    for ours, theirs in zip(seen.decoder_hidden_states, expected.hidden_states):
        assert (ours[real] - theirs[real]).abs().max() < 1e-5
    assert sorted(seen.decoder_attentions) == [0, 1]
    for layer in (0, 1):
        ours, theirs = seen.decoder_attentions[layer], expected.attentions[layer]
        assert ours.shape == theirs.shape == (2, 4, *real.shape[1:], real.shape[1])  # (B, heads, T, T), GQA
        rows = real[:, None, :, None].expand_as(ours)
        assert (ours - theirs)[rows].abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_encoder_hidden_states_and_attention_maps_match_eager_transformers(tiny_gqa_checkpoint, hf_encoder, mode):
    inputs = batch()
    model = qwen2audio.load_model(tiny_gqa_checkpoint, quiet=True)
    model.encoder_mode = mode
    expected = hf_encoder
    with torch.no_grad():
        with capture(model, encoder_attention=[0, 1]) as seen:
            model(**inputs)
    positions, tokens = encoder_lengths(inputs["feature_attention_mask"].sum(-1))
    assert len(seen.encoder_hidden_states) == len(expected.hidden_states) == 3
    if mode == "reference":  # all 1500 positions, padded ones included, as transformers computes them
        for ours, theirs in zip(seen.encoder_hidden_states, expected.hidden_states):
            assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
        for layer in (0, 1):
            assert (seen.encoder_attentions[layer] - expected.attentions[layer]).abs().max() < 1e-5
        return
    for clip, (n, m) in enumerate(zip(positions.tolist(), tokens.tolist())):  # fast: each clip's valid part
        for i, (ours, theirs) in enumerate(zip(seen.encoder_hidden_states, expected.hidden_states)):
            valid = m if i == len(expected.hidden_states) - 1 else n  # the last entry is pooled
            assert (ours[clip, :valid] - theirs[clip, :valid]).abs().max() < 1e-5
        for layer in (0, 1):
            ours, theirs = seen.encoder_attentions[layer][clip], expected.attentions[layer][clip]
            assert (ours[:, :n, :n] - theirs[:, :n, :n]).abs().max() < 1e-5
            assert ours[:, :n, n:].abs().sum() == 0  # the padded keys this clip does not see


def hooks_and_switches(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, [m.eager for m in model.modules() if hasattr(m, "eager")]


def test_off_means_the_plain_sdpa_path(tiny_checkpoint):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    inputs = batch()
    assert hooks_and_switches(model) == (0, [False] * 4)
    with torch.no_grad():
        plain = model(**inputs)
        with capture(model, decoder_attention=[1], encoder_attention=[0]):
            assert hooks_and_switches(model)[1] == [True, False, False, True]  # encoder 0, decoder 1
            eager = model(**inputs)
    assert hooks_and_switches(model) == (0, [False] * 4)  # nothing left behind
    real = inputs["attention_mask"].bool()
    assert (plain[real] - eager[real]).abs().max() < 1e-5  # the eager path is an oracle for the SDPA one


def test_hidden_states_keep_their_graph_and_bad_layers_are_named(tiny_checkpoint):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with capture(model, decoder_attention=[-1]) as seen:
        model(ids)
    seen.decoder_hidden_states[1].sum().backward()  # e.g. a probe's loss on a middle layer
    assert model.language_model.model.layers[0].mlp.down_proj.weight.grad is not None
    assert list(seen.decoder_attentions) == [1] and seen.encoder_hidden_states == []  # text only: no encoder
    with pytest.raises(InputError, match="decoder attention layer 2 does not exist"):
        with capture(model, decoder_attention=[2]):
            pass
    assert hooks_and_switches(model)[0] == 0
