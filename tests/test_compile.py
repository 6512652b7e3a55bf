"""load(compile=True): the torch.compile'd decode step gives eager's greedy tokens and, called again with the same
shapes, is not compiled again; the CPU kernels' custom ops (torch's streaming products; the AVX2 bf16 and int8
kernels) are kept whole in the compiled step. On CPU, inductor
writes C++ and needs a compiler (gcc or clang) at run time. Eager and compiled decoding run on the same loaded
model (one load, one compilation per test)."""

import pytest
import torch
from helpers import audio_prompt_ids, left_pad, test_signal
from test_kernels import AVX2_MISSING

import qwen2audio
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.generate import decode_step
from qwen2audio.kernels.cpu import prepare_for_cpu
from qwen2audio.quantize import Int8Linear

N_NEW = 6


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skip where inductor cannot build CPU code (no C++ compiler)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # the backend raises many types: a missing compiler, an unsupported platform, ...
        pytest.skip(f"torch.compile (inductor) cannot compile on this platform: {type(e).__name__}: {e}")


def inputs_for(seconds: list[float]) -> dict[str, torch.Tensor]:
    features, frame_mask = extract_features([test_signal(s, seed=i + 1) for i, s in enumerate(seconds)])
    rows = [audio_prompt_ids([audio_token_count(int(f))], [[9707, 11], [3555, 374] * (i + 1)])
            for i, f in enumerate(frame_mask.sum(-1).tolist())]
    input_ids, attention_mask = left_pad(rows)  # rows of different lengths: padding masks take part
    return dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                feature_attention_mask=frame_mask)


OPTIONS = dict(max_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0, ignore_eos=True)


def int8_lm_head(pipe: qwen2audio.Qwen2Audio) -> None:
    """Weight-only int8 for the lm_head only, then the CPU layers again: one compiled step then holds both kinds of
    AVX2 kernel (bf16 weights in fp32, and int8)."""
    lm = pipe.model.language_model
    lm.lm_head = Int8Linear.from_linear(lm.lm_head)
    prepare_for_cpu(pipe.model, "avx2")


@pytest.mark.parametrize("dtype, kernels, change", [
    (None, "native", None),  # fp32: torch's weight-streaming products, through their custom op
    pytest.param("bfloat16", "avx2", int8_lm_head,
                 marks=pytest.mark.skipif(AVX2_MISSING is not None, reason=f"{AVX2_MISSING}")),
])
def test_compiled_decode_matches_eager_without_recompiling(tiny_checkpoint, inductor, dtype, kernels, change):
    from torch._dynamo.utils import counters

    inputs = inputs_for([1.0, 2.5])
    torch._dynamo.reset()
    counters.clear()
    pipe = qwen2audio.load(tiny_checkpoint, dtype=dtype, kernels=kernels, compile=True, quiet=True)
    if change:
        change(pipe)
    compiled = pipe.decode_fn
    pipe.decode_fn = decode_step
    expected = pipe.generate(**inputs, **OPTIONS)  # eager
    pipe.decode_fn = compiled
    first = pipe.generate(**inputs, **OPTIONS)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"the decode step was compiled {graphs} times in one generation"
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = pipe.generate(**inputs, **OPTIONS)  # same shapes, same cache: must reuse the compiled step
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
