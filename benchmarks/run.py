"""All the speed and memory figures in one run: ours (bf16 eager, bf16 compiled, int8, bf16 with mmap=True) against
transformers (bf16).

    python benchmarks/run.py [--model DIR] [--text-layers 4] [--audio-layers 4] [--new-tokens 32] [--repeat 3]
                             [--rounds 1] [--skip-compile] [--skip-int8] [--skip-mmap] [--skip-batch] [--markdown]
                             [--json FILE]

Without --model, a random checkpoint with the 7B's widths (hidden 4096, 32 heads, MLP 11008, vocabulary 156032;
encoder d_model 1280) and fewer layers is built once under /tmp/q2a-bench and reused. Each implementation runs in
its own process (`run.py --worker ours|transformers --variant bf16|compile|int8 ...`, which writes JSON), so the
two models are never in memory together and each peak RSS is its own.

Measured per variant: load time; peak RSS (ru_maxrss) after load and at the end, against the weights' size; the
log-mel of a 10 s clip (ours `extract_features`, transformers' `WhisperFeatureExtractor`); the audio encoder on
2 s, 10 s and 30 s; then greedy generation of exactly --new-tokens tokens (eos ignored) from the same hand-built
prompts and features: time to first token with a 10 s clip at batch 1, decode tokens/s at batch 1, and at batch 8
(eight clips of different lengths, left-padded). Each generation is run once to warm up (this compiles the decode
step of the compiled variant, timed apart) and then --repeat times; medians are reported. The decode bandwidth is
the bytes of decoder weights one step reads (every decoder linear, norms and the lm_head; int8 bytes + scales for
int8) times tokens/s at batch 1, set against this machine's copy bandwidth (a 1 GiB copy_, read + write bytes).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (BATCH_SECONDS, audio_prompts, best_time, build_checkpoint, hf_generate,  # noqa: E402
                    leading_agreement, machine, ours_generate, print_table, signal)

BENCH_DIR = Path("/tmp/q2a-bench")
ENCODER_SECONDS = (2, 10, 30)
TTFT_SECONDS = 10.0
VARIANTS = [("transformers", "bf16"), ("ours", "bf16"), ("ours", "compile"), ("ours", "int8"), ("ours", "mmap")]
LABELS = {("transformers", "bf16"): "transformers bf16 eager", ("ours", "bf16"): "ours bf16 eager",
          ("ours", "compile"): "ours bf16 compiled", ("ours", "int8"): "ours int8",
          ("ours", "mmap"): "ours bf16 eager, mmap=True"}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one implementation, one variant, in its own process.


def rss_gb() -> float:
    """Peak resident set size of this process so far: VmHWM (ru_maxrss would carry the parent's peak over the
    fork + exec that started this worker), or ru_maxrss where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # KiB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tensor_bytes(named_tensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in named_tensors)


