"""Tokenizer: encode/decode equal to transformers' Qwen2Tokenizer on the real Qwen vocabulary; streaming decode."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizer_fixture import hf_tokenizer, shared_tokenizer_folder, write_tokenizer_files

from qwen2audio.tokenizer import REPLACEMENT_CHAR, Tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what we'll see; THEY'RE I'M you'd.",
    "chinese": "这是一段玻璃破碎的声音，请描述一下。鑫龘饕餮",
    "mixed_scripts": "Привет, мир! こんにちは世界 안녕하세요 مرحبا بالعالم Ελληνικά ñandú Straße",
    "code": "def f(x: int) -> int:\n\tif x <= 0:\n        return -1  # neg\n    return x ** 2 != 3\r\n}}]];",
    "digits": "12345 3.14159 1,000,000 0x1F 2024-07-31 ١٢٣",
    "emoji": "👍🏽 👨‍👩‍👧‍👦 🇯🇵 😀😀 ✔️ ☃",
    "whitespace_runs": "a   b\n\n\n  c\t\t d   \n \r\n\r\n   trailing   ",
    "unicode_normalisation": "e\u0301 A\u030a \ufb01 \u212b",  # combining marks become NFC; ligature stays
    "inline_special": "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>\nhi<|im_end|>\n",
    "special_lookalikes": "<|AUDIO| <|im_start <|endoftext|>x<|AUDIO|>y <|aud",
    "leading_space": "  leading and trailing  ",
    "empty": "",
}
# Characters that byte-level BPE splits over several tokens, so streaming must hold text back.
MULTIBYTE = "鑫龘饕餮 🦩🪿🫎 𠜎𠜱 Ω≈ç√"


@pytest.fixture(scope="module", params=[True, False], ids=["tokenizer.json", "vocab+merges"])
def pair(request) -> tuple[Tokenizer, object]:
    """(ours, transformers') loaded from the same folder; the vocab+merges folder has no tokenizer.json."""
    folder = shared_tokenizer_folder(fast=request.param)
    return Tokenizer.from_folder(folder), hf_tokenizer(folder)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(shared_tokenizer_folder())


def test_fallback_folder_has_no_tokenizer_json():
    assert not (shared_tokenizer_folder(fast=False) / "tokenizer.json").exists()


def test_fallback_pipeline_equals_transformers():
    """The pipeline rebuilt from vocab.json + merges.txt splits text as transformers' does (digit by digit, ...);
    the vocabulary alone could hide a wrong split, since it has no merges across the boundaries."""
    ours = Tokenizer.from_folder(shared_tokenizer_folder(fast=False)).backend
    theirs = hf_tokenizer(shared_tokenizer_folder(fast=False)).backend_tokenizer
    for text in [*TEXTS.values(), "2024 x2y 3.5e10"]:
        assert ours.normalizer.normalize_str(text) == theirs.normalizer.normalize_str(text)
        assert ours.pre_tokenizer.pre_tokenize_str(text) == theirs.pre_tokenizer.pre_tokenize_str(text)


def test_tokenizer_json_pipeline_is_replaced_like_transformers(tmp_path: Path):
    """transformers 5.24 keeps only the model and added tokens of tokenizer.json and builds Qwen2's normaliser and
    pre-tokenizer in code; a file without the NFC normaliser must therefore still encode "e + combining acute" as é."""
    folder = write_tokenizer_files(tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    text = "caf" + "e\u0301"
    expected = hf_tokenizer(folder)(text)["input_ids"]
    assert BackendTokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids != expected  # file as is
    assert Tokenizer.from_folder(folder).encode(text) == expected


@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_transformers(pair, name):
    ours, hf = pair
    text = TEXTS[name]
    assert ours.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", TEXTS)
def test_decode_matches_transformers(pair, name, skip):
    ours, hf = pair
    ids = hf(TEXTS[name])["input_ids"]
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_of_arbitrary_ids_matches_transformers(pair):
    """Random ids (special ones included) cut characters apart: the U+FFFD replacement must match too."""
    ours, hf = pair
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_token_ids(pair):
    ours, hf = pair
    assert len(ours) == len(hf) == 151649
    assert (ours.endoftext_id, ours.im_start_id, ours.im_end_id) == (151643, 151644, 151645)
    assert (ours.audio_token_id, ours.audio_bos_id, ours.audio_eos_id) == (151646, 151647, 151648)
    assert ours.audio_token_id == hf.convert_tokens_to_ids("<|AUDIO|>")
    assert ours.eos_token_id == hf.eos_token_id and ours.pad_token_id == hf.pad_token_id
    assert ours.special_ids == set(hf.all_special_ids)


def test_eos_comes_from_tokenizer_config(tmp_path: Path):
    folder = write_tokenizer_files(tmp_path, fast=False, eos_token="<|im_end|>")
    ours, hf = Tokenizer.from_folder(folder), hf_tokenizer(folder)
    assert ours.eos_token_id == hf.eos_token_id == 151645
    assert ours.pad_token_id == hf.pad_token_id == 151643


def test_known_ids_from_the_integration_test(tok):
    # facts §7.5: ids seen in transformers' Qwen2-Audio-7B-Instruct integration test.
    assert tok.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert tok.encode("What's that sound?") == [3838, 594, 429, 5112, 30]
    assert tok.encode("<|im_start|>system\n") == [151644, 8948, 198]
    assert tok.encode("Audio 1: ") == [14755, 220, 16, 25, 220]


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], int]:
    """All pieces (empty ones included) and how many steps held text back."""
    decoder = tok.stream(skip_special_tokens=skip)
    pieces = [decoder.put(i) for i in ids]
    held = sum(p == "" for p in pieces)
    return pieces + [decoder.flush()], held


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", [*TEXTS, "multibyte"])
def test_stream_pieces_join_to_decode(tok, name, skip):
    text = MULTIBYTE if name == "multibyte" else TEXTS[name]
    ids = tok.encode(text)
    pieces, held = _stream(tok, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    if name == "multibyte":
        assert held > 0  # the text really has characters split across tokens
        assert len(ids) > len(MULTIBYTE.replace(" ", ""))


def test_stream_of_arbitrary_ids_joins_to_decode(tok):
    """Broken byte sequences: pieces still join to the full decode, and only the flushed end may end in U+FFFD."""
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        pieces, _ = _stream(tok, ids, skip=False)
        assert "".join(pieces) == tok.decode(ids)
        assert not any(p.endswith(REPLACEMENT_CHAR) for p in pieces[:-1])


def test_stream_pieces_helper(tok):
    ids = tok.encode(MULTIBYTE)
    pieces = list(tok.stream().pieces(ids))
    assert all(pieces) and "".join(pieces) == MULTIBYTE
