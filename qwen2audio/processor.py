"""The processor: text with <|AUDIO|> placeholders + audio -> model inputs; matches transformers' Qwen2AudioProcessor
(<|AUDIO|> expansion, log-mel features, tokenizing, batching) with left padding.

A prompt holds one `<|AUDIO|>` per clip. The processor turns each clip into log-mel features, replaces its
`<|AUDIO|>` by as many copies as the encoder will produce audio tokens for it (25 per second, at most 750), and
tokenizes; the model later writes the audio embeddings into exactly those positions.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .chat_template import AUDIO_PLACEHOLDER, Message, Waveform, apply_chat_template, as_conversations, \
    conversation_audios
from .files import present, read_json_file
from .errors import ConfigError, InputError
from .features import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, N_MELS, N_SAMPLES, SAMPLE_RATE, audio_token_count
from .processor_inputs import as_waveform, check_audio_fits, windows_features
from .tokenizer import AUDIO, Tokenizer

# preprocessor_config.json values features.py is built for; a checkpoint declaring others needs another frontend.
PREPROCESSOR_VALUES = {"feature_size": N_MELS, "sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH,
                       "n_fft": N_FFT, "chunk_length": CHUNK_LENGTH, "n_samples": N_SAMPLES, "nb_max_frames": N_FRAMES}


def load_clips(sources: Sequence[object]) -> list[Waveform]:
    """Clips of a conversation as waveforms: paths, URLs and bytes decoded and resampled to 16 kHz
    (qwen2audio.load_audio, its default policy); arrays and tensors taken to be 16 kHz already."""
    from .audio import load_audio

    return [load_audio(a, None if isinstance(a, (str, Path, bytes)) else SAMPLE_RATE) for a in sources]


def _as_type(value: list | Tensor, return_tensors: str | None) -> list | np.ndarray | Tensor:
    """One output in the asked type: lists of ids stay lists (None), become int64 arrays ("np") or tensors ("pt");
    features are NumPy arrays unless "pt"."""
    if return_tensors == "pt":
        return value if isinstance(value, Tensor) else _ids_tensor(value)
    if isinstance(value, Tensor):
        return value.numpy()
    return np.asarray(value, dtype=np.int64) if return_tensors == "np" else value


def _ids_tensor(rows: list[list[int]]) -> Tensor:
    if len({len(r) for r in rows}) > 1:
        raise InputError("texts of different lengths need padding=True to form one tensor")
    return torch.tensor(rows, dtype=torch.long)


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
                    raise ConfigError(f"{config_file}: {key} is {config[key]!r:.40}, but Qwen2-Audio's frontend uses "
                                      f"{expected}; is this a Qwen2-Audio checkpoint?")
        return cls(Tokenizer.from_folder(folder))

    def apply_chat_template(self, conversation: Sequence[Message] | Sequence[Sequence[Message]],
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = False, return_tensors: str | None = None, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None,
                            return_dict: bool = False) -> str | list[str] | list | dict:
        """transformers' ProcessorMixin.apply_chat_template, with its defaults: the prompt text (a list for a list
        of conversations); tokenize=True runs the processor on it and the conversations' audio (paths, URLs and
        bytes are decoded with qwen2audio.load_audio, arrays are taken to be 16 kHz) and returns its input_ids, or
        everything with return_dict=True. return_tensors None gives lists, "np" NumPy arrays, "pt" torch tensors.
        """
        conversations, batched = as_conversations(conversation)
        prompts = [apply_chat_template(c, add_generation_prompt, continue_final_message) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        clips = load_clips([clip for c in conversations for clip in conversation_audios(c)])
        out = self(prompts, audio=clips or None, padding=padding, return_tensors=return_tensors,
                   truncation=truncation, max_length=max_length)
        return out if return_dict else out["input_ids"]

    def __call__(self, text: str | list[str], audio: Sequence[Waveform] | Waveform | None = None,
                 sampling_rate: int = SAMPLE_RATE, padding: bool | str = True, return_tensors: str | None = "pt",
                 truncation: bool = False, max_length: int | None = None, *, long_audio: str = "truncate",
                 audios: object = None, max_tokens: int | None = None) -> dict:
        """input_ids and attention_mask (B, T) int64, left-padded; with audio also input_features
        (num_windows, 128, 3000) float32 and feature_attention_mask (num_windows, 3000) int32. return_tensors:
        "pt" (default; transformers' default is None), "np", or None (lists of ids, NumPy features).

        The i-th `<|AUDIO|>` in the texts (row by row, left to right) belongs to the i-th clip of `audio`.
        Clips over 30 s: long_audio="truncate" keeps the first 30 s (the reference's behaviour) and warns;
        long_audio="chunk" encodes consecutive 30 s windows whose audio tokens follow one another in the clip's
        single <|audio_bos|>...<|audio_eos|> span (one feature row per window). truncation=True with max_length
        cuts each row's tokens to max_length (on the right, as transformers' tokenizer does). max_tokens (the model's
        max_position_embeddings; the pipeline passes it) refuses audio that could not fit before computing features.
        """
        texts, clips = self._check_call(text, audio, sampling_rate, return_tensors, long_audio, audios)
        if clips and max_tokens is not None:
            check_audio_fits(texts, clips, long_audio, max_tokens)
        out: dict = {}
        if clips:
            windows, windows_per_clip = _windows(clips, long_audio)
            features, frame_mask = windows_features(windows)  # (N, 128, 3000) float32, (N, 3000) int32
            window_tokens = iter(audio_token_count(int(n)) for n in frame_mask.sum(-1))
            counts = [sum(next(window_tokens) for _ in range(n)) for n in windows_per_clip]
            texts = expand_audio_tokens(texts, counts)
            out["input_features"], out["feature_attention_mask"] = features, frame_mask
        rows = self.tokenizer.encode_batch(texts)
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        out = {**self._pad(rows, padding, max_length), **out}
        return {k: _as_type(v, return_tensors) for k, v in out.items()}

    def _check_call(self, text: object, audio: object, sampling_rate: int, return_tensors: str | None,
                    long_audio: str, audios: object) -> tuple[list[str], list[Waveform]]:
        """The texts as a list and the clips, after every check of __call__'s arguments."""
        if audios is not None:
            raise InputError("the keyword is `audio=`, not `audios=` (the official Qwen2-Audio README's spelling, "
                             "which transformers 4.5x silently ignored, dropping the audio): pass audio=[clip, ...]")
        if return_tensors not in ("pt", "np", None):
            raise InputError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None")
        if long_audio not in ("truncate", "chunk"):
            raise InputError(f"long_audio must be 'truncate' or 'chunk', got {long_audio!r}")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"text must be a string or a non-empty list of strings, got {text!r:.60}")
        if audio is None:
            clips = []
        elif isinstance(audio, (np.ndarray, Tensor)):  # one clip given bare
            clips = [as_waveform(audio, 0)]
        elif isinstance(audio, (list, tuple)):
            clips = [as_waveform(clip, i) for i, clip in enumerate(audio)]
        else:
            raise InputError(f"audio must be a list of waveforms (or one waveform), got {type(audio).__name__}")
        n_placeholders = sum(t.count(AUDIO) for t in texts)
        if n_placeholders != len(clips):
            raise InputError(f"the text has {n_placeholders} {AUDIO} placeholder(s) but {len(clips)} audio clip(s) "
                             f"were given: put one {AUDIO_PLACEHOLDER} in the text for each clip, in the order of "
                             "`audio` (apply_chat_template does this for every audio item of a conversation)")
        if clips and sampling_rate != SAMPLE_RATE:
            raise InputError(f"audio must be sampled at {SAMPLE_RATE} Hz, got sampling_rate={sampling_rate!r:.40}: "
                             "resample it first (qwen2audio.audio.load_audio decodes files and resamples them to 16 kHz)")
        return texts, clips

    def _pad(self, rows: list[list[int]], padding: bool | str, max_length: int | None) -> dict[str, list]:
        """Left-pad the rows (to the longest, or to max_length with padding="max_length") with the tokenizer's pad
        id -> input_ids and attention_mask as lists of rows (unpadded with padding=False)."""
        if padding not in (True, False, "longest", "do_not_pad", "max_length"):
            raise InputError(f"padding={padding!r} is not supported; use True/'longest', False or 'max_length'")
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:  # parity: transformers returns a (B, 0) batch that no model can run
            raise InputError(f"prompt {empty[0]} is empty: a prompt needs at least one token")
        width = max(len(r) for r in rows)
        if padding == "max_length":
            if max_length is None or max_length < width:
                raise InputError(f"padding='max_length' needs max_length >= the longest row ({width} tokens)")
            width = max_length
        elif padding in (False, "do_not_pad"):
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        if any(len(r) != width for r in rows) and self.tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token, so texts of different lengths cannot be batched")
        pad_id = self.tokenizer.pad_token_id
        return {"input_ids": [[pad_id] * (width - len(r)) + r for r in rows],
                "attention_mask": [[0] * (width - len(r)) + [1] * len(r) for r in rows]}

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(torch.as_tensor(ids).tolist(), skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]
