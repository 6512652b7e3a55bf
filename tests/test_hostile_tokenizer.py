"""Hostile tokenizer files (issue 18): tokenizer.json, tokenizer_config.json, vocab.json and merges.txt that are
broken, of the wrong shape, FIFOs or folders, a tokenizer that lacks or mis-declares the prompt format's special
tokens, and a tokenizer that does not fit its model. Each is a ConfigError within a time bound, naming the file and
the field."""

import json
import os
from pathlib import Path

import pytest
import torch
from hostile import refused
from mini_tokenizer import SPECIALS, mini_vocab, write_mini_tokenizer
from tokenizer_fixture import shared_tokenizer_folder

from qwen2audio.errors import ConfigError
from qwen2audio.pipeline import Qwen2Audio
from qwen2audio.processor import Processor
from qwen2audio.tokenizer import Tokenizer
from qwen2audio.weights import meta_model


def folder_with(tmp_path: Path, name: str | None = None, content: object = None, fast: bool = True) -> Path:
    folder = write_mini_tokenizer(tmp_path / "tok")
    if not fast:
        (folder / "tokenizer.json").unlink()
    if name is not None:
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        (folder / name).write_bytes(raw)
    return folder


def config_with(**changes) -> dict:
    config = json.loads((write_mini_tokenizer(Path(os.environ["MINI_TOK"])) / "tokenizer_config.json").read_text())
    return {**config, **changes}


@pytest.fixture(autouse=True)
def mini_tok(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINI_TOK", str(tmp_path_factory.mktemp("mini")))


def test_the_mini_tokenizer_loads_both_ways(tmp_path):
    fast = Tokenizer.from_folder(folder_with(tmp_path))
    slow = Tokenizer.from_folder(folder_with(tmp_path / "slow", fast=False))
    text = "the <|AUDIO|> in <|im_start|>"
    assert fast.encode(text) == slow.encode(text) and fast.audio_token_id == len(mini_vocab()) + 3


TOKENIZER_CONFIGS = {
    "not_utf8": (b'{"eos_token": "\xff"}', "not valid JSON"),
    "a_list": ([], "must hold a JSON object"),
    "null": (None, "must hold a JSON object"),
    "decoder_list": (lambda: config_with(added_tokens_decoder=[1]), "added_tokens_decoder must be an object"),
    "decoder_key_word": (lambda: config_with(added_tokens_decoder={"abc": {"content": "x"}}), "key 'abc'"),
    "decoder_key_negative": (lambda: config_with(added_tokens_decoder={"-1": {"content": "x"}}), "key '-1'"),
    "decoder_key_huge": (lambda: config_with(added_tokens_decoder={"9" * 30: {"content": "x"}}), "is not a token id"),
    "content_number": (lambda: config_with(added_tokens_decoder={"300": {"content": 5}}), "added_tokens_decoder[300]"),
    "content_empty": (lambda: config_with(added_tokens_decoder={"300": {"content": ""}}), "non-empty string"),
    "flag_string": (lambda: config_with(added_tokens_decoder={"300": {"content": "<x>", "special": "yes"}}),
                    "true/false flags"),
    "id_elsewhere": (lambda: config_with(added_tokens_decoder={"5000": {"content": "<x>"}}),
                     "declared with id 5000"),
    "eos_number": (lambda: config_with(eos_token=151643), "eos_token must be a token"),
    "pad_object_without_content": (lambda: config_with(pad_token={"id": 3}), "pad_token must be a token"),
    "deeply_nested": (b'{"x": ' + b"{" * 50_000, "not valid JSON"),
}


@pytest.mark.parametrize("name", TOKENIZER_CONFIGS)
def test_hostile_tokenizer_config_json(tmp_path, name):
    content, phrase = TOKENIZER_CONFIGS[name]
    folder = folder_with(tmp_path, "tokenizer_config.json", content() if callable(content) else content)
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, str(folder / "tokenizer_config.json"), phrase)


