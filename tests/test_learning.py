"""Learning works: the tiny model, trained on one audio conversation, brings its loss below 10% of the starting
loss within 100 steps, with full fine-tuning and with LoRA alone (the base weights then stay bit-identical)."""

import pytest
import torch
from helpers import test_signal
from tokenizer_fixture import shared_tokenizer_folder

import qwen2audio
from qwen2audio.labels import collate, conversation_example
from qwen2audio.lora import LoraConfig, LoRALinear, apply_lora, lora_targets
from qwen2audio.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    tokenizer = Tokenizer.from_folder(shared_tokenizer_folder())
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": test_signal(2.0)},
                                     {"type": "text", "text": "What's that sound?"}]},
        {"role": "assistant", "content": "It is the sound of glass shattering on a stone floor."},
    ]
    return collate([conversation_example(tokenizer, conversation)], tokenizer.pad_token_id)


def train(model, batch, lr: float, max_steps: int = 100) -> list[float]:
    """AdamW on the trainable parameters until the loss is below 10% of the first; the losses."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  fused=True)
    losses = []
    for _ in range(max_steps):
        loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    print(f"{len(losses)} steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses


def test_full_fine_tuning_learns(tiny_checkpoint, batch):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True).train()
    losses = train(model, batch, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]


def test_lora_alone_learns_and_leaves_the_base_weights_as_they_were(tiny_checkpoint, batch):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    # The random tiny model's lm_head (std 0.02, width 64) bounds every logit near +-1.3, so no change of the hidden
    # states alone can take the loss (log 151936 = 11.9 at the start) below ~10.6: the lm_head gets an adapter too,
    # at a larger scale than the decoder's (with one scale for all, the decoder's adapters first push every position
    # the same way and the loss stalls at log(15), a uniform guess among the answer's tokens, for ~50 steps).
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=r"language_model\.lm_head"))
    apply_lora(model, LoraConfig(r=8, lora_alpha=8, target_modules=lora_targets(mlp=True)))
    losses = train(model, batch, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, before[name.replace(".base_layer.", ".")]), name
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7 + 1
