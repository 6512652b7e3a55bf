"""Labels for training examples (labels.py) against hand-written expectations, on the real Qwen vocabulary."""

import re

import pytest
import torch
from helpers import test_signal
from tokenizer_fixture import shared_tokenizer_folder

from qwen2audio.errors import InputError
from qwen2audio.labels import base_example, collate, conversation_example
from qwen2audio.processor import Processor, apply_chat_template
from qwen2audio.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

X = -100
IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS, ENDOFTEXT = 151644, 151645, 151646, 151647, 151648, 151643
NL, SYSTEM, USER, ASSISTANT = 198, 8948, 872, 77091
HELPFUL = [2610, 525, 264, 10950, 17847, 13]  # "You are a helpful assistant." (facts §7.5)
AUDIO_1 = [14755, 220, 16, 25, 220]  # "Audio 1: "
WHATS_THAT_SOUND = [3838, 594, 429, 5112, 30]  # "What's that sound?"
GLASS_BREAKING = [84003, 14719, 13]  # "Glass breaking."
IS_IT_LOUD = [3872, 432, 17361, 30]  # "Is it loud?"
VERY_LOUD = [25756, 17361, 13]  # "Very loud."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_folder(shared_tokenizer_folder())


def conversation():
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "audio", "audio": test_signal(1.0)},
                                         {"type": "text", "text": "What's that sound?"}]},
            {"role": "assistant", "content": "Glass breaking."},
            {"role": "user", "content": "Is it loud?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Very loud."}]}]


def test_multi_turn_conversation_counts_only_the_replies(tokenizer):
    example = conversation_example(tokenizer, conversation())
    system = [IM_START, SYSTEM, NL, *HELPFUL, IM_END, NL]
    user1 = [IM_START, USER, NL, *AUDIO_1, AUDIO_BOS, *[AUDIO] * 25, AUDIO_EOS, NL, *WHATS_THAT_SOUND, IM_END, NL]
    header = [IM_START, ASSISTANT, NL]
    user2 = [IM_START, USER, NL, *IS_IT_LOUD, IM_END, NL]
    ids = system + user1 + header + GLASS_BREAKING + [IM_END, NL] + user2 + header + VERY_LOUD + [IM_END, NL]
    labels = [X] * len(system + user1 + header) + GLASS_BREAKING + [IM_END, X] + [X] * len(user2 + header) + \
        VERY_LOUD + [IM_END, X]
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    assert example["input_features"].shape == (1, 128, 3000) and example["feature_attention_mask"].sum() == 100
    # The ids are what the processor gives for the whole rendered conversation (the replies start with no space).
    clip = conversation()[1]["content"][0]["audio"]
    full = Processor(tokenizer)(apply_chat_template(conversation(), add_generation_prompt=False), audio=[clip])
    assert full["input_ids"][0].tolist() == ids
    assert torch.equal(full["input_features"], example["input_features"])


def test_base_model_example(tokenizer):
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>What's that sound?"
    example = base_example(tokenizer, prompt, "Glass breaking.", audio=[test_signal(0.5)])
    n = 12  # 0.5 s of audio (facts §0)
    assert example["input_ids"].tolist() == [AUDIO_BOS, *[AUDIO] * n, AUDIO_EOS, *WHATS_THAT_SOUND, *GLASS_BREAKING,
                                              ENDOFTEXT]
    assert example["labels"].tolist() == [X] * (n + 2 + 5) + GLASS_BREAKING + [ENDOFTEXT]
    no_eos = base_example(tokenizer, "Say:", " Very loud.", eos=False)
    assert no_eos["labels"].tolist()[-3:] == tokenizer.encode(" Very loud.") and "input_features" not in no_eos


def test_collate_left_pads(tokenizer):
    a = base_example(tokenizer, "<|audio_bos|><|AUDIO|><|audio_eos|>", "Glass breaking.", audio=[test_signal(0.5)])
    b = conversation_example(tokenizer, conversation())
    text_only = base_example(tokenizer, "Is it loud?", "Very loud.")
    batch = collate([a, text_only, b], pad_token_id=ENDOFTEXT)
    T = len(b["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    pad = T - len(a["input_ids"])
    assert batch["input_ids"][0].tolist() == [ENDOFTEXT] * pad + a["input_ids"].tolist()
    assert batch["labels"][0].tolist() == [X] * pad + a["labels"].tolist()
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(a["input_ids"])
    assert batch["input_features"].shape == (2, 128, 3000)  # the clips of rows 0 and 2, in order
    assert torch.equal(batch["input_features"][1], b["input_features"][0])


def test_bad_examples_are_named(tokenizer):
    with pytest.raises(InputError, match="no assistant message"):
        conversation_example(tokenizer, conversation()[:2])
    with pytest.raises(InputError, match=re.escape("1 <|AUDIO|> placeholder(s) but 0 audio clip(s)")):
        conversation_example(tokenizer, conversation(), audio=[])
    with pytest.raises(InputError, match="answer is empty"):
        base_example(tokenizer, "Say:", "")
