"""One LoRA training step, ours vs transformers + peft, on a checkpoint of the 7B's widths with few layers.

    python benchmarks/bench_train.py [--layers 2] [--audio-layers 2] [--steps 5] [--markdown]
    python benchmarks/bench_train.py --precision [--precision-steps 10]

A step is forward + backward + AdamW: LoRA rank 8 (alpha 16) on the decoder's q/k/v/o, bf16 base weights with fp32
adapters (peft's default too), one 10 s clip (250 audio tokens) in a chat prompt and a 64-token answer whose tokens
(and <|im_end|>) are the labels. Speed: both implementations are loaded in one process (their weights map the
same files) and take one step of each variant (with and without gradient checkpointing) in turn, --steps turns
after a warm-up turn, so that the shared machine's slow spells hit all variants alike; the speed-up is the median
of the per-turn ratios, with their range. Memory: each variant alone in a process, its peak RSS (VmHWM) over one
step after a warm-up step, the weights included (both map the weight files and touch the same pages of them);
"in-step peak" is that peak less the RSS between steps (weights, adapters, optimizer state): the activations and
gradients of a step; "kept for backward" counts the tensors autograd saves during the forward (saved-tensor
hooks; the weights aside). --precision measures the loss over a few LoRA steps in fp32, in bf16 with fp32
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


def rss_gb(field: str = "VmHWM") -> float:
    """VmHWM: the peak resident set size since the last reset; VmRSS: the current one."""
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 2**20


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS (Linux)


def ours_model(folder: Path):
    import qwen2audio
    from qwen2audio.lora import LoraConfig, apply_lora, lora_targets

    # mmap=True maps the weight files, as transformers does, so that both processes' RSS counts the same weights:
    # the pages a step touches (an embedding row per token, every other weight in full).
    model = qwen2audio.load_model(folder, quiet=True, mmap=True)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(attention=True)))
    return model, lambda batch: model(**batch), model.set_gradient_checkpointing


def hf_model(folder: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).train()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS))

    def set_checkpointing(on: bool) -> None:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    return model, lambda batch: model(**batch).loss, set_checkpointing


def trainer(who: str, folder: Path):
    """(step(checkpointing) -> (loss, bytes saved for backward), trainable parameter count) for one implementation,
    with its own AdamW."""
    torch.manual_seed(0)
    model, loss_fn, set_checkpointing = (ours_model if who == "ours" else hf_model)(folder)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "adapters are expected in fp32 over bf16 weights"
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    weights = {p.data_ptr() for p in model.parameters()}
    batch = training_batch()

    def step(checkpointing: bool) -> tuple[float, int]:
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:  # every tensor autograd keeps for backward, weights aside
            nonlocal saved
            saved += 0 if t.data_ptr() in weights else t.numel() * t.element_size()
            return t

        set_checkpointing(checkpointing)
        optimizer.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        return loss.item(), saved
    return step, sum(p.numel() for p in params)


def memory_worker(args: argparse.Namespace) -> None:
    """One variant alone in this process: RSS between steps, the peak over one step after a warm-up step, and the
    bytes autograd kept for backward (with checkpointing, inside the recomputed layers nothing is kept)."""
    step, _ = trainer(args.worker, args.checkpoint)
    loss, _ = step(args.checkpointing)  # warm-up: oneDNN picks its kernels, the weights' pages come in
    between_gb = rss_gb("VmRSS")  # weights, adapters, optimizer state: what stays between steps
    reset_peak_rss()
    _, saved = step(args.checkpointing)
    print(json.dumps({"peak_gb": rss_gb(), "between_gb": between_gb, "saved_gb": saved / 2**30, "loss": loss}))


def memory(args: argparse.Namespace, who: str, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--worker", who, "--checkpoint", str(args.checkpoint)] + \
        ["--checkpointing"] * checkpointing
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{who} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternating_times(args: argparse.Namespace, variants: list[tuple[str, bool]]) -> dict:
    """Both implementations in this process (their weights map the same files), one step of each variant in turn,
    --steps turns after a warm-up turn: a slow spell of the shared machine then hits every variant alike.
    Returns {variant: [seconds per turn]}."""
    steps = {who: trainer(who, args.checkpoint)[0] for who in ("transformers", "ours")}
    for v in variants:  # warm-up turn
        steps[v[0]](v[1])
    times: dict = {v: [] for v in variants}
    for _ in range(args.steps):
        for v in variants:
            start = time.perf_counter()
            steps[v[0]](v[1])
            times[v].append(time.perf_counter() - start)
    return times


def main_table(args: argparse.Namespace) -> None:
    variants = [(who, ckpt) for ckpt in (False, True) for who in ("transformers", "ours")]
    mem = {v: memory(args, *v) for v in variants}
    times = alternating_times(args, variants)
    rows = []
    for who, ckpt in variants:
        ref, t = times[("transformers", ckpt)], times[(who, ckpt)]
        ratios = sorted(r / o for r, o in zip(ref, t))  # per turn: adjacent steps, the same spell of the machine
        m, m_ref = mem[(who, ckpt)], mem[("transformers", ckpt)]
        rows.append([f"{'transformers + peft' if who == 'transformers' else 'ours'}{', checkpointing' * ckpt}",
                     f"{statistics.median(t):.2f}", f"{min(t):.2f}-{max(t):.2f}",
                     f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                     f"{m['peak_gb']:.2f}", f"{m['peak_gb'] - m['between_gb']:.2f}", f"{m['saved_gb']:.3f}",
                     f"{m['peak_gb'] / m_ref['peak_gb']:.2f}", f"{m['loss']:.4f}"])
    print_table(f"One LoRA training step (r 8 on q/k/v/o, AdamW), {args.layers} decoder + {args.audio_layers} encoder "
                f"layers of the 7B's widths, bf16 weights + fp32 adapters, {SECONDS:g} s clip + {ANSWER_TOKENS}-token "
                f"answer; {args.steps} turns; {date.today()}, {machine()}",
                ["variant", "step s (median)", "step s (range)", "speed-up (median, range)", "peak RSS GB",
                 "in-step peak GB", "kept for backward GB", "peak / transformers'", "first loss"], rows, args.markdown)


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
    parser.add_argument("--steps", type=int, default=5, help="timed turns (one step of each variant per turn)")
    parser.add_argument("--precision", action="store_true", help="measure the loss in three precisions instead")
    parser.add_argument("--precision-steps", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return memory_worker(args)
    if args.checkpoint is None:
        folder = Path(f"/tmp/q2a-bench-train-{args.layers}-{args.audio_layers}")
        args.checkpoint = build_checkpoint(folder, args.layers, args.audio_layers)
    precision_losses(args) if args.precision else main_table(args)


if __name__ == "__main__":
    main()
