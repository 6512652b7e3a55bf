"""The CPU step of inference (kernels/cpu.py, layers.py): the choice from what the CPU reports, the layer swap
(shared parameters, visible, undoable), the layers against their plain versions (autograd included), the model's
greedy tokens against the reference path, and the fallback where the C++ kernels cannot be built."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import audio_prompt_ids, left_pad, load_hf, test_signal
from test_kernels import AVX2_MISSING, VNNI_MISSING, needs_avx2, needs_bf16_kernel

import qwen2audio
from qwen2audio import decoder
from qwen2audio.decoder import Attention
from qwen2audio.errors import InputError
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.generate import GenerationOptions, generate
from qwen2audio.kernels import cpu, extension, layers, products
from qwen2audio.kernels.cpu import choose_kernels, prepare_for_cpu, restore_plain
from qwen2audio.quantize import Int8Linear, quantize_int8

BF16 = torch.bfloat16
AVX2_ONLY = {"avx", "avx2", "fma3", "f16c", "sse4_2"}  # a laptop / desktop / cloud CPU without bf16 arithmetic


@pytest.mark.parametrize("features, dtype, expected", [
    (AVX2_ONLY, BF16, "avx2"),
    (AVX2_ONLY | {"avx512_f", "avx512_bw", "avx512_vl", "avx512_vnni"}, BF16, "avx2"),  # AVX-512 without BF16
    (AVX2_ONLY | {"avx512_f", "avx512_bf16"}, BF16, "native"),  # Zen 4, Cooper Lake
    (AVX2_ONLY | {"amx_bf16", "amx_tile"}, BF16, "native"),  # Sapphire Rapids
    (AVX2_ONLY | {"avx512_bf16"}, torch.float16, "avx2"),  # fp16 needs AVX512_FP16 or AMX-FP16 to be native
    (AVX2_ONLY, torch.float32, "native"),  # fp32 is fast in torch everywhere
    ({"neon"}, BF16, "native"),  # no AVX2: torch's kernels
])
def test_auto_choice_follows_the_cpu(features, dtype, expected):
    choice, why = choose_kernels("auto", features, dtype)
    assert choice == expected and why
    assert choose_kernels("reference", features, dtype)[0] == "reference"


def test_bad_kernel_choices_are_clear_errors():
    with pytest.raises(InputError, match="kernels must be one of 'auto', 'native', 'avx2', 'reference'"):
        choose_kernels("fast", AVX2_ONLY, BF16)
    with pytest.raises(InputError, match="needs a CPU with AVX2 and FMA"):
        choose_kernels("avx2", {"neon"}, BF16)


def test_cli_offers_the_same_choices():
    from qwen2audio.cli import build_parser

    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    assert tuple(next(a for a in chat._actions if a.dest == "kernels").choices) == cpu.KERNELS


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """bf16 and int8 (over bf16) models, loaded once with the plain layers; each test prepares what it needs."""
    return {q: qwen2audio.load(tiny_checkpoint, dtype=BF16, quantize=q, kernels="reference", quiet=True).model
            for q in (None, "int8")}


@pytest.fixture
def plain(models):
    """The models, given back plain after the test, whatever it prepared."""
    yield models
    for model in models.values():
        restore_plain(model)


@needs_avx2
def test_prepare_shares_parameters_shows_itself_and_undoes(plain, caplog):
    model = plain[None]
    before = {name: (t, t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    with caplog.at_level(logging.INFO, logger="qwen2audio"):
        assert prepare_for_cpu(model, "avx2") == "avx2"
    assert "CPU kernels: avx2 (asked for)" in caplog.text
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[name] is t and t.dtype == dtype for name, (t, dtype) in before.items())  # the same tensors
    mlp = model.language_model.model.layers[0].mlp
    assert type(mlp.up_proj) is layers.Fp32Linear and "Fp32Linear" in repr(model)
    assert type(model.audio_tower.conv1) is layers.Fp32Conv1d and model.dtype == torch.float32
    restore_plain(model)
    assert type(mlp.up_proj) is torch.nn.Linear and mlp.up_proj.weight is before[
        "language_model.model.layers.0.mlp.up_proj.weight"][0]
    assert model.dtype == BF16 and not any(isinstance(m, layers.KernelLayer) for m in model.modules())


def test_loaded_and_built_models_are_plain(tiny_checkpoint):
    # Only prepare_for_cpu swaps layers; load(kernels="reference") and a model built in Python keep nn.Linear.
    from qwen2audio.model import Qwen2AudioForConditionalGeneration

    plain = qwen2audio.load(tiny_checkpoint, kernels="reference", quiet=True).model
    built = Qwen2AudioForConditionalGeneration(plain.cfg)
    for model in (plain, built):
        assert not any(isinstance(m, layers.KernelLayer) for m in model.modules())
    native = qwen2audio.load(tiny_checkpoint, quiet=True).model  # fp32 on any CPU: native
    assert type(native.language_model.lm_head) is layers.StreamingLinear
    assert type(native.audio_tower.layers[0].fc1) is torch.nn.Linear  # the encoder is left as it is


@needs_avx2
@pytest.mark.parametrize("weight_dtype", [BF16, torch.float16])
def test_fp32_linear_equals_fp32_math_and_trains(weight_dtype):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 40).to(weight_dtype)
    fast = layers.Fp32Linear.from_module(plain)
    wide = plain.weight.double(), plain.bias.double()
    for shape in [(1, 1, 96), (3, 96), (2, 8, 96), (5, 7, 96)]:  # the kernel (<= 16 rows) and widened blocks
        x = torch.randn(shape)
        with torch.no_grad():
            got = fast(x)
        assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 40)
        exact = F.linear(x.double(), *wide)
        assert (got.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    # With a gradient needed, the layer runs torch's differentiable ops: the same gradients as the plain math.
    x = torch.randn(2, 96, requires_grad=True)
    fast(x).square().sum().backward()
    grad_w, grad_x = plain.weight.grad.clone(), x.grad.clone()
    plain.weight.grad, x.grad = None, None
    F.linear(x, plain.weight.float(), plain.bias.float()).square().sum().backward()
    assert torch.equal(grad_w, plain.weight.grad) and torch.equal(grad_x, x.grad)


@pytest.mark.parametrize("rows", ["torch", pytest.param("avx2", marks=needs_avx2),
                                  pytest.param("avx512_bf16", marks=needs_bf16_kernel)])
def test_streaming_linear_equals_linear(rows):
    torch.manual_seed(1)
    plain = torch.nn.Linear(96, 40).to(BF16)
    fast = layers.StreamingLinear.from_module(plain, rows)
    assert f"rows={rows}" in repr(fast)
    for shape in [(1, 1, 96), (3, 96), (2, 8, 96), (40, 96)]:  # streamed (<= 16 rows), and F.linear
        x = torch.randn(shape).to(BF16)
        with torch.no_grad():
            got, expected = fast(x), F.linear(x, plain.weight, plain.bias)
        assert got.dtype == BF16 and got.shape == expected.shape
        # fp32 sums in either; the results differ by the bf16 rounding of the outputs at most
        assert (got.float() - expected.float()).abs().max().item() <= 2 ** -7 * expected.float().abs().max().item()
        if rows != "torch" and x.numel() // 96 <= 16:  # the kernel's fp32 result, rounded once to bf16
            kernel = layers.float_rows if rows == "avx2" else layers.bf16_rows
            exact = kernel(x.reshape(-1, 96), plain.weight, plain.bias).to(BF16)
            assert torch.equal(got.reshape(-1, 40), exact)


@needs_avx2
def test_kernels_run_only_without_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "float_rows", lambda *a: calls.append(1) or F.linear(a[0], a[1].float(), a[2].float()))
    fast = layers.Fp32Linear.from_module(torch.nn.Linear(8, 4).to(BF16))
    fast(torch.randn(1, 8))  # the weight requires grad: differentiable path
    with torch.no_grad():
        fast(torch.randn(1, 8))
    assert len(calls) == 1


def features_and_ids(seconds: list[float]) -> dict[str, torch.Tensor]:
    features, frame_mask = extract_features([test_signal(s, seed=i + 3) for i, s in enumerate(seconds)])
    rows = [audio_prompt_ids([audio_token_count(int(f))], [[9707, 11], [3555, 374] * (i + 1)])
            for i, f in enumerate(frame_mask.sum(-1).tolist())]
    input_ids, attention_mask = left_pad(rows)  # two rows of different lengths: padding masks take part
    return dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                feature_attention_mask=frame_mask)


def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return generate(model, **inputs, options=GenerationOptions(max_new_tokens=10, ignore_eos=True))


@needs_avx2
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_avx2_generates_the_reference_tokens(plain, quantize):
    # The reference for "bf16 weights, fp32 arithmetic": the plain model holding the same bf16-rounded values in
    # fp32 (int8: the same int8 weights, scales widened). Only the summation order differs.
    inputs, model = features_and_ids([1.0, 2.0]), plain[quantize]
    reference = copy.deepcopy(model).float()
    prepare_for_cpu(model, "avx2")
    assert model.dtype == reference.dtype == torch.float32
    head = model.language_model.lm_head
    assert type(head) is (layers.Fp32Linear if quantize is None else layers.Int8CpuLinear)
    torch.testing.assert_close(greedy(model, inputs), greedy(reference, inputs), rtol=0, atol=0)


@pytest.mark.skipif(VNNI_MISSING is not None, reason=f"the VNNI kernel cannot run: {VNNI_MISSING}")
def test_vnni_generates_what_torchs_int8_kernel_generates(plain, monkeypatch):
    # In fp32 (bf16 rounds the two kernels' slightly different products apart on near-ties of this random model).
    inputs, model = features_and_ids([1.0, 2.0]), copy.deepcopy(plain["int8"]).float()
    prepare_for_cpu(model, "native")
    assert model.language_model.lm_head.isa == "avx512_vnni"
    fast = greedy(model, inputs)
    features = cpu.cpu_features()
    monkeypatch.setattr(cpu, "cpu_features", lambda: features - {"avx512_vnni", "avx2"})
    prepare_for_cpu(model, "native")
    assert model.language_model.lm_head.isa == "torch"
    torch.testing.assert_close(fast, greedy(model, inputs), rtol=0, atol=0)


@needs_avx2
def test_bf16_parity_with_the_avx2_path(tiny_checkpoint, plain):
    # test_model.test_bf16_agreement, its inputs and bounds against transformers in bf16, with fp32 arithmetic over
    # the bf16 weights; and that arithmetic is closer to transformers in fp32 than bf16 arithmetic is.
    features, frame_mask = extract_features([test_signal(3.0)])
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (7, 4)]
    ids = torch.tensor([audio_prompt_ids([audio_token_count(int(frame_mask.sum()))], texts)])
    hf_args = dict(input_ids=ids, input_features=features, feature_attention_mask=frame_mask)
    model = plain[None]
    with torch.no_grad():
        bf16 = load_hf(tiny_checkpoint, dtype=BF16)(**hf_args).logits.float()
        fp32 = load_hf(tiny_checkpoint)(**hf_args).logits
        bf16_arithmetic = model(ids, None, features, frame_mask).float()
        prepare_for_cpu(model, "avx2")
        ours = model(ids, None, features, frame_mask)
    top1 = (ours.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    diff = {name: (got - expected).abs().max().item()
            for name, got, expected in (("bf16", ours, bf16), ("fp32", ours, fp32), ("plain", bf16_arithmetic, fp32))}
    print(f"avx2: max|diff| {diff['bf16']:.4f} vs transformers bf16, top-1 {top1:.3f}; vs fp32 {diff['fp32']:.4f} "
          f"(bf16 arithmetic: {diff['plain']:.4f})")
    assert ours.dtype == torch.float32
    assert diff["bf16"] < 0.03 and top1 >= 0.97
    assert diff["fp32"] < diff["plain"]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_without_a_compiler_torch_runs_with_a_warning(plain, monkeypatch, quantize):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    inputs, model = features_and_ids([1.0]), plain[quantize]
    expected = greedy(model, inputs)  # the plain layers
    monkeypatch.setattr(extension, "_built", None)  # forget the module this process may have loaded
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu, "cpu_features", lambda: AVX2_ONLY)  # "auto" then asks for the AVX2 kernels
    with pytest.warns(UserWarning, match="CPU kernels are off.*pip install ninja"):
        assert prepare_for_cpu(model) == "native"
    head = model.language_model.lm_head
    if quantize:  # torch's int8 kernel for decoding, torch's dequantization for the prefill
        assert (type(head), head.isa, head.widen) == (layers.Int8CpuLinear, "torch", False)
    else:
        assert type(head) is layers.StreamingLinear and model.dtype == BF16
    torch.testing.assert_close(greedy(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.skipif(AVX2_MISSING is None, reason="this CPU runs the AVX2 kernels: nothing to fall back from")
def test_a_cpu_without_avx2_gets_native(tiny_checkpoint):
    assert prepare_for_cpu(qwen2audio.load(tiny_checkpoint, dtype=BF16, kernels="reference").model) == "native"


def test_load_leaves_modules_outside_our_model_alone(tiny_checkpoint):
    # Only our model's own layers are replaced: no class, function or module of torch's is changed.
    linear_forward, init_normal = torch.nn.Linear.forward, torch.nn.init.normal_
    mine = torch.nn.Linear(4, 3)
    kernels = "avx2" if AVX2_MISSING is None else "auto"
    qwen2audio.load(tiny_checkpoint, dtype=BF16, kernels=kernels, quiet=True)
    assert type(mine) is torch.nn.Linear and torch.nn.Linear.forward is linear_forward
    assert torch.nn.init.normal_ is init_normal
    x = torch.randn(2, 4)
    assert torch.equal(mine(x), x @ mine.weight.T + mine.bias)


def test_quantizing_a_prepared_model_then_preparing_again(tiny_checkpoint):
    model = qwen2audio.load(tiny_checkpoint, quiet=True).model
    quantize_int8(model)  # StreamingLinear layers are nn.Linear: they are quantized like plain ones
    assert type(model.language_model.lm_head) is Int8Linear
    prepare_for_cpu(model)
    assert type(model.language_model.lm_head) is layers.Int8CpuLinear
    restore_plain(model)
    assert type(model.language_model.lm_head) is Int8Linear


BF16_KERNEL_CPU = {"avx2", "fma3", "avx512_bw", "avx512_vl", "avx512_bf16"}  # Zen 4, Cooper Lake


@needs_avx2
@pytest.mark.parametrize("features, rows, limit", [({"avx2", "fma3", "avx512_bf16"}, "avx2", 8),
                                                   ({"avx2", "fma3"}, "avx2", 16),
                                                   (BF16_KERNEL_CPU, "avx512_bf16", 16),
                                                   (BF16_KERNEL_CPU | {"amx_bf16"}, "torch", 16)])
def test_native_streams_few_rows_where_torch_multiplies_bf16_in_hardware(tiny_checkpoint, monkeypatch, features,
                                                                         rows, limit):
    """"native" bf16 streams up to `limit` rows through the chosen kernel: the AVX512_BF16 one where the CPU has it
    (and no AMX: then torch's addmv), else the AVX2 one, which hands more than 8 rows to F.linear where the CPU has
    bf16 arithmetic (torch's product is faster there at 16 rows)."""
    model = qwen2audio.load_model(tiny_checkpoint, dtype="bfloat16", quiet=True)
    monkeypatch.setattr(cpu, "cpu_features", lambda: features)
    assert prepare_for_cpu(model, "native") == "native"
    layer = model.language_model.model.layers[0].mlp.down_proj
    assert isinstance(layer, layers.StreamingLinear) and (layer.rows, layer.max_rows) == (rows, limit)
    calls = []
    def kernel(x, w, b):
        calls.append(x.shape[0])
        return F.linear(x.float(), w.float())

    monkeypatch.setattr(layers, {"avx2": "float_rows", "avx512_bf16": "bf16_rows", "torch": "streamed_rows"}[rows],
                        kernel)
    with torch.no_grad():
        for n in (1, 3, 8, 9, 16, 17):
            layer(torch.randn(n, layer.in_features).to(BF16))
    assert calls == [n for n in (1, 3, 8, 9, 16, 17) if n <= limit]


@needs_avx2
@pytest.mark.parametrize("features, on", [(AVX2_ONLY, True), ({"avx2", "fma3", "avx512_bf16"}, True),
                                          ({"avx2", "fma3", "avx512_bf16", "amx_bf16"}, False)])
def test_decoding_attention_runs_in_the_kernel_and_generates_the_same(plain, monkeypatch, features, on):
    # Where the streaming kernel is chosen, decoding's attention reads the cache in the C++ kernel (fp32 inside);
    # with AMX, torch's paths stay. The tokens equal torch's SDPA's on the same fp32 model.
    inputs, model = features_and_ids([1.0, 2.0]), copy.deepcopy(plain[None]).float()
    reference = greedy(model, inputs)
    monkeypatch.setattr(cpu, "cpu_features", lambda: features)
    prepare_for_cpu(model, "native")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(a.cpu_kernel is on for a in attentions) and ("cpu_kernel=True" in repr(model)) is on
    rows = []
    def spy(q, k, v, mask, scale):
        rows.append(q.shape[2])
        return products.cached_attention(q, k, v, mask, scale)

    monkeypatch.setattr(decoder, "cached_attention", spy)
    torch.testing.assert_close(greedy(model, inputs), reference, rtol=0, atol=0)
    assert (rows and set(rows) == {1}) if on else not rows  # the decode steps: one query row each
    restore_plain(model)
    assert not any(a.cpu_kernel for a in attentions)
