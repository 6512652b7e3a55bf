"""Prompts and the processor: matches transformers' Qwen2AudioProcessor (chat template, <|AUDIO|> expansion, batching).

A prompt holds one `<|AUDIO|>` per clip. The processor turns each clip into log-mel features, replaces its
`<|AUDIO|>` by as many copies as the encoder will produce audio tokens for it (25 per second, at most 750), and
tokenizes; the model later writes the audio embeddings into exactly those positions.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import present, read_json_file
from .errors import ConfigError, InputError
from .features import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, N_MELS, N_SAMPLES, SAMPLE_RATE, audio_token_count
from .processor_inputs import AUDIO_PLACEHOLDER, Waveform, check_audio_fits, check_call, windows_features
from .tokenizer import AUDIO, IM_END, IM_START, Tokenizer

Message = dict  # {"role": str, "content": str | list[dict]}; see `apply_chat_template`

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
BASE_CAPTION_PROMPT = f"{AUDIO_PLACEHOLDER}Generate the caption in English:"
_AUDIO_SOURCE_KEYS = ("audio", "audio_url", "url", "path")  # where an audio item keeps its clip, first found wins
# preprocessor_config.json values features.py is built for; a checkpoint declaring others needs another frontend.
PREPROCESSOR_VALUES = {"feature_size": N_MELS, "sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH,
                       "n_fft": N_FFT, "chunk_length": CHUNK_LENGTH, "n_samples": N_SAMPLES, "nb_max_frames": N_FRAMES}


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


def apply_chat_template(conversation: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The Instruct (ChatML) prompt, identical to transformers' Qwen2AudioProcessor default chat template.

    A system message "You are a helpful assistant." is added unless the conversation starts with one. Each audio
    item becomes `Audio {k}: <|audio_bos|><|AUDIO|><|audio_eos|>\\n`, numbered across the whole conversation; text
    items are written verbatim, with nothing between items.
    """
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
    return "".join(parts)


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


def expand_audio_tokens(texts: list[str], counts: list[int]) -> list[str]:
    """Replace the i-th <|AUDIO|> (row by row, left to right) by counts[i] copies of itself.

    Done on the text, before tokenizing, as the reference does: a clip of <= 2 mel frames gets 0 tokens, and the
    text on both sides of its placeholder is then tokenized as one piece.
    """
    remaining = iter(counts)
    expanded = []
    for text in texts:
        pieces = text.split(AUDIO)  # n placeholders -> n + 1 pieces
        expanded.append(pieces[0] + "".join(AUDIO * next(remaining) + piece for piece in pieces[1:]))
    return expanded


def _windows(clips: list[Waveform], long_audio: str) -> tuple[list[Waveform], list[int]]:
    """The pieces of audio the encoder sees (one per clip, or several 30 s windows per long clip in "chunk" mode),
    and how many pieces each clip gave."""
    from .audio import split_long_audio, truncate_long_audio

    windows: list[Waveform] = []
    counts: list[int] = []
    for i, clip in enumerate(clips):
        if long_audio == "chunk":
            pieces = split_long_audio(np.asarray(clip, dtype=np.float32))
        else:
            pieces = [truncate_long_audio(clip, f"audio {i}")]
        windows += pieces
        counts.append(len(pieces))
    return windows, counts


class Processor:
    """Text + audio -> model inputs, equal to transformers' Qwen2AudioProcessor with left padding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.audio_token = AUDIO
        self.audio_token_id = tokenizer.audio_token_id
        self.sampling_rate = SAMPLE_RATE

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Processor":
        """From a checkpoint folder's tokenizer files; its preprocessor_config.json, if any, must match features.py."""
        config_file = Path(folder) / "preprocessor_config.json"
        if present(config_file):
            config = read_json_file(config_file, "preprocessor_config.json", ConfigError)
            if not isinstance(config, dict):
                raise ConfigError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
            for key, expected in PREPROCESSOR_VALUES.items():
                if config.get(key, expected) != expected:
                    raise ConfigError(f"{config_file}: {key} is {config[key]!r:.40}, but Qwen2-Audio's "
                                      f"frontend uses {expected}; is this a Qwen2-Audio checkpoint?")
        return cls(Tokenizer.from_folder(folder))

    def apply_chat_template(self, conversation: Sequence[Message] | Sequence[Sequence[Message]],
                            add_generation_prompt: bool = True, tokenize: bool = False) -> str | list[str] | dict:
        """The prompt text (a list for a list of conversations); tokenize=True returns `self(prompt, audio=clips)`
        (the clips must then be waveforms)."""
        conversations, batched = as_conversations(conversation)
        prompts = [apply_chat_template(c, add_generation_prompt) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        audios = [clip for c in conversations for clip in conversation_audios(c)]
        return self(prompts, audio=audios or None)

    def __call__(self, text: str | list[str], audio: Sequence[Waveform] | Waveform | None = None,
                 sampling_rate: int = SAMPLE_RATE, padding: bool | str = True, return_tensors: str = "pt", *,
                 long_audio: str = "truncate", audios: object = None, max_tokens: int | None = None
                 ) -> dict[str, Tensor]:
        """input_ids and attention_mask (B, T) int64, left-padded; with audio also input_features
        (num_windows, 128, 3000) float32 and feature_attention_mask (num_windows, 3000) int32.

        The i-th `<|AUDIO|>` in the texts (row by row, left to right) belongs to the i-th clip of `audio`.
        Clips over 30 s: long_audio="truncate" keeps the first 30 s (the reference's behaviour) and warns;
        long_audio="chunk" encodes consecutive 30 s windows whose audio tokens follow one another in the clip's
        single <|audio_bos|>...<|audio_eos|> span (one feature row per window). max_tokens (the model's
        max_position_embeddings; the pipeline passes it) refuses audio that could not fit before computing features.
        """
        texts, clips = check_call(text, audio, sampling_rate, long_audio, audios, return_tensors)
        if clips and max_tokens is not None:
            check_audio_fits(texts, clips, long_audio, max_tokens)
        out: dict[str, Tensor] = {}
        if clips:
            windows, windows_per_clip = _windows(clips, long_audio)
            features, frame_mask = windows_features(windows)  # (N, 128, 3000) float32, (N, 3000) int32
            window_tokens = iter(audio_token_count(int(n)) for n in frame_mask.sum(-1))
            counts = [sum(next(window_tokens) for _ in range(n)) for n in windows_per_clip]
            texts = expand_audio_tokens(texts, counts)
            out["input_features"], out["feature_attention_mask"] = features, frame_mask
        input_ids, attention_mask = self._pad(self.tokenizer.encode_batch(texts), padding)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def _pad(self, rows: list[list[int]], padding: bool | str) -> tuple[Tensor, Tensor]:
        """Left-pad the rows to the longest with the tokenizer's pad id -> (input_ids, attention_mask), int64."""
        if padding not in (True, False, "longest", "do_not_pad"):
            raise InputError(f"padding={padding!r} is not supported; use True (pad to the longest) or False")
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:  # parity: transformers returns a (B, 0) batch that no model can run
            raise InputError(f"prompt {empty[0]} is empty: a prompt needs at least one token")
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows):
            if padding in (False, "do_not_pad"):
                raise InputError("texts of different lengths need padding=True to form one batch")
            if self.tokenizer.pad_token_id is None:
                raise ConfigError("the tokenizer has no pad token, so texts of different lengths cannot be batched")
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(torch.as_tensor(ids).tolist(), skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]
