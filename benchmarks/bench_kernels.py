"""The CPU kernels alone, at the 7B's shapes, against torch's own operations and this machine's copy bandwidth.

    python benchmarks/bench_kernels.py [--repeat 5]

Decoding (a few rows times a weight) is bound by reading the weight: reported as GB/s of weights read and as % of
the copy bandwidth (a 1 GiB copy_, read + write). The weights cycle through 4 matrices of the MLP's shape
(11008 x 4096, 90 MB each in bf16), so that they come from memory, not from the 32 MB cache. Prefill (283 rows) is
bound by arithmetic: GFLOP/s. Decoding's attention reads the key / value cache once per query row: GB/s. Each
figure is the best of --repeat runs (noise on a shared machine only slows).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, copy_bandwidth_gbs, machine, print_table  # noqa: E402

from qwen2audio.kernels.cpu import cpu_features  # noqa: E402
from qwen2audio.kernels.extension import cpu_extension  # noqa: E402
from qwen2audio.kernels.products import skinny_product, widened_product  # noqa: E402

OUT, IN, PROMPT = 11008, 4096, 283


def best(fn, repeat: int) -> float:
    """The shortest of `repeat` timed calls after one warm-up call."""
    return best_time(fn, repeat, warmup=1, reduce=min)


def decode_rows(repeat: int, copy_gbs: float) -> list[list[str]]:
    ext, features = cpu_extension(), cpu_features()
    bf16 = [torch.randn(OUT, IN).bfloat16() for _ in range(4)]
    int8 = [torch.randint(-127, 128, (OUT, IN), dtype=torch.int8) for _ in range(4)]
    scales = torch.rand(OUT)
    rows = []
    for n in (1, 8):
        x = torch.randn(n, IN)
        cases = [("bf16, torch addmv/addmm (native)", bf16, lambda w: skinny_product(x.bfloat16(), w, None)),
                 ("bf16, torch F.linear", bf16, lambda w: torch.nn.functional.linear(x.bfloat16(), w)),
                 ("bf16 -> fp32 in registers, AVX2 (avx2)", bf16, lambda w: ext.float_linear_avx2(x, w, None)),
                 ("int8, torch _weight_int8pack_mm", int8, lambda w: torch._weight_int8pack_mm(x, w, scales)),
                 ("int8, AVX2 kernel", int8, lambda w: ext.int8_linear(x, w, scales, "avx2"))]
        if {"avx512_bf16", "avx512_bw", "avx512_vl"} <= features:
            cases.insert(3, ("bf16 pairs, AVX512_BF16 kernel (native)", bf16,
                             lambda w: ext.bf16_linear_avx512(x.bfloat16(), w, None)))
        if {"avx512_vnni", "avx512_bw", "avx512_vl"} <= features:
            cases.append(("int8, AVX-512 VNNI kernel", int8, lambda w: ext.int8_linear(x, w, scales, "avx512_vnni")))
        for name, weights, fn in cases:
            seconds = best(lambda: [fn(w) for w in weights], repeat) / len(weights)
            gbs = weights[0].numel() * weights[0].element_size() / seconds / 1e9
            rows.append([f"{n}", name, f"{seconds * 1e3:.2f}", f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%",
                         f"{weights[0].numel() / seconds / 1e9:.2f}"])
    return rows


def prefill_rows(repeat: int) -> list[list[str]]:
    ext = cpu_extension()
    w = torch.randn(OUT, IN).bfloat16()
    x = torch.randn(PROMPT, IN)
    wide, q = w.float(), torch.randint(-127, 128, (OUT, IN), dtype=torch.int8)
    flop = 2 * PROMPT * IN * OUT
    cases = [("bf16 GEMM, torch (native)", lambda: torch.mm(x.bfloat16(), w.T)),
             ("fp32 GEMM on a weight already fp32", lambda: torch.mm(x, wide.T)),
             ("bf16 -> fp32 with Tensor.float(), then fp32 GEMM", lambda: torch.mm(x, w.float().T)),
             ("bf16 widened in blocks, fp32 GEMM (avx2)", lambda: widened_product(x, w, torch.float32)),
             ("int8 dequantized by torch, bf16 GEMM (before)", lambda: torch.mm(x.bfloat16(), q.bfloat16().T)),
             ("int8 widened in blocks, bf16 GEMM (native)", lambda: widened_product(x, q, torch.bfloat16)),
             ("int8 widened in blocks, fp32 GEMM (avx2)", lambda: widened_product(x, q, torch.float32))]
    rows = [[name, f"{(s := best(fn, repeat)) * 1e3:.0f}", f"{flop / s / 1e9:.0f}"] for name, fn in cases]
    widen = best(lambda: ext.widen(w, wide), repeat)
    rows.append(["(widen bf16 -> fp32 alone, C++)", f"{widen * 1e3:.1f}", f"{w.numel() / widen / 1e9:.2f} G el/s"])
    convert = best(lambda: w.float(), repeat)
    rows.append(["(Tensor.float() alone)", f"{convert * 1e3:.1f}", f"{w.numel() / convert / 1e9:.2f} G el/s"])
    return rows


def attention_rows(repeat: int, copy_gbs: float) -> list[list[str]]:
    """Decoding's attention: one query row per sequence over S cached positions of the 7B's 32 heads x 128, bf16
    (the cache of "native") and fp32 (that of "avx2"); GB/s of keys and values read."""
    ext, rows = cpu_extension(), []
    for batch, S, dtype in [(1, 300, torch.bfloat16), (1, 1200, torch.bfloat16), (8, 300, torch.bfloat16),
                            (8, 1200, torch.bfloat16), (1, 1200, torch.float32), (8, 1200, torch.float32)]:
        q = torch.randn(batch, 32, 1, 128).to(dtype)
        k, v = (torch.randn(batch, 32, S, 128).to(dtype) for _ in range(2))
        mask = torch.ones(batch, 1, 1, S, dtype=torch.bool)
        cases = [("torch scaled_dot_product_attention",
                  lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                 ("C++ kernel (fp32 inside)", lambda: ext.attend(q, k, v, mask, 128 ** -0.5))]
        for name, fn in cases:
            seconds = best(fn, repeat)
            gbs = 2 * k.numel() * k.element_size() / seconds / 1e9
            rows.append([f"{batch}", f"{S}", str(dtype).removeprefix("torch."), name, f"{seconds * 1e3:.2f}",
                         f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if cpu_extension() is None:
        sys.exit("the CPU kernels could not be built here (see the warning): nothing to measure")
    copy_gbs = copy_bandwidth_gbs(repeat=args.repeat)
    print(f"{machine()}; copy bandwidth {copy_gbs:.1f} GB/s (read + write)")
    print_table(f"Decoding: rows x ({OUT}, {IN}) weight", ["rows", "product", "ms", "GB/s of weights",
                                                           "% of copy", "G weights/s"],
                decode_rows(args.repeat, copy_gbs), args.markdown)
    print_table(f"Prefill: ({PROMPT}, {IN}) x ({OUT}, {IN}).T", ["product", "ms", "GFLOP/s"],
                prefill_rows(args.repeat), args.markdown)
    print_table("Decoding attention: one query row per sequence, 32 heads x 128", ["batch", "cached positions",
                "cache dtype", "attention", "ms", "GB/s of keys + values", "% of copy"],
                attention_rows(args.repeat, copy_gbs), args.markdown)


if __name__ == "__main__":
    main()
