"""Weight-only int8: the module swap against the dequantized math, and next-token agreement with full precision."""

import pytest
import torch
from helpers import audio_prompt_ids, test_signal

import qwen2audio
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.quantize import Int8Linear, int8_module_names, quantize_int8, quantize_weight


def test_int8_linear_equals_dequantized_linear():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        linear = torch.nn.Linear(96, 40, bias=True).to(dtype)
        q, scales = quantize_weight(linear.weight)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        # per-channel absmax rounding: reconstruction error at most half a step of that channel
        assert ((q.float() * scales[:, None] - linear.weight.float()).abs() <= scales[:, None] / 2 + 1e-6).all()
        module = Int8Linear.from_linear(linear)
        for shape in [(1, 1, 96), (3, 5, 96), (40, 96)]:  # the int8 kernel (decoding) and the dequantized prefill
            x = torch.randn(shape).to(dtype)
            dequant = (q.float() * scales.to(dtype).float()[:, None])
            expected = x.float() @ dequant.T + linear.bias.float()
            got = module(x).float()
            tol = 1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max().item()
            assert (got - expected).abs().max().item() < tol


def test_blockwise_quantization_equals_whole_matrix_math(monkeypatch):
    import qwen2audio.quantize as quantize

    monkeypatch.setattr(quantize, "QUANTIZE_BLOCK_ROWS", 7)  # 40 rows: five full blocks and a partial one
    w = torch.randn(40, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, scales = quantize.quantize_weight(w)
    expected_scales = w.float().abs().amax(dim=1) / 127.0
    assert torch.equal(scales, expected_scales)
    assert torch.equal(q, torch.round(w.float() / expected_scales[:, None]).clamp(-127, 127).to(torch.int8))


def test_quantized_model_agrees_with_full_precision(tiny_checkpoint):
    ours = qwen2audio.load(tiny_checkpoint)
    quant = qwen2audio.load(tiny_checkpoint).model
    names = int8_module_names(quant)
    quantize_int8(quant)
    assert len(names) == 2 * 7 + 1 and all(isinstance(quant.get_submodule(n), Int8Linear) for n in names)
    assert not isinstance(quant.audio_tower.layers[0].fc1, Int8Linear)  # the encoder stays in the model dtype
    feats, mask = extract_features([test_signal(4.0)])
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (200, 200)]
    ids = torch.tensor([audio_prompt_ids([audio_token_count(int(mask.sum()))], texts)])
    with torch.no_grad():
        a = ours.model(ids, None, feats, mask).argmax(-1)
        b = quant(ids, None, feats, mask).argmax(-1)
    agreement = (a == b).float().mean().item()
    print(f"int8 vs fp32 top-1 agreement over {ids.shape[1]} positions: {agreement:.3f}")
    assert agreement >= 0.95


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tiny_gqa_checkpoint, dtype):
    # load(quantize="int8") quantizes each weight as it is read, in blocks of rows; the result must be exactly the
    # module swap applied to the loaded model (same int8 values, same scales, in the same dtype).
    a = qwen2audio.load(tiny_gqa_checkpoint, dtype=dtype, quantize="int8").model.state_dict()
    b = quantize_int8(qwen2audio.load(tiny_gqa_checkpoint, dtype=dtype).model).state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    assert a["language_model.lm_head.weight"].dtype == torch.int8


def test_quantize_weight_leaves_its_input_alone():
    w = torch.randn(300, 40, generator=torch.Generator().manual_seed(2))  # fp32: .float() would be the same tensor
    before = w.clone()
    q, scales = quantize_weight(w)
    assert torch.equal(w, before)
    assert torch.equal(q, torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))


def test_int8_agrees_with_bf16_while_decoding(tiny_checkpoint):
    # The README's accuracy figure: next-token predictions of load(quantize="int8") against the same checkpoint in
    # bf16, over a few hundred positions of random text after a clip, both ways int8 runs: the prefill (a whole
    # prompt, weights dequantized) and decoding (one token at a time through the cache: the int8 CPU kernel where
    # it runs, torch's _weight_int8pack_mm elsewhere), teacher-forced with the same ids.
    from qwen2audio.generate import decode_step, prefill
    from qwen2audio.model import causal_padding_mask

    feats, mask = extract_features([test_signal(4.0)])
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (10, 300)]
    ids = torch.tensor([audio_prompt_ids([audio_token_count(int(mask.sum()))], texts)])
    T, start = ids.shape[1], ids.shape[1] - 300  # decode the 300 text positions after the audio
    bf16 = qwen2audio.load(tiny_checkpoint, dtype="bfloat16", quiet=True).model
    int8 = qwen2audio.load(tiny_checkpoint, dtype="bfloat16", quantize="int8", quiet=True).model
    with torch.no_grad():
        expected = bf16(ids, None, feats, mask)[0].argmax(-1)  # (T,)
        whole = int8(ids, None, feats, mask)[0].argmax(-1)
        cache = int8.new_cache(1, T)
        slots = torch.ones(1, T, dtype=torch.bool)
        stepped = [prefill(int8, ids[:, :start], slots, cache, feats, mask).argmax(-1)]
        for t in range(start, T - 1):
            pos = torch.tensor([t])
            logits = decode_step(int8, ids[:, t:t + 1], pos[None], cache, pos[None], causal_padding_mask(slots, pos, T))
            stepped.append(logits.argmax(-1))
    stepped = torch.cat(stepped)  # predictions for positions start - 1 .. T - 2
    prefill_agreement = (whole == expected).float().mean().item()
    decode_agreement = (stepped == expected[start - 1:T - 1]).float().mean().item()
    print(f"int8 vs bf16 top-1 agreement: prefill {prefill_agreement:.3f} over {T} positions, decoding "
          f"{decode_agreement:.3f} over {stepped.numel()} positions")
    assert prefill_agreement >= 0.95 and decode_agreement >= 0.95
