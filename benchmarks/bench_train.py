"""One LoRA training step, ours vs transformers + peft, on a checkpoint of the 7B's widths with few layers.

    python benchmarks/bench_train.py [--layers 2] [--audio-layers 2] [--steps 3] [--rounds 2] [--markdown]
    python benchmarks/bench_train.py --precision [--precision-steps 10]

A step is forward + backward + AdamW: LoRA rank 8 (alpha 16) on the decoder's q/k/v/o, bf16 base weights with fp32
adapters (peft's default too), one 10 s clip (250 audio tokens) in a chat prompt and a 64-token answer whose tokens
(and <|im_end|>) are the labels. Each variant runs in its own process, with and without gradient checkpointing;
its peak memory is the process's peak RSS (VmHWM) over the timed steps, the weights included (both map the weight
files and touch the same pages of them), and the median step time of --steps steps after one warm-up step. --rounds repeats all variants in turns (the machine is shared: the
spread between rounds is printed). --precision measures the loss over a few LoRA steps in fp32, in bf16 with fp32
adapters and under bf16 autocast over fp32 weights (ours), from the same initial adapter.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPT_PREFIX, PROMPT_SUFFIX, build_checkpoint, machine, print_table, signal  # noqa: E402

ANSWER_TOKENS = 64
SECONDS = 10.0
IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = 151645, 151646, 151647, 151648
HF_TARGETS = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def training_batch() -> dict[str, torch.Tensor]:
    """Prompt (chat template around one 10 s clip), then a 64-token answer + <|im_end|>; only the answer counts."""
    from qwen2audio.features import audio_token_count, extract_features

    features, frame_mask = extract_features([signal(SECONDS)])
    answer = torch.randint(0, 150000, (ANSWER_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = PROMPT_PREFIX + [AUDIO_BOS] + [AUDIO_TOKEN] * audio_token_count(int(frame_mask.sum())) + [AUDIO_EOS] + \
        PROMPT_SUFFIX
    ids = torch.tensor([prompt + answer + [IM_END]])
    labels = torch.tensor([[-100] * len(prompt) + answer + [IM_END]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": features,
            "feature_attention_mask": frame_mask, "labels": labels}


def peak_rss_gb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS (Linux)


def ours_model(folder: Path, checkpointing: bool):
    import qwen2audio
    from qwen2audio.lora import LoraConfig, apply_lora, lora_targets

    # mmap=True maps the weight files, as transformers does, so that both processes' RSS counts the same weights:
    # the pages a step touches (an embedding row per token, every other weight in full).
    model = qwen2audio.load_model(folder, quiet=True, mmap=True)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(attention=True)))
    model.set_gradient_checkpointing(checkpointing)
    return model, lambda batch: model(**batch)


def hf_model(folder: Path, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).train()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lambda batch: model(**batch).loss


def run_worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, loss_fn = (ours_model if args.worker == "ours" else hf_model)(args.checkpoint, args.checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "adapters are expected in fp32 over bf16 weights"
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = training_batch()
    loaded_gb = peak_rss_gb()

    def step() -> float:
        optimizer.zero_grad()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = step()  # warm-up (oneDNN picks its kernels on first use)
    reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times), "peak_gb": peak_rss_gb(), "loaded_gb": loaded_gb,
                      "first_loss": first_loss, "tokens": batch["input_ids"].shape[1],
                      "trainable": sum(p.numel() for p in params)}))


def run_variant(args: argparse.Namespace, who: str, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--worker", who, "--checkpoint", str(args.checkpoint), "--steps",
               str(args.steps)] + ["--checkpointing"] * checkpointing
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{who} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_table(args: argparse.Namespace) -> None:
    variants = [(who, ckpt) for ckpt in (False, True) for who in ("transformers", "ours")]
    rounds = [{v: run_variant(args, *v) for v in variants} for _ in range(args.rounds)]
    rows = []
    for who, ckpt in variants:
        runs = [r[(who, ckpt)] for r in rounds]
        best = min(runs, key=lambda r: r["step_s"])
        ref = min((r[("transformers", ckpt)] for r in rounds), key=lambda r: r["step_s"])
        spread = ", ".join(f"{r['step_s']:.2f}" for r in runs)
        rows.append([f"{'transformers + peft' if who == 'transformers' else 'ours'}"
                     f"{', checkpointing' if ckpt else ''}", f"{best['step_s']:.2f}", spread,
                     f"{ref['step_s'] / best['step_s']:.2f}x", f"{best['peak_gb']:.2f}",
                     f"{best['peak_gb'] - best['loaded_gb']:+.2f}", f"{best['peak_gb'] / ref['peak_gb']:.2f}",
                     f"{best['first_loss']:.4f}"])
    tokens = rounds[0][variants[0]]["tokens"]
    print_table(f"One LoRA training step (r 8 on q/k/v/o, AdamW), {args.layers} decoder + {args.audio_layers} encoder "
                f"layers of the 7B's widths, bf16 weights + fp32 adapters, {SECONDS:g} s clip + {ANSWER_TOKENS}-token "
                f"answer ({tokens} tokens), {date.today()}, {machine()}",
                ["variant", "step s (best)", "step s, each round", "speed-up", "peak RSS GB", "peak - after load GB",
                 "peak / transformers'", "loss"], rows, args.markdown)


def precision_losses(args: argparse.Namespace) -> None:
    """The same LoRA run (same adapter init, same batch) in three precisions; the loss at each step."""
    import qwen2audio
    from qwen2audio.lora import LoraConfig, apply_lora

    batch = training_batch()
    runs = {}
    for name, dtype, autocast in [("fp32", torch.float32, False), ("bf16 weights, fp32 LoRA", torch.bfloat16, False),
                                  ("bf16 autocast, fp32 weights", torch.float32, True)]:
        model = qwen2audio.load_model(args.checkpoint, dtype=dtype, quiet=True)
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(r=8, lora_alpha=16))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(args.precision_steps):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs[name] = losses
        del model, optimizer
    reference = runs["fp32"]
    rows = [[name, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{losses[0] - losses[-1]:.4f}",
             f"{max(abs(a - b) for a, b in zip(losses, reference)):.4f}"] for name, losses in runs.items()]
    print_table(f"LoRA (r 8, q/k/v/o, lr 1e-3) for {args.precision_steps} steps on one example, three precisions, "
                f"same initial adapter; {date.today()}, {machine()}",
                ["precision", "loss step 1", f"loss step {args.precision_steps}", "drop",
                 "max |loss - fp32 loss| over the steps"], rows, args.markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--audio-layers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a bf16 model folder (default: build one)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times, in turns")
    parser.add_argument("--precision", action="store_true", help="measure the loss in three precisions instead")
    parser.add_argument("--precision-steps", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.worker:
        return run_worker(args)
    if args.checkpoint is None:
        folder = Path(f"/tmp/q2a-bench-train-{args.layers}-{args.audio_layers}")
        args.checkpoint = build_checkpoint(folder, args.layers, args.audio_layers)
    precision_losses(args) if args.precision else main_table(args)


if __name__ == "__main__":
    main()
