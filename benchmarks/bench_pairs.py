"""Decoding speed of two of our variants, loaded in one process and timed in alternation: the ratio of each
adjacent pair, and their median.

    python benchmarks/bench_pairs.py [--variants avx2,int8-avx2] [--pairs 8] [--new-tokens 32] [--markdown]

run.py measures each variant in its own process, one after another: on a shared machine whose speed drifts by 20-40%
over minutes, a ratio of two of its rows can be off by as much. Here the two variants decode the same prompt (a 2 s
clip, batch 1) in turns, A B A B ..., so each pair meets the same machine; the median of the pairs' ratios is the
figure to read. Both models are in memory together (4 + 4 layers of the 7B's widths: 4.4 GB in bf16, 2.9 in int8).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import audio_prompts, build_checkpoint, machine, ours_generate, print_table  # noqa: E402
from worker import VARIANTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="avx2,int8-avx2", help="two of our variants (run.py's keys): A,B")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    keys = args.variants.split(",")
    if len(keys) != 2 or any(VARIANTS.get(k, (None, None))[1] != "ours" for k in keys):
        parser.error(f"--variants takes two of {', '.join(k for k, v in VARIANTS.items() if v[1] == 'ours')}, "
                     f"comma-separated; got {args.variants!r}")
    import qwen2audio

    folder = build_checkpoint(Path("/tmp/q2a-bench") / f"text{args.text_layers}-audio{args.audio_layers}-bfloat16",
                              args.text_layers, args.audio_layers)
    pipes = [qwen2audio.load(folder, quiet=True, **VARIANTS[k][2]) for k in keys]
    for pipe in pipes:
        pipe.wait_until_ready()  # the default load moves the weights into memory in the background: timed after
    inputs = audio_prompts([2.0])
    rates: list[list[float]] = [[], []]
    with torch.inference_mode():
        for pipe in pipes:
            ours_generate(pipe, inputs, 8)  # warm-up
        for _ in range(args.pairs):
            for pipe, column in zip(pipes, rates):
                column.append(ours_generate(pipe, inputs, args.new_tokens)[0]["decode_tok_s"])
    ratios = [b / a for a, b in zip(*rates)]
    rows = [[str(i + 1), f"{a:.2f}", f"{b:.2f}", f"{r:.2f}x"] for i, (a, b, r) in enumerate(zip(*rates, ratios))]
    rows.append(["median", f"{statistics.median(rates[0]):.2f}", f"{statistics.median(rates[1]):.2f}",
                 f"{statistics.median(ratios):.2f}x"])
    labels = [VARIANTS[k][0] for k in keys]
    print_table(f"Decode tokens/s at batch 1, {args.new_tokens} new tokens, in alternation; {machine()}",
                ["pair", labels[0], labels[1], "B / A"], rows, markdown=args.markdown)


if __name__ == "__main__":
    main()
