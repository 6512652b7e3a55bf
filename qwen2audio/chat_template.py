"""The Instruct chat template (ChatML with audio items), matching transformers' Qwen2AudioProcessor default template,
and the base model's raw prompt format.

A prompt holds one `<|audio_bos|><|AUDIO|><|audio_eos|>` per clip; the processor (processor.py) later expands each
`<|AUDIO|>` to the clip's number of audio tokens.
"""

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .errors import InputError
from .tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START

Message = dict  # {"role": str, "content": str | list[dict]}; see `apply_chat_template`
Waveform = np.ndarray | Tensor  # mono, 16 kHz, 1-D

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
AUDIO_PLACEHOLDER = f"{AUDIO_BOS}{AUDIO}{AUDIO_EOS}"  # one clip, before expansion
BASE_CAPTION_PROMPT = f"{AUDIO_PLACEHOLDER}Generate the caption in English:"
_AUDIO_SOURCE_KEYS = ("audio", "audio_url", "url", "path")  # where an audio item keeps its clip, first found wins


def base_prompt(text: str = "Generate the caption in English:", num_audios: int = 1) -> str:
    """A prompt for the base (non-Instruct) model: the audio tags, then the task text, no chat format (facts §8)."""
    return AUDIO_PLACEHOLDER * num_audios + text


def _is_audio_item(message: Message, item: dict) -> bool:
    # The reference template's test, including its message-level "type" check.
    return "audio" in item or "audio_url" in item or message.get("type") == "audio" or item.get("type") == "audio"


def _content_items(message: Message) -> list[dict]:
    content = message.get("content")
    if content is None:  # transformers drops None-valued keys; the template then renders an empty message
        return []
    if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
        raise InputError(f"message content must be a string or a list of dicts like {{'type': 'text', 'text': ...}} "
                         f"or {{'type': 'audio', 'audio_url': PATH}}; got {content!r:.80}")
    return content


def apply_chat_template(conversation: Sequence[Message], add_generation_prompt: bool = False,
                        continue_final_message: bool = False) -> str:
    """The Instruct (ChatML) prompt, identical to transformers' Qwen2AudioProcessor default chat template.

    A system message "You are a helpful assistant." is added unless the conversation starts with one. Each audio
    item becomes `Audio {k}: <|audio_bos|><|AUDIO|><|audio_eos|>\\n`, numbered across the whole conversation; text
    items are written verbatim, with nothing between items. continue_final_message=True ends the prompt right
    after the last message's text (no <|im_end|>), so that the model continues it.
    """
    if continue_final_message and add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt cannot both be set: the first continues "
                         "the last message, the second starts a new assistant message")
    parts: list[str] = []
    audio_count = 0
    for index, message in enumerate(conversation):
        if "role" not in message:
            raise InputError(f"message {index} has no 'role' (use 'system', 'user' or 'assistant')")
        if index == 0 and message["role"] != "system":
            parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        parts.append(f"{IM_START}{message['role']}\n")
        if isinstance(message.get("content"), str):
            parts.append(f"{message['content']}{IM_END}\n")
            continue
        for item in _content_items(message):
            if _is_audio_item(message, item):
                audio_count += 1
                parts.append(f"Audio {audio_count}: {AUDIO_PLACEHOLDER}\n")
            elif "text" in item:
                parts.append(str(item["text"]))
        parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    prompt = "".join(parts)
    return _cut_after_final_text(prompt, conversation[-1]) if continue_final_message else prompt


def _cut_after_final_text(prompt: str, final: Message) -> str:
    """The prompt up to the end of the final message's last text, as transformers finds it (its last occurrence,
    leading and trailing spaces as the message has them)."""
    content = final.get("content")
    texts = [content] if isinstance(content, str) else [i["text"] for i in _content_items(final) if "text" in i]
    if not texts or not str(texts[-1]).strip() or str(texts[-1]).strip() not in prompt:
        raise InputError("continue_final_message=True needs text in the final message to continue")
    text = str(texts[-1])
    return prompt[:prompt.rindex(text.strip()) + len(text.lstrip())]


def as_conversations(conversation: Sequence[Message] | Sequence[Sequence[Message]]) -> tuple[list, bool]:
    """(a list of conversations, whether a batch was given): one conversation is a list of message dicts, a batch
    is a list of such lists."""
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence) or not conversation:
        raise InputError("a conversation must be a non-empty list of messages like {'role': 'user', 'content': ...} "
                         f"(or a list of such lists for a batch), got {conversation!r:.60}")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if batched else [conversation]
    for c in conversations:
        if not isinstance(c, (list, tuple)) or not c or not all(isinstance(m, dict) for m in c):
            raise InputError(f"each message must be a dict like {{'role': 'user', 'content': ...}}, got {c!r:.60}")
        for m in c:
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise InputError(f"each message needs a 'role' string ('system', 'user' or 'assistant'), got "
                                 f"{m!r:.80}")
    return conversations, batched


def conversation_audios(conversation: Sequence[Message]) -> list[str | Waveform]:
    """The clips of a conversation in prompt order: each audio item's "audio" value (path or waveform), else its
    "audio_url" (a path)."""
    audios = []
    for message in conversation:
        if isinstance(message.get("content"), str):
            continue
        for item in _content_items(message):
            if _is_audio_item(message, item):
                key = next((k for k in _AUDIO_SOURCE_KEYS if item.get(k) is not None), None)
                if key is None:
                    raise InputError(f"audio item {item!r:.80} names no clip: add 'audio_url': PATH or 'audio': ARRAY")
                audios.append(item[key])
    return audios
