"""A tiny Qwen2-style tokenizer (the 256 byte-level symbols, a few merges, the six special tokens of Qwen2-Audio) in
the files a model folder holds, for the hostile-file tests and fuzzers: it loads in milliseconds, where the real
vocabulary takes most of a second."""

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers
from tokenizers.models import BPE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
PREPROCESSOR = {"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 30,
                "n_samples": 480000, "nb_max_frames": 3000}


def mini_vocab() -> dict[str, int]:
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in MERGES:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def write_mini_tokenizer(folder: Path, specials: list[str] = SPECIALS) -> Path:
    """tokenizer.json, vocab.json + merges.txt, tokenizer_config.json and preprocessor_config.json; `specials` are
    the added tokens declared (ids after the vocabulary, in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = mini_vocab()
    backend = BackendTokenizer(BPE(vocab, MERGES))
    backend.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    (folder / "tokenizer.json").write_text(backend.to_str())
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {"added_tokens_decoder": {str(len(vocab) + i): {"content": s, **entry} for i, s in enumerate(specials)},
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder
