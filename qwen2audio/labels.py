"""Training examples: token ids with labels in which only the answers count (transformers' -100 convention).

A conversation (Instruct model) is rendered by the chat template without a generation prompt; each assistant
reply's content and its closing `<|im_end|>` count, everything else (the system prompt, the user turns, the
`<|im_start|>assistant\\n` headers, the newline after `<|im_end|>`, the audio tokens) is IGNORE_INDEX. A base-model
example is a prompt and an answer followed by the end-of-text token; the answer and that token count.

Each counted piece is tokenized on its own, as the model produces it when generating after its header; the rest
is tokenized as one text, as the processor does. So the ids equal the processor's except where a reply starts with
white space that would merge with the header's newline. Each `<|AUDIO|>` is expanded to its clip's token count.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .features import audio_token_count, extract_features
from .model import IGNORE_INDEX
from .chat_template import Message, apply_chat_template, conversation_audios
from .tokenizer import IM_START, Tokenizer

Clip = str | Path | bytes | np.ndarray | Tensor  # a file (path, URL, bytes), or a 16 kHz mono waveform


def conversation_pieces(conversation: Sequence[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, counts) pieces, in order; counts is True for each assistant reply's
    content and its <|im_end|>."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the conversation rendered so far: each message appends to it
    header = f"{IM_START}assistant\n"
    for i, message in enumerate(conversation):
        text = apply_chat_template(conversation[:i + 1], add_generation_prompt=False)
        new = text[len(done):]  # this message: "<|im_start|>role\n" ... "<|im_end|>\n" (and a default system)
        if message["role"] == "assistant":
            start = new.index(header) + len(header)
            pieces += [(new[:start], False), (new[start:-1], True), (new[-1:], False)]
        else:
            pieces.append((new, False))
        done = text
    if not any(counts for _, counts in pieces):
        raise InputError("the conversation has no assistant message, so nothing would be learned from it; end it "
                         "with the reply the model should give: {'role': 'assistant', 'content': ...}")
    return pieces


def tokenize_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels): neighbouring pieces that do not count are tokenized together."""
    merged: list[tuple[str, bool]] = []
    for text, counts in pieces:
        if merged and not counts and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif text:
            merged.append((text, counts))
    ids: list[int] = []
    labels: list[int] = []
    for text, counts in merged:
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if counts else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _waveforms(clips: Sequence[Clip]) -> list[np.ndarray | Tensor]:
    """Files decoded and resampled as the pipeline does (processor.load_clips); over 30 s, the first 30 s."""
    from .audio import truncate_long_audio
    from .processor import load_clips

    return [truncate_long_audio(w, f"audio {i}") for i, w in enumerate(load_clips(clips))]


def _example(tokenizer: Tokenizer, pieces: list[tuple[str, bool]], clips: Sequence[Clip]) -> dict[str, Tensor]:
    ids, labels = tokenize_pieces(tokenizer, pieces)
    audio_id = tokenizer.audio_token_id
    n_slots = ids.count(audio_id)
    if n_slots != len(clips):
        raise InputError(f"the text has {n_slots} <|AUDIO|> placeholder(s) but {len(clips)} audio clip(s) were given")
    example: dict[str, Tensor] = {}
    if clips:
        features, frame_mask = extract_features(_waveforms(clips))  # (n, 128, 3000), (n, 3000)
        counts = iter(audio_token_count(int(n)) for n in frame_mask.sum(-1))
        expanded = [(i, l) for i, l in zip(ids, labels) for _ in range(next(counts) if i == audio_id else 1)]
        ids, labels = [i for i, _ in expanded], [IGNORE_INDEX if i == audio_id else l for i, l in expanded]
        example = {"input_features": features, "feature_attention_mask": frame_mask}
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **example}


def conversation_example(tokenizer: Tokenizer, conversation: Sequence[Message],
                         audio: Sequence[Clip] | None = None) -> dict[str, Tensor]:
    """One conversation (system / user / assistant messages, as `chat` takes them) -> input_ids (T,), labels (T,),
    and with audio input_features (n, 128, 3000) and feature_attention_mask (n, 3000). The clips are the audio
    items' own (files are decoded, arrays taken as 16 kHz), unless `audio` gives them in order."""
    clips = list(audio) if audio is not None else conversation_audios(conversation)
    return _example(tokenizer, conversation_pieces(conversation), clips)


def base_example(tokenizer: Tokenizer, prompt: str, answer: str, audio: Sequence[Clip] = (),
                 eos: bool = True) -> dict[str, Tensor]:
    """A base-model example: the prompt (with one <|audio_bos|><|AUDIO|><|audio_eos|> per clip), then the answer
    and, with eos, the tokenizer's end-of-text token; only the answer and that token count. E.g. ASR with the
    prompt "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"."""
    if not answer:
        raise InputError("the answer is empty, so nothing would be learned from this example")
    end = tokenizer.eos_token if eos and tokenizer.eos_token is not None else ""
    return _example(tokenizer, [(prompt, False), (answer + end, True)], list(audio))


def collate(examples: Sequence[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Examples -> one left-padded batch: input_ids, attention_mask, labels (B, T) (padding: pad_token_id, 0,
    IGNORE_INDEX) and, if any example has audio, input_features and feature_attention_mask of all clips in order."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(row: Tensor, value: int) -> Tensor:
        return torch.cat([row.new_full((width - len(row),), value), row])

    batch = {"input_ids": torch.stack([pad(e["input_ids"], pad_token_id) for e in examples]),
             "attention_mask": torch.stack([pad(torch.ones_like(e["input_ids"]), 0) for e in examples]),
             "labels": torch.stack([pad(e["labels"], IGNORE_INDEX) for e in examples])}
    with_audio = [e for e in examples if "input_features" in e]
    if with_audio:
        batch["input_features"] = torch.cat([e["input_features"] for e in with_audio])
        batch["feature_attention_mask"] = torch.cat([e["feature_attention_mask"] for e in with_audio])
    return batch
