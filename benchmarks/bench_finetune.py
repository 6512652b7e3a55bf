"""`qwen2audio finetune` step time and peak memory, on the tests' tiny config and on a mid-size one.

    python benchmarks/bench_finetune.py [--config tiny|mid|both] [--steps 6] [--markdown]

tiny: the tests' random tiny checkpoint (2 + 2 layers of width 64 / 32, the real 151936-token vocabulary), 0.5 s
clips and short answers, batch 2. mid: 2 decoder + 2 encoder layers of the 7B's widths (vocabulary 156032), bf16,
a 10 s clip and a ~60-token answer per example, batch 1; LoRA only (full fine-tuning of its 1.3 B parameters in
fp32 with AdamW needs ~21 GB). Each variant runs in a process of its own (torchrun variants: 2 processes). Threads:
tiny runs on one thread per process (its small products cost more in thread synchronisation than they gain:
~2 s a step on two threads against ~0.1 s on one, on the 2-core machine under load); mid on all cores, split
between the processes; step time is the median of the steps after the first, from OUT/log.jsonl; peak memory is the
process's peak RSS (ru_maxrss; the largest over the ranks), weights, optimizer state and activations included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny checkpoint and tokenizer builders of the tests
from common import build_checkpoint, machine, print_table, signal  # noqa: E402
from helpers import free_port  # noqa: E402

WORDS = ("glass breaks on a stone floor while a dog barks twice in the distance and rain falls on the roof of "
         "an old wooden house near the sea").split()

VARIANTS = {  # name -> (configs, processes, finetune options)
    "LoRA r8": (("tiny", "mid"), 1, {}),
    "LoRA r8, checkpointing": (("tiny", "mid"), 1, {"gradient_checkpointing": True}),
    "full": (("tiny",), 1, {"full": True}),
    "LoRA r8, torchrun x2 (DDP)": (("tiny",), 2, {}),
    "full, torchrun x2 (FSDP2)": (("tiny",), 2, {"full": True}),
}
SETUP = {"tiny": dict(seconds=0.5, answer_words=4, batch_size=2), "mid": dict(seconds=10.0, answer_words=45,
                                                                               batch_size=1)}


def model_folder(config: str, root: Path) -> Path:
    from tokenizer_fixture import write_tokenizer_files

    folder = root / f"model-{config}"
    if config == "tiny":
        from helpers import save_tiny_checkpoint

        if not (folder / "config.json").is_file():
            save_tiny_checkpoint(folder)
    else:
        build_checkpoint(folder, text_layers=2, audio_layers=2)
    return write_tokenizer_files(folder)


def data_file(config: str, root: Path, n: int) -> Path:
    from helpers import write_wav

    spec = SETUP[config]
    (root / "clips").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        clip = root / "clips" / f"{config}-{i}.wav"
        write_wav(clip, signal(spec["seconds"], seed=i))
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(spec["answer_words"])).capitalize() + "."
        lines.append({"messages": [{"role": "user", "content": [{"type": "audio", "audio_url": str(clip)},
                                                                {"type": "text", "text": "What's that sound?"}]},
                                   {"role": "assistant", "content": answer}]})
    path = root / f"train-{config}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def worker(args: argparse.Namespace) -> None:
    """One variant in this process (or this rank): finetune() with --steps steps."""
    from qwen2audio.finetune import finetune

    options = json.loads(args.worker)
    finetune(**options)


def run_variant(config: str, name: str, root: Path, steps: int) -> dict:
    _, processes, extra = VARIANTS[name]
    spec = SETUP[config]
    out = root / f"out-{config}-{name.replace(' ', '_').replace(',', '')}"
    options = dict(model=str(model_folder(config, root)), out=str(out), max_steps=steps, grad_accum=1,
                   batch_size=spec["batch_size"] // processes, warmup_steps=1, quiet=True, **extra,
                   data=str(data_file(config, root, steps * spec["batch_size"])))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                     "127.0.0.1", "--master_port", str(free_port())]
    threads = 1 if config == "tiny" else max(1, torch.get_num_threads() // processes)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, __file__, "--worker", json.dumps(options)], check=True, env=env,
                   stderr=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    step_s = statistics.median(r["step_s"] for r in log[1:])
    return {"step_s": step_s, "tokens_per_step": statistics.median(r["tokens"] for r in log),
            "peak_gb": summary["peak_memory_gb"], "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["tiny", "mid", "both"], default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--root", help="keep the checkpoints and data here (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_finetune-"))
    root.mkdir(parents=True, exist_ok=True)
    configs = ["tiny", "mid"] if args.config == "both" else [args.config]
    rows = []
    for config in configs:
        for name, (allowed, processes, _) in VARIANTS.items():
            if config in allowed:
                r = run_variant(config, name, root, args.steps)
                rows.append([config, name, f"{r['tokens_per_step']:.0f}", f"{r['step_s']:.3f}",
                             f"{r['tokens_per_step'] / r['step_s']:.0f}", f"{r['peak_gb']:.2f}",
                             f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"])
    print_table(f"qwen2audio finetune, {args.steps} steps ({machine()})",
                ["config", "variant", "tokens/step", "step s", "tokens/s", "peak RSS GiB", "loss"], rows,
                args.markdown)


if __name__ == "__main__":
    main()
