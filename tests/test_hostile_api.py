"""Hostile arguments at the Python API's entry points (issue 18): load/load_model, chat/stream/complete/generate,
the processor; each an InputError (or ConfigError/WeightsError for files) with a sentence naming the argument,
checked once where it enters."""

import math
import shutil

import numpy as np
import pytest
import torch
from hostile import refused
from tokenizer_fixture import write_tokenizer_files

import qwen2audio
from qwen2audio.errors import InputError, WeightsError
from qwen2audio.features import extract_features
from qwen2audio.generate import GenerationOptions
from qwen2audio.processor_inputs import windows_features

USER = {"role": "user", "content": "hello"}


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return qwen2audio.load(write_tokenizer_files(folder), quiet=True)


@pytest.mark.parametrize("option, value, phrase", [
    ("max_new_tokens", 5.5, "max_new_tokens must be an integer"), ("max_new_tokens", "5", "must be an integer"),
    ("max_new_tokens", True, "max_new_tokens must be an integer"), ("max_new_tokens", 0, "at least 1"),
    ("temperature", "0.7", "temperature must be a number"), ("temperature", math.nan, "temperature must be a number"),
    ("top_k", 2.5, "top_k must be an integer"), ("top_p", math.nan, "top_p must be a number"),
    ("seed", 2**64, "seed must be in [0, 2**63)"), ("seed", "abc", "seed must be an integer"),
    ("seed", -1, "seed must be in"), ("repetition_penalty", math.inf, "repetition_penalty must be > 0"),
    ("do_sample", "yes", "do_sample must be True or False"), ("eos_token_ids", ["2"], "eos_token_ids must be"),
    ("no_such_option", 1, "unknown generation option(s) no_such_option"),
])
def test_bad_generation_options(pipe, option, value, phrase):
    options = {"do_sample": True, option: value}
    refused(lambda: GenerationOptions().replace(**options), InputError, phrase)
    refused(lambda: pipe.chat([USER], **options), InputError, phrase)  # the same check, from the entry point


@pytest.mark.parametrize("conversation, phrase", [
    ([None], "each message must be a dict"), ([], "non-empty list of messages"), ("hello", "non-empty list"),
    (None, "non-empty list"), ([[]], "each message must be a dict"), ([{"content": "hi"}], "needs a 'role' string"),
    ([{"role": None, "content": "hi"}], "needs a 'role' string"), ([{"role": 5, "content": "hi"}], "'role' string"),
    ([{"role": "user", "content": 5}], "message content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "names no clip"),
])
def test_bad_conversations(pipe, conversation, phrase):
    refused(lambda: pipe.chat(conversation, max_new_tokens=2), InputError, phrase)
    refused(lambda: list(pipe.stream(conversation, max_new_tokens=2)), InputError, phrase)


def test_stream_takes_one_conversation(pipe):
    refused(lambda: list(pipe.stream([[USER], [USER]], max_new_tokens=2)), InputError, "stream() takes one")
    assert list(pipe.stream([[USER]], max_new_tokens=2))  # a batch of one is one conversation


@pytest.mark.parametrize("prompts, audio, phrase", [
    ("", None, "prompt 0 is empty"), (["hi", ""], None, "prompt 1 is empty"), (["hi", 5], None, "list of strings"),
    (None, None, "list of strings"), ("<|audio_bos|><|AUDIO|><|audio_eos|>", "clip.wav", "audio must be a list"),
    ("<|audio_bos|><|AUDIO|><|audio_eos|>", np.zeros(1600, np.float32), "audio must be a list"),
    ("no placeholder", [np.zeros(1600, np.float32)], "0 <|AUDIO|> placeholder(s) but 1 audio clip"),
])
def test_bad_prompts(pipe, prompts, audio, phrase):
    refused(lambda: pipe.complete(prompts, audio, max_new_tokens=2), InputError, phrase)


@pytest.mark.parametrize("clip, phrase", [
    (torch.empty(1600, device="meta"), "meta"), (np.full(1600, np.nan, np.float32), "NaN or infinite"),
    (torch.zeros(1600, dtype=torch.complex64), "complex64"), (np.zeros((2, 3, 4), np.float32), "shape (2, 3, 4)"),
])
def test_bad_clips(pipe, clip, phrase):
    """Through the pipeline, arrays are read by audio.load_audio (an AudioError); given to the processor
    directly, checked there (an InputError); neither runs the model on them."""
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    refused(lambda: pipe.complete(prompt, [clip], max_new_tokens=2), qwen2audio.errors.Qwen2AudioError, phrase)
    refused(lambda: pipe.processor(prompt, [clip]), InputError)


@pytest.mark.parametrize("clip, phrase", [
    (np.zeros(1600, np.int16), "float samples"), (torch.zeros(1600, dtype=torch.bfloat16).to("meta"), "meta device"),
    (np.full(1600, np.inf, np.float32), "NaN or infinite"), (np.zeros((2, 1600), np.float32), "mono 1-D"),
    ("clip.wav", "is a path"), (b"RIFF", "mono 1-D"),
])
def test_bad_clips_given_to_the_processor(pipe, clip, phrase):
    refused(lambda: pipe.processor("<|audio_bos|><|AUDIO|><|audio_eos|>", [clip]), InputError, phrase)


@pytest.mark.parametrize("make, phrase", [
    (lambda: [[100, 200]], "input_ids must be a non-empty (batch, length) tensor"),
    (lambda: torch.tensor([[1.0, 2.0]]), "got torch.float32 tensor"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), "non-empty"),
    (lambda: torch.tensor([100, 200]), "(batch, length)"),
    (lambda: torch.tensor([[10**9]]), "outside the vocabulary"),
    (lambda: torch.tensor([[-1]]), "token id -1"),
    (lambda: torch.zeros(1, 3, dtype=torch.long, device="meta"), "meta"),
])
def test_bad_input_ids(pipe, make, phrase):
    refused(lambda: pipe.generate(make(), max_new_tokens=2), InputError, phrase)


