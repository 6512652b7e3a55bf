"""The tables of benchmarks/run.py: load and memory, the audio front end, the prefill's work, generation, targets.

`results` maps a variant key (worker.VARIANTS) to its worker's JSON, merged over rounds, with "saved" holding the
tokens and first-step logits.
"""

import json
import statistics
from pathlib import Path

from common import BATCH_SECONDS, leading_agreement, prefill_gflop, print_table
from worker import ENCODER_SECONDS, TTFT_SECONDS, VARIANTS


def label(key: str, r: dict) -> str:
    name = VARIANTS[key][0]
    return f"{name} (auto: {r['kernels']})" if VARIANTS[key][1] == "ours" and r.get("kernels", "-") != "-" \
        and "kernels" not in VARIANTS[key][2] else name


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def load_table(results: dict, md: bool) -> None:
    ref = results.get("hf-bf16")
    rows = []
    for key, r in results.items():
        compile_s = ", ".join(f"b{b}: {s:.0f} s" for b, s in r.get("compile_s", {}).items()) or "-"
        ready, ready_ref = r["load_s"] + r["first_ttft_s"], ref and ref["load_s"] + ref["first_ttft_s"]
        peak = r.get("gpu_peak_gb", r["rss_peak_gb"])
        rows.append([label(key, r), f"{r['load_s']:.2f}", f"{r['first_ttft_s']:.2f}", f"{ready:.2f}",
                     ratio(ready_ref, ready), f"{r['weights_gb']:.2f}", f"{r['rss_after_load_gb']:.2f}",
                     f"{peak:.2f}", f"{peak / r['weights_gb']:.2f}", compile_s])
    memory = "peak GPU memory (max_memory_allocated)" if "gpu_peak_gb" in next(iter(results.values())) else \
        "peak RSS of each worker process (VmHWM)"
    print_table(f"Load and memory. Load + first answer (10 s clip) is the time to be ready; speed-up against "
                f"transformers bf16; {memory}; weights = bytes of the loaded state dict",
                ["variant", "load s", "first answer s", "load + first answer s", "speed-up", "weights GB",
                 "peak RSS after load GB", "peak GB", "peak / weights", "compile (first decode step)"], rows, md)


def frontend_table(results: dict, md: bool) -> None:
    timed = {k: r for k, r in results.items() if "encoder_s" in r}
    if not timed:
        return
    rows = [[label(k, r), f"{r['logmel_s'] * 1e3:.1f}"] + [f"{r['encoder_s'][str(s)] * 1e3:.0f}"
                                                          for s in ENCODER_SECONDS] for k, r in timed.items()]
    print_table(f"Audio front end: median ms (log-mel of a {TTFT_SECONDS:g} s clip; the encoder and projector on one "
                "clip; transformers always encodes 30 s)",
                ["variant", "log-mel ms"] + [f"encoder {s} s clip ms" for s in ENCODER_SECONDS], rows, md)


def work_table(results: dict, folder: Path, md: bool) -> float:
    """The matrix-product work of each prefill: at equal matrix speed, the bound on the TTFT ratio."""
    from qwen2audio.features import encoder_lengths

    config = json.loads((folder / "config.json").read_text())
    some = next(iter(results.values()))
    T = some["b1"]["prompt_tokens"]
    positions = int(encoder_lengths(int(TTFT_SECONDS * 100))[0])  # conv positions of the clip
    theirs = prefill_gflop(config, T, 3000, 1500, logit_rows=T)  # always 30 s; logits for every position
    ours = prefill_gflop(config, T, 2 * positions + 1, positions, logit_rows=1)
    rows = [[label(k, r), f"{g:.0f}", f"{r['b1']['ttft_s']:.2f}", f"{g / r['b1']['ttft_s']:.0f}"]
            for k, r in results.items() for g in [theirs if VARIANTS[k][1] == "transformers" else ours]]
    print_table(f"Time to first token against the work: matrix-product GFLOP of the prefill ({T} prompt tokens, "
                f"{TTFT_SECONDS:g} s clip); at equal matrix speed the TTFT speed-up is at most {theirs / ours:.2f}x",
                ["variant", "prefill GFLOP", "TTFT s", "GFLOP/s"], rows, md)
    return theirs / ours


def agreement(r: dict, ref: dict) -> tuple[str, str]:
    """(leading tokens shared with the reference, batch 1 and 8; the first-step logits' max |diff|)."""
    n = r["saved"]["b1_tokens"].shape[1]
    agree = f"{leading_agreement(r['saved']['b1_tokens'], ref['saved']['b1_tokens'])[0]}/{n}"
    if "b8_tokens" in r["saved"] and "b8_tokens" in ref["saved"]:
        same8 = leading_agreement(r["saved"]["b8_tokens"], ref["saved"]["b8_tokens"])
        agree += f", b8 median {statistics.median(same8):g}/{n} min {min(same8)}/{n}"
    diffs = [f"{b} {(r['saved'][f'{b}_logits'] - ref['saved'][f'{b}_logits']).abs().max().item():.3g}"
             for b in ("b1", "b8") if f"{b}_logits" in r["saved"] and f"{b}_logits" in ref["saved"]]
    return agree, ", ".join(diffs)


