"""Processor: outputs equal (torch.equal, same dtypes) to transformers' Qwen2AudioProcessor with left padding."""

import numpy as np
import pytest
import torch
from helpers import test_signal as signal
from tokenizer_fixture import hf_processor, shared_tokenizer_folder

from qwen2audio.errors import InputError
from qwen2audio.features import audio_token_count, num_frames
from qwen2audio.chat_template import BASE_CAPTION_PROMPT, apply_chat_template
from qwen2audio.processor import Processor

AUDIO_ID = 151646


def chat(text: str | None, n_audios: int = 1) -> str:
    items = [{"type": "audio", "audio_url": f"clip{i}.wav"} for i in range(n_audios)]
    items += [{"type": "text", "text": text}] if text else []
    return apply_chat_template([{"role": "user", "content": items}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def hf():
    return hf_processor(shared_tokenizer_folder())


@pytest.fixture(scope="module")
def ours() -> Processor:
    return Processor.from_folder(shared_tokenizer_folder())


def assert_same(ours_out: dict, hf_out) -> None:
    assert set(ours_out) == set(hf_out.keys())
    for key, value in hf_out.items():
        assert ours_out[key].dtype == value.dtype, key
        assert torch.equal(ours_out[key], value), key


def test_one_conversation(ours, hf):
    text, clips = chat("What's that sound?"), [signal(3.0)]
    out = ours(text, audio=clips)
    assert_same(out, hf(text=text, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True))
    assert int((out["input_ids"] == AUDIO_ID).sum()) == 75  # 3 s -> 300 frames -> 75 tokens


def test_batch_of_three_lengths(ours, hf):
    texts = [chat("What's that sound?"), chat(None), chat("Describe it in detail, please.")]
    clips = [signal(1.0, 0), signal(7.3, 1), signal(12.0, 2)]
    out = ours(texts, audio=clips)
    assert_same(out, hf(text=texts, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True))
    counts = [audio_token_count(num_frames(len(c))) for c in clips]
    assert counts == [25, 182, 300]
    assert (out["input_ids"] == AUDIO_ID).sum(-1).tolist() == counts
    assert out["attention_mask"][:, -1].tolist() == [1, 1, 1]  # left padding: every row ends with real tokens
    assert out["attention_mask"].sum(-1).tolist() == [len(ids) for ids in ours.tokenizer.encode_batch(
        [t.replace("<|AUDIO|>", "<|AUDIO|>" * n) for t, n in zip(texts, counts)])]


def test_rows_with_several_or_no_audios(ours, hf):
    """Audios are consumed row by row, left to right: 2 in row 0, 1 in row 1, none in row 2."""
    texts = [chat("Compare them.", n_audios=2), BASE_CAPTION_PROMPT, "just text"]
    clips = [signal(2.0, 3), signal(0.5, 4), signal(4.2, 5)]
    assert_same(ours(texts, audio=clips),
                hf(text=texts, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True))


def test_long_and_tiny_clips(ours, hf):
    """> 30 s is cut to 750 tokens; 160 samples make 0 tokens, so the text around the placeholder joins up."""
    texts = [BASE_CAPTION_PROMPT, "Hello<|AUDIO|>world"]
    clips = [signal(31.5, 6), signal(0.01, 7)]
    with pytest.warns(UserWarning, match="1.5 s are dropped"):  # transformers cuts silently; we say so
        out = ours(texts, audio=clips)
    assert_same(out, hf(text=texts, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True))
    assert (out["input_ids"] == AUDIO_ID).sum(-1).tolist() == [750, 0]


def test_text_only(ours, hf):
    texts = ["no audio at all", "<|im_start|>user\nhi<|im_end|>\n"]
    assert_same(ours(texts), hf(text=texts, return_tensors="pt", padding=True))


def test_torch_tensor_clips_match_numpy(ours):
    text, clip = chat("?"), signal(2.5, 8)
    from_numpy, from_torch = ours(text, audio=[clip]), ours(text, audio=torch.from_numpy(clip))
    assert all(torch.equal(from_numpy[k], from_torch[k]) for k in from_numpy)


def test_vocab_files_only_folder_gives_the_same_inputs(ours):
    fallback = Processor.from_folder(shared_tokenizer_folder(fast=False))
    texts, clips = [chat("a"), chat("bb")], [signal(1.5, 9), signal(2.0, 10)]
    a, b = ours(texts, audio=clips), fallback(texts, audio=clips)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decode_delegates_to_the_tokenizer(ours, hf):
    ids = hf(text=[chat("What's that sound?"), "short"], audio=[signal(1.0)], return_tensors="pt",
             padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1], skip_special_tokens=skip) == hf.decode(ids[1], skip_special_tokens=skip)


def test_count_mismatch_names_both_counts(ours):
    with pytest.raises(InputError, match=r"2 <\|AUDIO\|>.* 1 audio"):
        ours(chat("two?", n_audios=2), audio=[signal(1.0)])
    with pytest.raises(InputError, match=r"1 <\|AUDIO\|>.* 0 audio"):
        ours(chat("none?"))


def test_audios_keyword_is_rejected(ours, hf):
    with pytest.raises(InputError, match="audio="):
        ours(chat("?"), audios=[signal(1.0)])
    # transformers 5.24 fails only through the placeholder count (its `audios` check never sees the keyword), and
    # with no placeholder in the text it warns and drops the audio; we refuse the keyword in both cases.
    with pytest.raises(ValueError, match="no audio inputs were passed"):
        hf(text=chat("?"), audios=[signal(1.0)])
    with pytest.raises(InputError, match="audio="):
        ours("no placeholder", audios=[signal(1.0)])


def test_wrong_sampling_rate_and_shapes(ours):
    with pytest.raises(InputError, match="16000 Hz.*resample"):
        ours(chat("?"), audio=[signal(1.0)], sampling_rate=44100)
    with pytest.raises(InputError, match="mono"):
        ours(chat("?"), audio=[signal(1.0)[None].repeat(2, 0)])
    with pytest.raises(InputError, match="load_audio"):
        ours(chat("?"), audio=["clip.wav"])


def test_apply_chat_template_tokenize(ours, hf):
    """tokenize=True runs the processor on the conversation's own clips (waveforms), like transformers' return_dict."""
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": signal(2.0, 11)},
                                                 {"type": "text", "text": "What is it?"}]}]
    expected = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert_same(ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt"), expected)


def same_outputs(ours_out, hf_out) -> None:
    """Equal values of the same kinds: lists, NumPy arrays (with dtypes) or tensors (with dtypes)."""
    if isinstance(hf_out, (list, str)):
        assert type(ours_out) is type(hf_out) and ours_out == hf_out
        return
    if not isinstance(hf_out, (np.ndarray, torch.Tensor)):  # a BatchFeature
        assert set(ours_out) == set(hf_out.keys())
        for key in hf_out.keys():
            same_outputs(ours_out[key], hf_out[key])
        return
    assert type(ours_out) is type(hf_out) and ours_out.dtype == hf_out.dtype
    assert (ours_out == hf_out).all() and ours_out.shape == hf_out.shape


COMPAT_CASES = [  # apply_chat_template keyword arguments, compared with transformers' for the same ones
    {},
    {"add_generation_prompt": True},
    {"continue_final_message": True},
    {"tokenize": True},
    {"tokenize": True, "return_tensors": "np", "padding": True},
    {"tokenize": True, "return_tensors": "pt", "padding": True, "return_dict": True},
    {"tokenize": True, "return_dict": True, "padding": True},
    {"tokenize": True, "return_tensors": "np", "padding": "max_length", "max_length": 60, "return_dict": True},
    {"tokenize": True, "return_tensors": "pt", "truncation": True, "max_length": 20, "padding": True},
    {"add_generation_prompt": True, "tokenize": True, "return_tensors": "pt", "return_dict": True},  # both refuse
]
TEXT_ONLY = [[{"role": "user", "content": "What is a tone?"}, {"role": "assistant", "content": "A sound"}],
             [{"role": "user", "content": [{"type": "text", "text": "And a chord?"}]}]]


@pytest.mark.parametrize("kwargs", COMPAT_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_apply_chat_template_takes_transformers_arguments(ours, hf, kwargs):
    """Code ported from transformers gets what transformers gives for the same arguments and defaults."""
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": signal(2.0, 12)},
                                      {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": "It is a tone"}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "audio", "audio": signal(1.0, 13)}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A short one "}]}],
    ]
    if "max_length" in kwargs:  # transformers hands max_length to the feature extractor too, which breaks audio
        conversations = TEXT_ONLY  # parity: ours cuts and pads tokens only; compared where transformers works
    for conversation in (conversations, conversations[0]):
        try:
            expected = hf.apply_chat_template(conversation, **kwargs)
        except ValueError:  # rows of different lengths as one tensor without padding: both refuse
            with pytest.raises(InputError, match="padding"):
                ours.apply_chat_template(conversation, **kwargs)
            continue
        same_outputs(ours.apply_chat_template(conversation, **kwargs), expected)


@pytest.mark.parametrize("return_tensors", ["np", None])
def test_call_returns_numpy_or_lists_like_transformers(ours, hf, return_tensors):
    texts, clips = [chat("What's that sound?"), chat(None)], [signal(1.0, 0), signal(2.5, 1)]
    same_outputs(ours(texts, audio=clips, return_tensors=return_tensors),
                 hf(text=texts, audio=clips, sampling_rate=16000, return_tensors=return_tensors, padding=True))