def test_bad_audio_tensors(pipe):
    features, mask = extract_features([np.zeros(16000, np.float32)])
    ids = torch.tensor([[100] + [151646] * 25 + [200]])
    assert pipe.generate(ids, None, features, mask, max_new_tokens=1).shape == (1, 1)  # the good case runs
    cases = [((features, None), "need their feature_attention_mask"), ((None, mask), "without input_features"),
             ((features.to("meta"), mask), "meta device"), ((features, mask.float()), "must be an integer"),
             ((features, mask[:, :100]), "one row per clip"), ((features.fill_(math.nan), mask), "finite values"),
             ((features[0], mask), "one row per clip"), ((features, mask * 3), "0/1")]
    for (f, m), phrase in cases:
        refused(lambda: pipe.generate(ids, None, f, m, max_new_tokens=1), InputError, phrase)


@pytest.mark.parametrize("kwargs, error, phrase", [
    ({"path": None}, InputError, "model path must be"), ({"path": 5}, InputError, "model path must be"),
    ({"path": ""}, InputError, "model path must be"), ({"dtype": []}, InputError, "dtype must be"),
    ({"dtype": "float64"}, WeightsError, "unknown dtype 'float64'"), ({"mmap": "yes"}, InputError, "mmap must be"),
    ({"compile": 1}, InputError, "compile must be"), ({"quantize": "int4"}, InputError, "quantize must be"),
    ({"device": None}, InputError, "unknown device"), ({"quiet": None}, InputError, "quiet must be"),
])
def test_bad_load_arguments(tiny_checkpoint, kwargs, error, phrase):
    kwargs = {"path": tiny_checkpoint, "quiet": True, **kwargs}
    refused(lambda: qwen2audio.load(**kwargs), error, phrase)


def test_bad_load_model_arguments(tiny_checkpoint):
    refused(lambda: qwen2audio.load_model(tiny_checkpoint, allow_missing="head.*"), InputError, "allow_missing")
    refused(lambda: qwen2audio.load_model(tiny_checkpoint, mmap="no"), InputError, "mmap must be")


def test_long_audio_that_cannot_fit_is_refused_before_its_features(pipe):
    """"chunk" mode: 90 s are 3 windows of 750 tokens, more than this model's 2048 positions; refused from the
    lengths alone (a 2-hour recording would otherwise need ~1 GB of log-mel before failing)."""
    clip = np.zeros(90 * 16000, np.float32)
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Describe."
    refused(lambda: pipe.complete(prompt, [clip], long_audio="chunk", max_new_tokens=2), InputError,
            "gives 2250 audio tokens", "at most 2048 positions")
    refused(lambda: pipe.processor(prompt, [clip], long_audio="chunk", max_tokens=2048), InputError, "2250")
    assert pipe.processor(prompt, [clip], long_audio="chunk")["input_features"].shape == (3, 128, 3000)


def test_features_in_bounded_batches_equal_one_batch():
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(int(n)).astype(np.float32) * 0.1 for n in rng.integers(400, 480000, 11)]
    batched, batched_mask = windows_features(windows)  # 11 windows: batches of 8 and 3
    whole, whole_mask = extract_features(windows)
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)
    assert torch.equal(batched_mask, whole_mask)


def test_nan_weights_while_sampling_are_our_error(pipe):
    weight = pipe.model.language_model.lm_head.weight
    saved = weight.data[5].clone()
    weight.data[5] = math.nan
    try:
        refused(lambda: pipe.generate(torch.tensor([[100, 200]]), max_new_tokens=2, do_sample=True, seed=0),
                WeightsError, "NaN or infinite logits")
    finally:
        weight.data[5] = saved
