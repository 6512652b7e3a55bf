"""Chat template: the prompt text equals transformers' Qwen2AudioProcessor.apply_chat_template(..., tokenize=False)."""

import numpy as np
import pytest
from tokenizer_fixture import hf_processor, shared_tokenizer_folder

from qwen2audio.errors import InputError
from qwen2audio.chat_template import BASE_CAPTION_PROMPT, apply_chat_template, base_prompt, conversation_audios
from qwen2audio.processor import Processor

GLASS, COUGH = "glass-breaking.mp3", "throat_clearing.wav"
QUESTION = {"type": "text", "text": "What's that sound?"}

CONVERSATIONS = {
    "voice_chat": [
        {"role": "user", "content": [{"type": "audio", "audio_url": GLASS}]},
    ],
    "audio_analysis": [
        {"role": "user", "content": [{"type": "audio", "audio_url": GLASS}, QUESTION]},
    ],
    "multi_turn_two_audios": [
        {"role": "user", "content": [{"type": "audio", "audio_url": GLASS}, QUESTION]},
        {"role": "assistant", "content": "It is the sound of glass shattering."},
        {"role": "user", "content": [{"type": "audio", "audio_url": COUGH},
                                     {"type": "text", "text": "How about this one?"}]},
    ],
    "system_prompt": [
        {"role": "system", "content": "You are a sound expert. Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "Listen: "}, {"type": "audio", "audio_url": GLASS},
                                     {"type": "text", "text": "and this "}, {"type": "audio", "audio_url": COUGH}]},
    ],
    "text_only_string": [
        {"role": "user", "content": "Tell me a joke about\nnewlines.  "},
    ],
    "text_only_list": [
        {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": " two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Three."}]},
        {"role": "user", "content": "Four?"},
    ],
    "audio_key_without_type": [  # items are recognised by their keys too, arrays included
        {"role": "user", "content": [{"audio": np.zeros(1600, dtype=np.float32)}, {"text": "Transcribe."}]},
    ],
    "system_later_and_empty_content": [
        {"role": "user", "content": []},
        {"role": "system", "content": "late system"},
        {"role": "assistant", "content": None},
    ],
    # facts §9.12: a message-level "type": "audio" makes every item of it an audio slot (5.24's template checks
    # message['type'] as well as content['type']).
    "message_level_type": [
        {"role": "user", "type": "audio", "content": [{"type": "text", "text": "counted as audio"}]},
        {"role": "user", "content": [{"type": "text", "text": "plain"}, {"type": "image", "url": "x.png"}]},
    ],
}

# facts §7.6: the rendered multi-turn example.
MULTI_TURN_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat's that sound?<|im_end|>\n<|im_start|>assistant\nIt is the sound of "
    "glass shattering.<|im_end|>\n<|im_start|>user\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nHow about this "
    "one?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def hf():
    return hf_processor(shared_tokenizer_folder())


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_matches_transformers(hf, name, generation_prompt):
    conversation = CONVERSATIONS[name]
    expected = hf.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
    assert apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected


def test_multi_turn_rendering_as_documented():
    assert apply_chat_template(CONVERSATIONS["multi_turn_two_audios"], add_generation_prompt=True) == \
        MULTI_TURN_EXPECTED


def test_message_level_type_counts_every_item_as_audio():
    text = apply_chat_template(CONVERSATIONS["message_level_type"])
    assert "counted as audio" not in text and "Audio 1: " in text and "plain" in text


def test_processor_method_and_batched_conversations(hf):
    ours = Processor.from_folder(shared_tokenizer_folder())
    batch = [CONVERSATIONS["voice_chat"], CONVERSATIONS["system_prompt"]]
    assert ours.apply_chat_template(batch) == hf.apply_chat_template(batch)  # transformers' default: no prompt
    single = CONVERSATIONS["audio_analysis"]
    assert ours.apply_chat_template(single) == hf.apply_chat_template(single)
    assert ours.apply_chat_template(single, add_generation_prompt=True) == hf.apply_chat_template(
        single, add_generation_prompt=True)


def test_conversation_audios_in_prompt_order():
    assert conversation_audios(CONVERSATIONS["multi_turn_two_audios"]) == [GLASS, COUGH]
    assert conversation_audios(CONVERSATIONS["system_prompt"]) == [GLASS, COUGH]
    assert conversation_audios(CONVERSATIONS["text_only_list"]) == []
    array = CONVERSATIONS["audio_key_without_type"][0]["content"][0]["audio"]
    assert conversation_audios(CONVERSATIONS["audio_key_without_type"])[0] is array
    both = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav", "audio_url": "b.wav"}]}]
    assert conversation_audios(both) == ["a.wav"]  # "audio" wins over "audio_url"


def test_audio_item_without_a_clip_is_an_error():
    with pytest.raises(InputError, match="audio_url"):
        conversation_audios([{"role": "user", "content": [{"type": "audio"}]}])


def test_bad_messages_are_errors():
    with pytest.raises(InputError, match="role"):
        apply_chat_template([{"content": "hi"}])
    with pytest.raises(InputError, match="list of dicts"):
        apply_chat_template([{"role": "user", "content": ["a plain string item"]}])


def test_base_prompt():
    assert BASE_CAPTION_PROMPT == "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    assert base_prompt() == BASE_CAPTION_PROMPT
    assert base_prompt("Detect the language and recognize the speech: <|en|>", num_audios=2) == (
        "<|audio_bos|><|AUDIO|><|audio_eos|>" * 2 + "Detect the language and recognize the speech: <|en|>")
