"""load(compile=True): the torch.compile'd decode step gives eager's greedy tokens and, called again with the same
shapes, is not compiled again. On CPU, inductor writes C++ and needs a compiler (gcc or clang) at run time."""

import pytest
import torch
from helpers import audio_prompt_ids, left_pad, test_signal

import qwen2audio
from qwen2audio.features import audio_token_count, extract_features

N_NEW = 6


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skip where inductor cannot build CPU code (no C++ compiler, unsupported platform)."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as e:  # the backend raises many types: a missing compiler, a failed build, ...
        pytest.skip(f"torch.compile (inductor) cannot compile on this platform: {type(e).__name__}: {e}")
    finally:
        torch._dynamo.reset()


def test_compiled_decode_matches_eager_without_recompiling(tiny_checkpoint, inductor):
    from torch._dynamo.utils import counters

    clips = [test_signal(1.0, seed=1), test_signal(2.5, seed=2)]
    features, frame_mask = extract_features(clips)
    rows = [audio_prompt_ids([audio_token_count(int(f))], [[9707, 11], [3555, 374] * (i + 1)])
            for i, f in enumerate(frame_mask.sum(-1).tolist())]
    input_ids, attention_mask = left_pad(rows)  # two rows of different lengths: padding masks take part
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                  feature_attention_mask=frame_mask)
    options = dict(max_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0, ignore_eos=True)

    expected = qwen2audio.load(tiny_checkpoint, quiet=True).generate(**inputs, **options)
    torch._dynamo.reset()
    counters.clear()
    pipe = qwen2audio.load(tiny_checkpoint, compile=True, quiet=True)
    first = pipe.generate(**inputs, **options)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"the decode step was compiled {graphs} times in one generation"
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = pipe.generate(**inputs, **options)  # same shapes, same cache: must reuse the compiled step
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_compiled_int8_decode_matches_eager(tiny_checkpoint, inductor):
    # The int8 layers' kernels (a custom op on CPU) are called as they are from the compiled step.
    features, frame_mask = extract_features([test_signal(1.5, seed=3)])
    input_ids = torch.tensor([audio_prompt_ids([audio_token_count(int(frame_mask.sum()))], [[9707, 11], [3555]])])
    inputs = dict(input_ids=input_ids, input_features=features, feature_attention_mask=frame_mask)
    options = dict(max_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0, ignore_eos=True)
    expected = qwen2audio.load(tiny_checkpoint, quantize="int8", quiet=True).generate(**inputs, **options)
    torch._dynamo.reset()
    got = qwen2audio.load(tiny_checkpoint, quantize="int8", compile=True, quiet=True).generate(**inputs, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
