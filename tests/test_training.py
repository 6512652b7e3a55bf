"""The loss and its gradients against transformers' Qwen2AudioForConditionalGeneration(..., labels=...), and
gradient checkpointing against no checkpointing (fp32, random tiny checkpoint)."""

import pytest
import torch
from helpers import AUDIO_TOKEN, load_hf, two_conversations

import qwen2audio
from qwen2audio.errors import InputError
from qwen2audio.model import IGNORE_INDEX, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_name(name: str) -> str:
    """Our parameter name (the Hub key) -> transformers 5.24's module path (facts §7.4)."""
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    return "model." + name


def padded_batch():
    """Two conversations with audio, left-padded: row 0 one 1 s clip, row 1 two clips (2 s and 3 s). Labels count
    the text after the audio (a stand-in for the answers), not the audio, the padding or the first 6 tokens."""
    inputs = two_conversations(text_seed=0)
    ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((ids == AUDIO_TOKEN) | (attention_mask == 0), IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX
    return inputs, labels


def first_real_tokens(attention_mask):
    """(rows, columns) of each row's first real token."""
    return torch.arange(attention_mask.shape[0]), attention_mask.argmax(1)


def test_loss_and_every_gradient_match_transformers(tiny_checkpoint):
    inputs, labels = padded_batch()
    assert inputs["attention_mask"][0, 0] == 0 and inputs["input_features"].shape[0] == 3
    # transformers also counts each row's first real token, predicted from a padding position: masked here (ours
    # never counts it, tested below).
    labels[first_real_tokens(inputs["attention_mask"])] = IGNORE_INDEX
    ours, hf = qwen2audio.load_model(tiny_checkpoint, quiet=True).train(), load_hf(tiny_checkpoint).train()
    loss = ours(**inputs, labels=labels)
    expected = hf(**inputs, labels=labels).loss
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    expected.backward()
    theirs = dict(hf.named_parameters())
    assert len(theirs) == len(list(ours.parameters()))
    for name, p in ours.named_parameters():
        q = theirs[hf_name(name)]
        assert p.grad is not None and q.grad is not None, name
        assert q.grad.abs().max() > 0, name  # every parameter really takes part (encoder, projector, all layers)
        rel = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative gradient difference {rel:.2e}"


def test_cheap_loss_equals_the_loss_of_all_logits(tiny_checkpoint):
    # forward(labels=...) runs the lm_head only where a target counts; lm_loss over the full logits is the oracle.
    inputs, labels = padded_batch()
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    with torch.no_grad():
        logits = model(**inputs)
        for reduction in ("mean", "sum"):
            full = lm_loss(logits, labels, inputs["attention_mask"], reduction)
            assert torch.allclose(model(**inputs, labels=labels, reduction=reduction), full, rtol=1e-6, atol=1e-6)


def test_a_target_predicted_from_padding_never_counts(tiny_checkpoint):
    # The first real token of a left-padded row is "predicted" by a padding position: counting it or not must not
    # change our loss, and each row's loss equals that row alone without padding.
    inputs, labels = padded_batch()
    rows, cols = first_real_tokens(inputs["attention_mask"])
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    with torch.no_grad():
        unmasked = labels.clone()
        unmasked[rows, cols] = inputs["input_ids"][rows, cols]
        total = model(**inputs, labels=unmasked, reduction="sum")
        assert total == model(**inputs, labels=labels, reduction="sum")
        ids, feats, frames = inputs["input_ids"], inputs["input_features"], inputs["feature_attention_mask"]
        alone0 = model(ids[:1, cols[0]:], None, feats[:1], frames[:1], labels=unmasked[:1, cols[0]:], reduction="sum")
        alone1 = model(ids[1:], None, feats[1:], frames[1:], labels=unmasked[1:], reduction="sum")
    assert cols[0] > 0 and cols[1] == 0 and abs((alone0 + alone1).item() - total.item()) < 1e-4


def test_lm_loss_by_hand():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[5, 1, IGNORE_INDEX, 3], [0, 6, 2, IGNORE_INDEX]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    logp = logits.log_softmax(-1)
    # counted: row 0 -> targets 1 (from t=0) and 3 (from t=2); row 1 -> target 2 (from t=1); target 6 is predicted
    # by a padding position, the last -100 is ignored.
    picked = torch.stack([logp[0, 0, 1], logp[0, 2, 3], logp[1, 1, 2]])
    assert torch.allclose(lm_loss(logits, labels, mask), -picked.mean())
    assert torch.allclose(lm_loss(logits, labels, mask, reduction="sum"), -picked.sum())
    assert torch.allclose(lm_loss(logits, labels), -torch.cat([picked[:2], logp[1, 0, 6:7], picked[2:]]).mean())
    with pytest.raises(InputError, match="count no token"):
        lm_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert lm_loss(logits, torch.full_like(labels, IGNORE_INDEX), reduction="sum") == 0
    with pytest.raises(InputError, match="reduction"):
        lm_loss(logits, labels, reduction="none")


def test_labels_must_match_the_ids(tiny_checkpoint):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    with pytest.raises(InputError, match="shape of input_ids"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))


def gradients(model, inputs, labels):
    model.zero_grad()
    model(**inputs, labels=labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model, inputs) -> int:
    """Bytes of the tensors autograd keeps for backward during a forward pass to the logits: the layers'
    activations (not the weights; the loss's own softmax, the same either way, is left out)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return total


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(tiny_checkpoint):
    inputs, labels = padded_batch()
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True).train()
    plain = gradients(model, inputs, labels)
    kept_plain = saved_bytes(model, inputs)
    model.set_gradient_checkpointing(True)
    calls = []
    # A pre-hook: the recomputation stops after the last tensor backward needs, before the layer's output.
    hook = model.language_model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = gradients(model, inputs, labels)
    hook.remove()
    assert len(calls) == 2  # the layer ran again during backward
    for name, g in plain.items():
        assert (g - checkpointed[name]).abs().max() <= 1e-6 * max(g.abs().max().item(), 1.0), name
    kept = saved_bytes(model, inputs)
    print(f"saved for backward: {kept_plain / 1e6:.2f} MB plain, {kept / 1e6:.2f} MB with checkpointing")
    assert kept < 0.5 * kept_plain
    model.set_gradient_checkpointing(False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    with torch.no_grad():  # no autograd, no recomputation: inference is untouched by the flag
        model.set_gradient_checkpointing(True)
        calls.clear()
        hook = model.language_model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        model(**inputs)
        hook.remove()
    assert len(calls) == 1