def generation_table(results: dict, new_tokens: int, copy_gbs: float, md: bool) -> dict:
    refs = {name: results.get(key) for name, key in (("fp32", "hf-fp32"), ("bf16", "hf-bf16"))}
    summary, rows = {}, []
    for key, r in results.items():
        b1, b8 = r["b1"], r.get("b8", {})
        bandwidth = r["decode_weight_gb"] * b1["decode_tok_s"]
        summary[key] = {"bandwidth": bandwidth / copy_gbs, "b1": b1["decode_tok_s"], "b8": b8.get("decode_tok_s"),
                        "ttft": b1["ttft_s"]}
        row = [label(key, r), f"{b1['ttft_s']:.2f}"]
        row += [ratio(ref and ref["b1"]["ttft_s"], b1["ttft_s"]) for ref in refs.values()]
        row += [f"{b1['decode_tok_s']:.2f}"] + [ratio(b1["decode_tok_s"], ref and ref["b1"]["decode_tok_s"])
                                                for ref in refs.values()]
        row += [f"{b8['decode_tok_s']:.2f}" if b8 else "-",
                ratio(b8.get("decode_tok_s"), refs["bf16"] and refs["bf16"].get("b8", {}).get("decode_tok_s"))]
        row += [f"{r['decode_weight_gb']:.2f}", f"{bandwidth:.1f} ({bandwidth / copy_gbs:.0%})"]
        row += agreement(r, refs["bf16"]) if refs["bf16"] and key != "hf-bf16" else ["-", "-"]
        rows.append(row)
    some = next(iter(results.values()))
    print_table(f"Generation: greedy, {new_tokens} new tokens; TTFT = time to first token, batch 1, {TTFT_SECONDS:g} s "
                f"clip ({some['b1']['prompt_tokens']} prompt tokens); batch 8 = clips of "
                f"{', '.join(f'{s:g}' for s in BATCH_SECONDS)} s, left-padded; decode tokens/s counts every row; "
                f"bandwidth = decoder bytes per step x batch-1 tokens/s, % of the copy bandwidth {copy_gbs:.1f} GB/s "
                f"(read + write); tokens and logits compared with transformers bf16",
                ["variant", "TTFT s", "vs hf fp32", "vs hf bf16", "decode b1 tok/s", "vs hf fp32", "vs hf bf16",
                 "decode b8 tok/s", "vs hf bf16", "decoder GB/step", "b1 GB/s (% copy)", "same tokens",
                 "step-1 logits max |diff|"], rows, md)
    return summary


def targets_table(title: str, targets: list[tuple], md: bool) -> None:
    """targets: (name, goal, measured value or None, who); goals below 1 read as a fraction (of bandwidth)."""
    rows = []
    for name, goal, value, who in targets:
        shown = "-" if value is None else f"{value:.0%}" if goal < 1 else f"{value:.2f}x"
        rows.append([name, f">= {goal:.0%}" if goal < 1 else f">= {goal:g}x", shown, who,
                     "not run" if value is None else "PASS" if value >= goal else "MISS"])
    print_table(title, ["target", "goal", "measured", "variant", "result"], rows, md)


def cpu_targets(s: dict, results: dict, work_bound: float | None, md: bool) -> None:
    """Issue 17's targets (against transformers fp32, the better dtype on CPUs without bf16 arithmetic) for each of
    our bf16 paths; issue 6's (against transformers bf16) for the default."""
    def vs(key: str, ref: str, field: str, inverse: bool = False) -> float | None:
        if key not in s or ref not in s or not s[key][field] or not s[ref][field]:
            return None
        return s[ref][field] / s[key][field] if inverse else s[key][field] / s[ref][field]

    rows = []
    for bf16, int8 in (("bf16", "int8"), ("avx2", "int8-avx2")):
        if bf16 in results:
            who = label(bf16, results[bf16])
            rows += [("decode batch 1 vs transformers fp32", 1.5, vs(bf16, "hf-fp32", "b1"), who),
                     ("decode bandwidth, batch 1 / copy bandwidth", 0.6, s[bf16]["bandwidth"], who),
                     (f"time to first token ({TTFT_SECONDS:g} s clip) vs transformers fp32", 2.0,
                      vs(bf16, "hf-fp32", "ttft", inverse=True), who),
                     ("int8 decode vs our bf16 decode (same kernels)", 1.6, vs(int8, bf16, "b1"),
                      label(int8, results[int8]) if int8 in results else "-")]
    targets_table("Targets (issue 17: CPUs without bf16 arithmetic)", rows, md)
    ttft = vs("bf16", "hf-bf16", "ttft", inverse=True)
    rows = [("decode batch 1 vs transformers bf16", 1.5, vs("bf16", "hf-bf16", "b1"), "ours bf16"),
            ("int8 decode batch 1 vs transformers bf16", 2.5, vs("int8", "hf-bf16", "b1"), "ours int8"),
            ("time to first token / the work bound", 0.9, ttft and work_bound and ttft / work_bound, "ours bf16"),
            ("decode throughput at batch 8 vs transformers bf16", 1.5, vs("bf16", "hf-bf16", "b8"), "ours bf16")]
    targets_table("Targets (issue 6, judged on AVX-512 / AMX CPUs)", rows, md)


def gpu_targets(s: dict, md: bool) -> None:
    rows = [("compiled bf16 decode, batch 1 / copy bandwidth", 0.6, s.get("compile", {}).get("bandwidth"),
             "ours bf16 compiled"),
            ("compiled bf16 decode batch 1 vs transformers bf16", 3.0,
             "compile" in s and "hf-bf16" in s and s["compile"]["b1"] / s["hf-bf16"]["b1"], "ours bf16 compiled")]
    targets_table("Targets (issue 17, GPU)", [(n, g, v or None, w) for n, g, v, w in rows], md)