def decode_weight_bytes(named_tensors) -> int:
    """Bytes one decode step reads from the weights: every decoder tensor but the embedding (one row is read) and
    the KV cache."""
    return tensor_bytes((n, t) for n, t in named_tensors if "embed_tokens" not in n and "cache" not in n)


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_worker(args: argparse.Namespace) -> None:
    from qwen2audio.features import extract_features

    log = lambda msg: print(f"[{args.worker} {args.variant}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"worker": args.worker, "variant": args.variant, "threads": torch.get_num_threads()}
    if args.worker == "transformers":
        from transformers import Qwen2AudioForConditionalGeneration

        from bench_encoder import hf_encode

        start = time.perf_counter()  # imports are not loading: each side's clock starts after its own
        model = Qwen2AudioForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        out["load_s"] = time.perf_counter() - start
        decoder = [*model.model.language_model.named_parameters(), *model.model.language_model.named_buffers(),
                   *model.lm_head.named_parameters()]
        weights = model.state_dict().items()
        generate, encode = hf_generate, lambda f, m: hf_encode(model, f, m)
    else:
        import qwen2audio
        from qwen2audio.kernels.cpu import int8_kernel

        if args.variant == "int8":
            int8_kernel(verbose=True)  # a one-time build (cached by torch), not part of loading
        start = time.perf_counter()
        pipe = qwen2audio.load(args.model, dtype=torch.bfloat16, quantize="int8" if args.variant == "int8" else None,
                               compile=args.variant == "compile", mmap=args.variant == "mmap", quiet=True)
        out["load_s"] = time.perf_counter() - start
        lm = pipe.model.language_model
        decoder = [*lm.named_parameters(), *lm.named_buffers()]
        weights = pipe.model.state_dict().items()
        generate, encode, model = ours_generate, pipe.model.encode_audio, pipe
        if args.variant == "compile":  # time the first call of each shape: compilation + one step
            compiled, out["compile_s"] = pipe.decode_fn, {}

            def timed_decode(m, token_ids, *rest):
                key = str(token_ids.shape[0])
                if key in out["compile_s"]:
                    return compiled(m, token_ids, *rest)
                t = time.perf_counter()
                logits = compiled(m, token_ids, *rest)
                out["compile_s"][key] = time.perf_counter() - t
                return logits

            pipe.decode_fn = timed_decode
    out["rss_after_load_gb"] = rss_gb()
    out["weights_gb"] = tensor_bytes(weights) / 1e9
    out["decode_weight_gb"] = decode_weight_bytes(decoder) / 1e9
    log(f"loaded in {out['load_s']:.1f} s, peak RSS {out['rss_after_load_gb']:.2f} GB")

    saved: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        # The first answer after loading, before anything else runs: it pays for first-call kernel setup and, for
        # transformers (which maps the files), for paging the weights in; load + this is the time to be ready.
        out["first_ttft_s"] = generate(model, audio_prompts([TTFT_SECONDS]), 1)[0]["ttft_s"]
        log(f"first answer after load: time to first token {out['first_ttft_s']:.2f} s")
        if args.frontend:
            clip = signal(TTFT_SECONDS)
            if args.worker == "transformers":
                from transformers import WhisperFeatureExtractor

                fe = WhisperFeatureExtractor(feature_size=128)  # Qwen2-Audio's preprocessor_config.json
                logmel = lambda: fe(clip, sampling_rate=16000, return_attention_mask=True,  # noqa: E731
                                    padding="max_length", return_tensors="pt")
            else:
                logmel = lambda: extract_features([clip])  # noqa: E731
            out["logmel_s"] = best_time(logmel, args.repeat)
            out["encoder_s"] = {}
            for seconds in ENCODER_SECONDS:
                feats, mask = extract_features([signal(seconds)])
                out["encoder_s"][str(seconds)] = best_time(lambda: encode(feats, mask), args.repeat)
            log(f"log-mel {out['logmel_s'] * 1e3:.0f} ms, encoder {out['encoder_s']}")

        batches = {"b1": [TTFT_SECONDS]} | ({} if args.skip_batch else {"b8": list(BATCH_SECONDS)})
        for name, seconds in batches.items():
            inputs = audio_prompts(seconds)
            _, tokens, logits = generate(model, inputs, args.new_tokens, capture_logits=True)  # warm-up
            saved[f"{name}_tokens"], saved[f"{name}_logits"] = tokens, logits
            out[name] = median_runs([generate(model, inputs, args.new_tokens)[0] for _ in range(args.repeat)])
            out[name]["prompt_tokens"] = inputs["input_ids"].shape[1]
            log(f"{name}: time to first token {out[name]['ttft_s']:.2f} s, "
                f"decode {out[name]['decode_tok_s']:.2f} tokens/s")
    out["rss_peak_gb"] = rss_gb()
    torch.save(saved, Path(args.out).with_suffix(".pt"))
    Path(args.out).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Parent: build or find the checkpoint, measure the copy bandwidth, run the workers, print the tables.


def copy_bandwidth_gbs(size: int = 2**30, repeat: int = 5) -> float:
    """Best (read + write) bytes per second of a large tensor copy: the memory system's practical limit."""
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best / 1e9


def checkpoint_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9


def spawn(worker: str, variant: str, folder: Path, out: Path, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", worker, "--variant", variant, "--model", str(folder), "--out",
           str(out), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    cmd += ["--frontend"] if variant == "bf16" else []
    cmd += ["--skip-batch"] if args.skip_batch else []
    print(f"running {LABELS[worker, variant]} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode != 0:
        print(f"{LABELS[worker, variant]} failed (exit {done.returncode}); left out of the tables", file=sys.stderr)
        return None
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["saved"] = torch.load(out.with_suffix(".pt"))
    return result


def best_of(runs: list[dict]) -> dict:
    """One variant's rounds merged: the shortest time and the highest tokens/s of each measurement (on a shared
    machine the noise only ever slows a run down), the largest peak memory; tokens and logits from the first."""
    def merge(values: list):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) if k != "saved" else first[k] for k in first}
        return first

    merged = merge(runs)
    for r in runs[1:]:
        for key in ("load_s", "first_ttft_s", "logmel_s"):
            if key in r:
                merged[key] = min(merged[key], r[key])
        for key in ("rss_after_load_gb", "rss_peak_gb"):
            merged[key] = max(merged[key], r[key])
        for key in ("encoder_s", "compile_s"):
            for k, v in r.get(key, {}).items():
                merged[key][k] = min(merged[key][k], v)
        for name in ("b1", "b8"):
            if name in r:
                merged[name]["ttft_s"] = min(merged[name]["ttft_s"], r[name]["ttft_s"])
                merged[name]["decode_tok_s"] = max(merged[name]["decode_tok_s"], r[name]["decode_tok_s"])
    merged["rounds"] = len(runs)
    return merged


def ratio(ours: float | None, ref: float | None) -> str:
    return f"{ours / ref:.2f}x" if ours and ref else "-"


def report(results: dict, args: argparse.Namespace, folder: Path, copy_gbs: float) -> dict:
    md = args.markdown
    ref = results.get(("transformers", "bf16"))
    text_layers = json.loads((folder / "config.json").read_text())["text_config"].get("num_hidden_layers")
    audio_layers = json.loads((folder / "config.json").read_text())["audio_config"].get("encoder_layers")
    title = (f"{text_layers} decoder + {audio_layers} encoder layers of the 7B's widths, bf16 checkpoint "
             f"{checkpoint_gb(folder):.2f} GB, {date.today()}, {machine()}")
    n_rounds = min(r.get("rounds", 1) for r in results.values())
    title += f", best of {n_rounds} rounds" if n_rounds > 1 else ""
    print(f"\n{'#### ' if md else ''}Qwen2-Audio benchmarks: {title}")

    rows = []
    for key, r in results.items():
        compile_s = ", ".join(f"b{b}: {s:.0f} s" for b, s in r.get("compile_s", {}).items()) or "-"
        ready = r["load_s"] + r["first_ttft_s"]
        ready_ref = ref and ref["load_s"] + ref["first_ttft_s"]
        rows.append([LABELS[key], f"{r['load_s']:.2f}", f"{r['first_ttft_s']:.2f}", f"{ready:.2f}",
                     ratio(ready_ref, ready), f"{r['weights_gb']:.2f}", f"{r['rss_after_load_gb']:.2f}",
                     f"{r['rss_peak_gb']:.2f}", f"{r['rss_peak_gb'] / r['weights_gb']:.2f}", compile_s])
    print_table("Load and memory. transformers maps the weight files: its load reads little and its first answer "
                "pages the weights in; ours reads them into memory during load. So load + first answer (10 s clip) "
                "is the time to be ready. Peak RSS of each worker process (VmHWM); weights = bytes of the loaded "
                "state dict",
                ["variant", "load s", "first answer s", "load + first answer s", "speed-up", "weights GB",
                 "peak RSS after load GB", "peak RSS GB", "peak / weights", "compile (first decode step)"], rows, md)

    ours = results.get(("ours", "bf16"))
    if ours and ref and "logmel_s" in ours and "logmel_s" in ref:
        rows = [[f"log-mel, {TTFT_SECONDS:g} s clip", f"{ref['logmel_s'] * 1e3:.1f}", f"{ours['logmel_s'] * 1e3:.1f}",
                 ratio(ref["logmel_s"], ours["logmel_s"])]]
        rows += [[f"encoder, {s} s clip", f"{ref['encoder_s'][str(s)] * 1e3:.0f}",
                  f"{ours['encoder_s'][str(s)] * 1e3:.0f}", ratio(ref["encoder_s"][str(s)], ours["encoder_s"][str(s)])]
                 for s in ENCODER_SECONDS]
        print_table("Audio front end (median ms)", ["", "transformers ms", "ours ms", "speed-up"], rows, md)

    rows, summary = [], {}
    for key, r in results.items():
        b1, b8 = r["b1"], r.get("b8")
        bandwidth = r["decode_weight_gb"] * b1["decode_tok_s"]
        agree, diff = "-", "-"
        if ref and key != ("transformers", "bf16"):
            n = r["saved"]["b1_tokens"].shape[1]
            same1 = leading_agreement(r["saved"]["b1_tokens"], ref["saved"]["b1_tokens"])[0]
            agree = f"{same1}/{n}"
            if b8 and "b8_tokens" in ref["saved"]:
                same8 = leading_agreement(r["saved"]["b8_tokens"], ref["saved"]["b8_tokens"])
                agree += f", b8 median {statistics.median(same8):g}/{n} min {min(same8)}/{n}"
                # A row that parts at step 1: show how close transformers' own top two logits were there.
                top2 = ref["saved"]["b8_logits"].topk(2, dim=-1).values
                gaps = [(top2[i, 0] - top2[i, 1]).item() for i, k in enumerate(same8) if k == 0]
                agree += f" (step-1 splits at top-2 gaps <= {max(gaps):.2g})" if gaps else ""
            diffs = [f"{name} {(r['saved'][f'{name}_logits'] - ref['saved'][f'{name}_logits']).abs().max().item():.3g}"
                     for name in ("b1", "b8") if f"{name}_logits" in r["saved"] and f"{name}_logits" in ref["saved"]]
            diff = ", ".join(diffs)
        summary[key] = {"ttft": ref and ref["b1"]["ttft_s"] / b1["ttft_s"],
                        "b1": ref and b1["decode_tok_s"] / ref["b1"]["decode_tok_s"],
                        "b8": ref and b8 and ref.get("b8") and b8["decode_tok_s"] / ref["b8"]["decode_tok_s"],
                        "bandwidth": bandwidth / copy_gbs}
        rows.append([LABELS[key], f"{b1['ttft_s']:.2f}", ratio(ref and ref["b1"]["ttft_s"], b1["ttft_s"]),
                     f"{b1['decode_tok_s']:.2f}", ratio(b1["decode_tok_s"], ref and ref["b1"]["decode_tok_s"]),
                     f"{b8['decode_tok_s']:.2f}" if b8 else "-",
                     ratio(b8 and b8["decode_tok_s"], ref and ref.get("b8") and ref["b8"]["decode_tok_s"]),
                     f"{r['decode_weight_gb']:.2f}", f"{bandwidth:.1f} ({bandwidth / copy_gbs:.0%})", agree, diff])
    config = json.loads((folder / "config.json").read_text())
    ours_b1 = results.get(("ours", "bf16"))
    if ref and ours_b1:  # the work each prefill does, and so the best TTFT ratio equal matrix speed could give
        from qwen2audio.features import encoder_lengths

        from common import prefill_gflop

        T = ref["b1"]["prompt_tokens"]
        positions = int(encoder_lengths(int(TTFT_SECONDS * 100))[0])  # conv positions of the clip
        theirs = prefill_gflop(config, T, 3000, 1500, logit_rows=T)  # always 30 s; logits for every position
        mine = prefill_gflop(config, T, 2 * positions + 1, positions, logit_rows=1)
        work = [[LABELS[k], f"{g:.0f}", f"{results[k]['b1']['ttft_s']:.2f}",
                 f"{g / results[k]['b1']['ttft_s']:.0f}"] for k, g in ((("transformers", "bf16"), theirs),
                                                                      (("ours", "bf16"), mine))]
        print_table(f"Time to first token against the work: matrix-product GFLOP of the prefill ({T} prompt tokens, "
                    f"{TTFT_SECONDS:g} s clip); at equal matrix speed the TTFT speed-up is at most "
                    f"{theirs / mine:.2f}x", ["variant", "prefill GFLOP", "TTFT s", "GFLOP/s"], work, md)

    some = next(iter(results.values()))
    b8_prompt = some["b8"]["prompt_tokens"] if "b8" in some else 0
    print_table(f"Generation: greedy, {args.new_tokens} new tokens; TTFT = time to first token, batch 1, "
                f"{TTFT_SECONDS:g} s clip ({some['b1']['prompt_tokens']} prompt tokens); batch 8 = clips of "
                f"{', '.join(f'{s:g}' for s in BATCH_SECONDS)} s, left-padded to {b8_prompt} tokens; decode "
                f"tokens/s counts every row; bandwidth = decoder bytes per step x batch-1 tokens/s, % of the copy "
                f"bandwidth {copy_gbs:.1f} GB/s (read + write)",
                ["variant", "TTFT s", "TTFT speed-up", "decode b1 tok/s", "b1 speed-up", "decode b8 tok/s",
                 "b8 speed-up", "decoder GB/step", "b1 GB/s (% copy)", "same tokens as transformers",
                 "step-1 logits max |diff|"], rows, md)
    return summary


def print_targets(summary: dict, md: bool) -> None:
    """The issue's targets, each judged on the best of our variants it applies to."""
    def best(keys: list[tuple[str, str]], field: str) -> tuple[float | None, str]:
        scored = [(summary[k][field], LABELS[k]) for k in keys if k in summary and summary[k][field]]
        return max(scored) if scored else (None, "not run")

    bf16 = [("ours", "bf16"), ("ours", "compile")]
    targets = [("decode batch 1 vs transformers eager", bf16, "b1", 1.5, "x"),
               ("decode batch 1, int8 vs transformers eager (bf16)", [("ours", "int8")], "b1", 2.5, "x"),
               (f"time to first token, {TTFT_SECONDS:g} s clip", [("ours", "bf16")], "ttft", 3.0, "x"),
               ("decode throughput at batch 8", bf16, "b8", 1.5, "x"),
               ("decode bandwidth (bf16, batch 1) / copy bandwidth", bf16, "bandwidth", 0.6, "%")]
    rows = []
    for name, keys, field, goal, unit in targets:
        value, who = best(keys, field)
        shown = "-" if value is None else (f"{value:.0%}" if unit == "%" else f"{value:.2f}x")
        rows.append([name, f">= {goal:.0%}" if unit == "%" else f">= {goal:g}x", shown, who,
                     "-" if value is None else ("PASS" if value >= goal else "MISS")])
    print_table("Targets (issue 6)", ["target", "goal", "measured", "variant", "result"], rows, md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a bf16 Qwen2-Audio folder (default: build one)")
    parser.add_argument("--text-layers", type=int, default=4, help="decoder layers of the built checkpoint")
    parser.add_argument("--audio-layers", type=int, default=4, help="encoder layers of the built checkpoint")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, in turns; report each one's best figures")
    parser.add_argument("--skip-compile", action="store_true", help="leave out ours bf16 compiled")
    parser.add_argument("--skip-int8", action="store_true", help="leave out ours int8")
    parser.add_argument("--skip-mmap", action="store_true", help="leave out ours bf16 with mmap=True")
    parser.add_argument("--skip-batch", action="store_true", help="leave out batch 8")
    parser.add_argument("--markdown", action="store_true", help="print the tables ready to paste into README.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    # worker mode (run by the parent)
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["bf16", "compile", "int8", "mmap"], default="bf16",
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--frontend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    start = time.perf_counter()
    folder = args.model
    if folder is None:
        print(f"building (or reusing) a checkpoint under {BENCH_DIR} ...", file=sys.stderr, flush=True)
        folder = build_checkpoint(BENCH_DIR / f"text{args.text_layers}-audio{args.audio_layers}-bfloat16",
                                  args.text_layers, args.audio_layers)
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.1f} GB/s (read + write)", file=sys.stderr, flush=True)
    skip = {("ours", "compile")} if args.skip_compile else set()
    skip |= {("ours", "int8")} if args.skip_int8 else set()
    skip |= {("ours", "mmap")} if args.skip_mmap else set()
    rounds: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="q2a-run-") as tmp:
        for round_ in range(args.rounds):  # the variants take turns, so a slow spell of the machine hits all
            for worker, variant in VARIANTS:
                if (worker, variant) not in skip:
                    r = spawn(worker, variant, Path(folder), Path(tmp) / f"{worker}-{variant}-{round_}.json", args)
                    if r is not None:
                        rounds.setdefault((worker, variant), []).append(r)
    results = {key: best_of(runs) for key, runs in rounds.items()}
    if not results:
        sys.exit("every worker failed")
    if args.json:  # first, so that the measurements outlive a failure below
        plain = lambda r: {k: x for k, x in r.items() if k != "saved"}  # noqa: E731
        args.json.write_text(json.dumps({"copy_bandwidth_gbs": copy_gbs, "model": str(folder),
                                         "results": {f"{w} {v}": plain(r) for (w, v), r in results.items()},
                                         "rounds": {f"{w} {v}": [plain(r) for r in runs]
                                                    for (w, v), runs in rounds.items()}}, indent=1))
    summary = report(results, args, Path(folder), copy_gbs)
    print_targets(summary, args.markdown)
    print(f"\n(total {time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