TOKENIZER_FILES = {
    "json_not_utf8": ("tokenizer.json", b"\xc3\x28", "not UTF-8"),
    "json_list": ("tokenizer.json", b"[1, 2]", "must hold a JSON object"),
    "json_truncated": ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0', "not valid JSON"),
    "json_deep": ("tokenizer.json", b"[" * 100_000, "nested too deeply"),
    "json_no_model": ("tokenizer.json", b'{"version": "1.0"}', "holds a 'NoneType' model"),
    "json_bpe_prefix": ("tokenizer.json", b'{"model": {"type": "BPE", "continuing_subword_prefix": "##"}}',
                        "model.continuing_subword_prefix is '##'"),
    "json_bad_vocab": ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": [1], "merges": []}}', "library"),
    "vocab_list": ("vocab.json", [1, 2], "must map each token to its id"),
    "vocab_string_ids": ("vocab.json", {"a": "0"}, "must map each token to its id"),
    "vocab_huge_id": ("vocab.json", {"a": 2**40}, "must map each token to its id"),
    "merges_three_parts": ("merges.txt", "#version: 0.2\na b c\n".encode(), "line 2 is not a merge"),
    "merges_unknown_token": ("merges.txt", "#version: 0.2\nQ \u2603\n".encode(), "tokenizers library"),
    "merges_not_utf8": ("merges.txt", b"\xff\xfe", "not UTF-8"),
}


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_hostile_tokenizer_files(tmp_path, name):
    file, content, phrase = TOKENIZER_FILES[name]
    folder = folder_with(tmp_path, file, content, fast=file == "tokenizer.json")
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, str(folder / file), phrase)


def test_a_wordpiece_tokenizer_json_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordPiece

    folder = folder_with(tmp_path, "tokenizer.json", Backend(WordPiece({"[UNK]": 0}, unk_token="[UNK]")).to_str().encode())
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, "tokenizer.json", "WordPiece", "byte-level BPE")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"])
def test_a_fifo_or_folder_in_place_of_a_tokenizer_file_does_not_block(tmp_path, name):
    folder = folder_with(tmp_path, fast=name == "tokenizer.json")
    (folder / name).unlink()
    os.mkfifo(folder / name)  # opening it for reading would wait for a writer forever
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, str(folder / name), "not a regular file")
    (folder / name).unlink()
    (folder / name).mkdir()
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, str(folder / name), "not a regular file")


@pytest.mark.parametrize("missing", ["<|audio_bos|>", "<|im_start|>", "<|AUDIO|>", "<|endoftext|>"])
def test_a_tokenizer_without_a_special_token_is_refused(tmp_path, missing):
    """Without <|audio_bos|> as a token, the prompt's tag would be tokenized as plain text and the model would
    answer nonsense: refused at load, naming the token."""
    folder = write_mini_tokenizer(tmp_path / "tok", specials=[s for s in SPECIALS if s != missing])
    if missing == "<|endoftext|>":  # Qwen2Tokenizer adds the default eos itself: name none to really lack it
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None, "pad_token": None}))
    refused(lambda: Processor.from_folder(folder), ConfigError, str(folder), missing, "as one token")


def test_a_special_token_held_as_plain_text_is_refused(tmp_path):
    """<|AUDIO|> in the BPE vocabulary as an ordinary entry (not an added token) is cut by the pre-tokenizer."""
    others = [s for s in SPECIALS if s != "<|AUDIO|>"]
    folder = write_mini_tokenizer(tmp_path / "tok", specials=others)
    (folder / "tokenizer.json").unlink()
    vocab = mini_vocab()
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|AUDIO|>": len(vocab)}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    entries = list(config["added_tokens_decoder"].values())
    config["added_tokens_decoder"] = {str(len(vocab) + 1 + i): entry for i, entry in enumerate(entries)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    refused(lambda: Tokenizer.from_folder(folder), ConfigError, "<|AUDIO|>", "encodes as 9 tokens of text")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    """Our model of a vocabulary of 512 on the meta device, its config's audio_token_index 151646 as in the Hub."""
    from qwen2audio.config import Qwen2AudioConfig

    raw = {"audio_config": {"d_model": 8, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 8},
           "text_config": {"vocab_size": 512, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 2}}
    return meta_model(Qwen2AudioConfig.from_dict(raw))


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(micro_model, tmp_path):
    processor = Processor.from_folder(shared_tokenizer_folder())  # the real vocabulary: ids up to 151648
    refused(lambda: Qwen2Audio(micro_model, tmp_path, None, processor), ConfigError, "token ids up to 151648",
            str(tmp_path / "config.json"), "text_config.vocab_size 512")


def test_a_tokenizer_whose_audio_token_is_elsewhere_is_refused(micro_model, tmp_path):
    processor = Processor.from_folder(write_mini_tokenizer(tmp_path / "tok"))  # <|AUDIO|> at 264, fits 512
    refused(lambda: Qwen2Audio(micro_model, tmp_path, None, processor), ConfigError, "audio_token_index 151646",
            f"<|AUDIO|> the id {processor.tokenizer.audio_token_id}")
    assert torch.device("meta") == next(micro_model.parameters()).device
