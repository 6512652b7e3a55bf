"""The second turn of a chat: time to its first token when the first turn's cache is reused, against prefilling
only its new tokens, and against recomputing the whole conversation (issue 17's target: at most the new tokens'
prefill + 10%).

    python benchmarks/bench_turns.py [--model DIR] [--text-layers 4] [--audio-layers 4] [--repeat 3]

Turn 1: the benchmark's prompt with a 10 s clip, 32 greedy tokens. Turn 2: turn 1's prompt, its reply and a new
user message (the chat template's tokens), through the same pipeline, which finds turn 1 in its idle cache and
prefills only what follows it. "New tokens' prefill" runs those tokens alone through generate.prefill on a fresh
cache: the same products, without attending to the turn-1 prefix, so it is a lower bound of the work the second
turn cannot avoid.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import audio_prompts, build_checkpoint, machine, print_table  # noqa: E402

# "<|im_end|>\n<|im_start|>user\nAnd what happens after that? Describe it.<|im_end|>\n<|im_start|>assistant\n"
TURN2 = [151645, 198, 151644, 872, 198, 3036, 1128, 8573, 1283, 429, 30, 60785, 432, 13, 151645, 198, 151644, 77091,
         198]


def first_token_s(pipe, inputs: dict, options) -> float:
    """Time to the first token; the stream runs to its end (pipe.last_stats is written there)."""
    start, first = time.perf_counter(), None
    for _ in pipe.generate_stream(**inputs, options=options):
        first = first or time.perf_counter() - start
    return first


def new_tokens_prefill_s(pipe, ids: torch.Tensor) -> float:
    from qwen2audio.generate import prefill

    model = pipe.model
    cache = model.new_cache(1, ids.shape[1] + 1)
    slot_mask = torch.ones(1, cache.max_seq_len, dtype=torch.long)
    start = time.perf_counter()
    prefill(model, ids, slot_mask, cache)
    return time.perf_counter() - start


def measure(pipe, repeat: int) -> dict[str, float]:
    turn1 = audio_prompts([10.0])
    options = pipe.options(max_new_tokens=32, do_sample=False, repetition_penalty=1.0, ignore_eos=True)
    runs = []
    for _ in range(repeat + 1):  # the first round warms up
        pipe.forget_prefixes()
        reply = torch.stack([t for t, _ in pipe.generate_stream(**turn1, options=options)], 1)  # (1, 32)
        new = torch.tensor([TURN2])
        turn2 = dict(turn1, input_ids=torch.cat([turn1["input_ids"], reply, new], 1))
        turn2["attention_mask"] = torch.ones_like(turn2["input_ids"])
        reused = first_token_s(pipe, turn2, options)
        cached = pipe.last_stats["cached_tokens"]
        new_ids = turn2["input_ids"][:, cached:]
        alone = new_tokens_prefill_s(pipe, new_ids)
        pipe.forget_prefixes()
        whole = first_token_s(pipe, turn2, options)
        runs.append(dict(reused=reused, alone=alone, whole=whole, new=new_ids.shape[1],
                         total=turn2["input_ids"].shape[1]))
    return {k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a bf16 Qwen2-Audio folder (default: build one)")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    import qwen2audio

    folder = args.model or build_checkpoint(Path("/tmp/q2a-bench") / f"text{args.text_layers}-audio"
                                            f"{args.audio_layers}-bfloat16", args.text_layers, args.audio_layers)
    pipe = qwen2audio.load(folder, kernels=args.kernels, quiet=True)
    pipe.wait_until_ready()
    with torch.inference_mode():
        r = measure(pipe, args.repeat)
    print_table(f"Second turn of a chat, {args.text_layers}+{args.audio_layers} layers of the 7B's widths, kernels="
                f"{args.kernels}, {machine()}, median of {args.repeat}",
                ["prompt tokens", "new tokens", "TTFT, cache reused s", "new tokens' prefill alone s", "ratio",
                 "TTFT, recomputed s"],
                [[str(r["total"]), str(r["new"]), f"{r['reused']:.3f}", f"{r['alone']:.3f}",
                  f"{r['reused'] / r['alone']:.2f}", f"{r['whole']:.3f}"]], args.markdown)


if __name__ == "__main__":
    main()
