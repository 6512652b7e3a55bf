"""Time to first token and decode tokens/s, ours vs transformers, in one run on a checkpoint of the 7B's widths.

    python benchmarks/bench_generate.py [--layers 2] [--audio-layers 2] [--new-tokens 32] [--repeat 3]
                                        [--seconds 10] [--checkpoint DIR] [--markdown]

Batch 1, bf16, greedy, exactly --new-tokens new tokens for both (eos ignored): the same hand-built prompt (text,
<|audio_bos|> N x <|AUDIO|> <|audio_eos|>, text) and the same log-mel features. Time to first token runs from the
call to the first token (encoder + prefill + first pick); decode tokens/s counts the steps after it. The models
are loaded one after the other in this process (never both at once). The first run of each is a warm-up, which
also records its tokens and first-step logits for the agreement check; then the median of --repeat runs.
"""

import argparse
import gc
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (audio_prompts, build_checkpoint, hf_generate, leading_agreement, machine,  # noqa: E402
                    ours_generate, print_table)

import qwen2audio  # noqa: E402
from qwen2audio.config import Qwen2AudioConfig  # noqa: E402

BENCH_DIR = Path("/tmp/q2a-bench")


def measure(generate, model, inputs: dict[str, torch.Tensor], new_tokens: int, repeat: int):
    """Warm-up run (tokens and first-step logits kept), then the median timings of `repeat` runs."""
    _, tokens, logits = generate(model, inputs, new_tokens, capture_logits=True)
    runs = [generate(model, inputs, new_tokens)[0] for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, tokens, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the random checkpoint")
    parser.add_argument("--audio-layers", type=int, default=2, help="encoder layers of the random checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"a bf16 model folder to use as it is (default: build or reuse one under {BENCH_DIR})")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--markdown", action="store_true", help="print the table ready to paste into benchmarks/README.md")
    args = parser.parse_args()
    from transformers import Qwen2AudioForConditionalGeneration

    folder = args.checkpoint
    if folder is None:
        folder = build_checkpoint(BENCH_DIR / f"text{args.layers}-audio{args.audio_layers}-bfloat16",
                                  text_layers=args.layers, audio_layers=args.audio_layers)
    inputs = audio_prompts([args.seconds])
    n = args.new_tokens

    pipe = qwen2audio.load(folder, dtype=torch.bfloat16, quiet=True)
    ours, ours_tokens, ours_logits = measure(ours_generate, pipe, inputs, n, args.repeat)
    del pipe
    gc.collect()
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref, ref_tokens, ref_logits = measure(hf_generate, hf, inputs, n, args.repeat)
    del hf
    gc.collect()

    diff = (ours_logits - ref_logits).abs().max().item()
    same = leading_agreement(ours_tokens, ref_tokens)[0]
    rows = [["time to first token (s)", f"{ref['ttft_s']:.3f}", f"{ours['ttft_s']:.3f}",
             f"{ref['ttft_s'] / ours['ttft_s']:.2f}x"],
            ["decode tokens/s", f"{ref['decode_tok_s']:.2f}", f"{ours['decode_tok_s']:.2f}",
             f"{ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x"]]
    layers = Qwen2AudioConfig.from_file(folder).text_config.num_hidden_layers
    print_table(f"Generation, batch 1, bf16, {args.seconds:g} s clip ({inputs['input_ids'].shape[1]} prompt tokens), "
                f"{n} new tokens, {layers} decoder layers of the 7B's widths, {date.today()}, {machine()}",
                ["", "transformers", "ours", "speed-up"], rows, markdown=args.markdown)
    print(f"\nfirst-step logits max |diff| {diff:.3g}; identical leading tokens {same} / {n}"
          + ("" if same == n else " (bf16 rounding differs between the two; greedy paths part after a near tie)"))


if __name__ == "__main__":
    main()
