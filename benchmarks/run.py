"""All the speed and memory figures in one run: our variants against transformers, on a checkpoint of the 7B's
widths, each variant in its own process (worker.py).

    python benchmarks/run.py [--device cpu|cuda] [--model DIR] [--text-layers N] [--audio-layers N]
                             [--variants KEY,...] [--new-tokens 32] [--repeat 3] [--rounds 1] [--skip-batch]
                             [--skip-frontend] [--markdown] [--json FILE]

Without --model, a random checkpoint with the 7B's widths (hidden 4096, 32 heads, MLP 11008, vocabulary 156032;
encoder d_model 1280) is built once under /tmp/q2a-bench and reused: 4 decoder + 4 encoder layers on CPU, the
whole 7B (32 + 32) on CUDA.

CPU variants: transformers in bf16 and fp32; ours in bf16 with the CPU kernels chosen from the CPU ("auto"), and
forced to the AVX2 path (kernels="avx2": bf16 weights, fp32 arithmetic; left out where auto already picks it),
compiled, int8 (both kernel paths), and with mmap=True. CUDA variants (--device cuda): transformers bf16; ours
bf16 eager, compiled (CUDA graphs), int8 compiled.

Measured per variant: load time and peak memory; the first answer after load; the log-mel of a 10 s clip and the
encoder on 2, 10 and 30 s (transformers' bf16 and fp32, our bf16 paths); greedy generation of exactly --new-tokens
tokens (eos ignored) from the same hand-built prompts: time to first token with a 10 s clip at batch 1, decode
tokens/s at batch 1 and at batch 8 (eight clips of different lengths, left-padded). Each generation runs once to
warm up (this compiles the compiled variants' decode step, timed apart), then --repeat times; medians. Decode
bandwidth = bytes of decoder weights one step reads x tokens/s at batch 1, against this machine's copy bandwidth.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build_checkpoint, copy_bandwidth_gbs, machine  # noqa: E402
from report import (cpu_targets, frontend_table, generation_table, gpu_targets, load_table,  # noqa: E402
                    work_table)
from worker import VARIANTS  # noqa: E402

BENCH_DIR = Path("/tmp/q2a-bench")
CPU_VARIANTS = ["hf-bf16", "hf-fp32", "bf16", "avx2", "compile", "int8", "int8-avx2", "mmap"]
CUDA_VARIANTS = ["hf-bf16", "bf16", "compile", "int8-compile"]
FRONTEND = {"hf-bf16", "hf-fp32", "bf16", "avx2"}


def spawn(key: str, folder: Path, out: Path, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), "--variant", key, "--model", str(folder),
           "--out", str(out), "--device", args.device, "--new-tokens", str(args.new_tokens),
           "--repeat", str(args.repeat)]
    cmd += ["--frontend"] if key in FRONTEND and not args.skip_frontend else []
    cmd += ["--skip-batch"] if args.skip_batch else []
    print(f"running {VARIANTS[key][0]} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode != 0:
        print(f"{VARIANTS[key][0]} failed (exit {done.returncode}); left out of the tables", file=sys.stderr)
        return None
    result = json.loads(out.read_text())
    result["saved"] = torch.load(out.with_suffix(".pt"))
    return result


def best_of(runs: list[dict]) -> dict:
    """One variant's rounds merged: the shortest times and the highest tokens/s (on a shared machine the noise
    only ever slows a run down), the largest peak memory; tokens and logits from the first round."""
    merged = json.loads(json.dumps({k: v for k, v in runs[0].items() if k != "saved"}))
    merged["saved"], merged["rounds"] = runs[0]["saved"], len(runs)
    for r in runs[1:]:
        for key in ("load_s", "first_ttft_s", "logmel_s"):
            if key in r:
                merged[key] = min(merged[key], r[key])
        for key in ("rss_after_load_gb", "rss_peak_gb", "gpu_peak_gb"):
            if key in r:
                merged[key] = max(merged[key], r[key])
        for key in ("encoder_s", "compile_s"):
            for k, v in r.get(key, {}).items():
                merged[key][k] = min(merged[key][k], v)
        for name in ("b1", "b8"):
            if name in r:
                merged[name]["ttft_s"] = min(merged[name]["ttft_s"], r[name]["ttft_s"])
                merged[name]["decode_tok_s"] = max(merged[name]["decode_tok_s"], r[name]["decode_tok_s"])
    return merged


def variants(args: argparse.Namespace) -> list[str]:
    if args.variants:
        return args.variants.split(",")
    if args.device == "cuda":
        return CUDA_VARIANTS
    from qwen2audio.kernels.cpu import choose_kernels, cpu_features

    auto = choose_kernels("auto", cpu_features(), torch.bfloat16)[0]  # forced avx2 only where it differs
    return [k for k in CPU_VARIANTS if not (auto == "avx2" and k in ("avx2", "int8-avx2"))]


def measure(keys: list[str], folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="q2a-run-") as tmp:
        for round_ in range(args.rounds):  # the variants take turns, so a slow spell of the machine hits all
            for key in keys:
                if (r := spawn(key, folder, Path(tmp) / f"{key}-{round_}.json", args)) is not None:
                    rounds.setdefault(key, []).append(r)
    return {key: best_of(runs) for key, runs in rounds.items()}


def check_device(device: str) -> None:
    """A sentence, not a traceback, where the device cannot run."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device cuda needs an NVIDIA GPU and a CUDA build of torch; this torch "
                 f"({torch.__version__}) sees no GPU here. Run without --device for the CPU benchmarks.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="a bf16 Qwen2-Audio folder (default: build one)")
    parser.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: cpu 4, cuda 32)")
    parser.add_argument("--audio-layers", type=int, default=None, help="encoder layers (default: cpu 4, cuda 32)")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, in turns; best")
    parser.add_argument("--skip-batch", action="store_true", help="leave out batch 8")
    parser.add_argument("--skip-frontend", action="store_true", help="leave out the log-mel and encoder timings")
    parser.add_argument("--markdown", action="store_true", help="print the tables ready to paste")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = parser.parse_args()
    check_device(args.device)
    unknown = [k for k in (args.variants or "").split(",") if k and k not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    start = time.perf_counter()
    folder = args.model or build(args)
    copy_gbs = copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth {copy_gbs:.1f} GB/s (read + write, {args.device})", file=sys.stderr, flush=True)
    results = measure(variants(args), Path(folder), args)
    if not results:
        sys.exit("error: every variant failed (see above)")
    if args.json:  # first, so that the measurements outlive a failure below
        plain = {k: {f: v for f, v in r.items() if f != "saved"} for k, r in results.items()}
        args.json.write_text(json.dumps({"copy_bandwidth_gbs": copy_gbs, "model": str(folder), "results": plain},
                                        indent=1))
    report(results, args, Path(folder), copy_gbs)
    print(f"\n(total {time.perf_counter() - start:.0f} s)", file=sys.stderr)


def build(args: argparse.Namespace) -> Path:
    layers = 32 if args.device == "cuda" else 4
    text, audio = args.text_layers or layers, args.audio_layers or layers
    print(f"building (or reusing) a checkpoint under {BENCH_DIR} ...", file=sys.stderr, flush=True)
    return build_checkpoint(BENCH_DIR / f"text{text}-audio{audio}-bfloat16", text, audio)


def report(results: dict, args: argparse.Namespace, folder: Path, copy_gbs: float) -> None:
    config = json.loads((folder / "config.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    where = torch.cuda.get_device_name() if args.device == "cuda" else machine()
    rounds = min(r["rounds"] for r in results.values())
    print(f"\n{'#### ' if args.markdown else ''}Qwen2-Audio benchmarks: {config['text_config']['num_hidden_layers']} "
          f"decoder + {config['audio_config']['encoder_layers']} encoder layers of the 7B's widths, bf16 checkpoint "
          f"{size:.2f} GB, {date.today()}, {where}" + (f", best of {rounds} rounds" if rounds > 1 else ""))
    load_table(results, args.markdown)
    frontend_table(results, args.markdown)
    bound = work_table(results, folder, args.markdown)
    summary = generation_table(results, args.new_tokens, copy_gbs, args.markdown)
    if args.device == "cuda":
        gpu_targets(summary, args.markdown)
    else:
        cpu_targets(summary, results, bound, args.markdown)


if __name__ == "__main__":
    main()
