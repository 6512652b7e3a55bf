"""One variant of benchmarks/run.py in its own process: load, measure, write JSON (and tokens / logits as .pt).

    python benchmarks/worker.py --variant KEY --model DIR --out FILE.json [--device cpu] [--frontend] ...

Run by run.py; each variant in a fresh process, so that two models are never in memory together and each peak
memory is its own.
"""

import argparse
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BATCH_SECONDS, audio_prompts, best_time, hf_generate, ours_generate, signal, sync  # noqa: E402

ENCODER_SECONDS = (2, 10, 30)
TTFT_SECONDS = 10.0
# key: (label, implementation, load options). "kernels" left out means load()'s default, "auto".
VARIANTS = {
    "hf-bf16": ("transformers bf16", "transformers", {"dtype": "bfloat16"}),
    "hf-fp32": ("transformers fp32", "transformers", {"dtype": "float32"}),
    "bf16": ("ours bf16", "ours", {}),
    "avx2": ("ours bf16, kernels=avx2", "ours", {"kernels": "avx2"}),
    "compile": ("ours bf16 compiled", "ours", {"compile": True}),
    "int8": ("ours int8", "ours", {"quantize": "int8"}),
    "int8-avx2": ("ours int8, kernels=avx2", "ours", {"quantize": "int8", "kernels": "avx2"}),
    "mmap": ("ours bf16, mmap=True", "ours", {"mmap": True}),
    "int8-compile": ("ours int8 compiled", "ours", {"quantize": "int8", "compile": True}),
}


def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss would carry the parent's over fork + exec)."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20  # KiB
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tensor_gb(named_tensors) -> float:
    return sum(t.numel() * t.element_size() for _, t in named_tensors) / 1e9


class KernelLog(logging.Handler):
    """Catches load()'s "CPU kernels: <choice> (...)" line on the "qwen2audio" logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.choice = "-"

    def emit(self, record: logging.LogRecord) -> None:
        if match := re.match(r"CPU kernels: (\w+)", record.getMessage()):
            self.choice = match[1]


def load_transformers(folder: str, options: dict, device: str):
    from transformers import Qwen2AudioForConditionalGeneration

    from bench_encoder import hf_encode

    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, options["dtype"]))
    model = model.to(device).eval()  # (device_map= would need the accelerate package)
    decoder = [*model.model.language_model.named_parameters(), *model.lm_head.named_parameters()]
    return model, hf_generate, lambda f, m: hf_encode(model, f, m), decoder, "-"


def load_ours(folder: str, options: dict, device: str, out: dict):
    import qwen2audio

    caught = KernelLog()
    logging.getLogger("qwen2audio").addHandler(caught)
    logging.getLogger("qwen2audio").setLevel(logging.INFO)
    pipe = qwen2audio.load(folder, dtype=torch.bfloat16, device=device, quiet=True, **options)
    if options.get("compile"):  # time the first call of each batch size: compilation + one step
        compiled, out["compile_s"] = pipe.decode_fn, {}

        def timed_decode(model, token_ids, *rest):
            key = str(token_ids.shape[0])
            start = time.perf_counter()
            logits = compiled(model, token_ids, *rest)
            if key not in out["compile_s"]:
                sync(logits.device)
                out["compile_s"][key] = time.perf_counter() - start
            return logits

        pipe.decode_fn = timed_decode
    lm = pipe._model.language_model  # not pipe.model: that waits for the background move, which is not loading
    return pipe, ours_generate, pipe._model.encode_audio, [*lm.named_parameters(), *lm.named_buffers()], caught.choice


def to_device(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def frontend(out: dict, encode, implementation: str, device: str, repeat: int) -> None:
    """The log-mel of a 10 s clip (on the CPU, as both implementations compute it) and the encoder per clip."""
    from qwen2audio.features import extract_features

    clip = signal(TTFT_SECONDS)
    if implementation == "transformers":
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=128)  # Qwen2-Audio's preprocessor_config.json
        out["logmel_s"] = best_time(lambda: fe(clip, sampling_rate=16000, return_attention_mask=True,
                                               padding="max_length", return_tensors="pt"), repeat)
    else:
        out["logmel_s"] = best_time(lambda: extract_features([clip]), repeat)
    out["encoder_s"] = {}
    for seconds in ENCODER_SECONDS:
        feats, mask = (t.to(device) for t in extract_features([signal(seconds)]))
        out["encoder_s"][str(seconds)] = best_time(lambda: sync(encode(feats, mask).device), repeat)


def generation(out: dict, saved: dict, model, generate, args: argparse.Namespace) -> None:
    """Batch 1 (10 s clip) and batch 8: a warm-up run (tokens and first-step logits kept), then the median of
    --repeat runs."""
    batches = {"b1": [TTFT_SECONDS]} | ({} if args.skip_batch else {"b8": list(BATCH_SECONDS)})
    for name, seconds in batches.items():
        inputs = to_device(audio_prompts(seconds), args.device)
        _, tokens, logits = generate(model, inputs, args.new_tokens, capture_logits=True)
        saved[f"{name}_tokens"], saved[f"{name}_logits"] = tokens.cpu(), logits.cpu()
        runs = [generate(model, inputs, args.new_tokens)[0] for _ in range(args.repeat)]
        out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[name]["prompt_tokens"] = inputs["input_ids"].shape[1]


def run(args: argparse.Namespace) -> None:
    label, implementation, options = VARIANTS[args.variant]
    log = lambda msg: print(f"[{label}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"variant": args.variant, "threads": torch.get_num_threads(), "device": args.device}
    start = time.perf_counter()  # imports are not loading: each side's clock starts after its own
    if implementation == "transformers":
        model, generate, encode, decoder, out["kernels"] = load_transformers(args.model, options, args.device)
    else:
        model, generate, encode, decoder, out["kernels"] = load_ours(args.model, options, args.device, out)
    out["load_s"] = time.perf_counter() - start
    state = (model._model if implementation == "ours" else model).state_dict().items()
    out.update(rss_after_load_gb=peak_rss_gb(), weights_gb=tensor_gb(state),
               decode_weight_gb=tensor_gb((n, t) for n, t in decoder if "embed_tokens" not in n))
    log(f"loaded in {out['load_s']:.1f} s (kernels: {out['kernels']})")
    saved: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        # The first answer after loading pays for first-call setup and, where the files are mapped, for paging the
        # weights in: load + this is the time to be ready.
        first = generate(model, to_device(audio_prompts([TTFT_SECONDS]), args.device), 1)[0]
        out["first_ttft_s"] = first["ttft_s"]
        if implementation == "ours":  # the rest measures the weights where they stay (default: moved into memory)
            start = time.perf_counter()
            model.wait_until_ready()
            out["ready_wait_s"] = time.perf_counter() - start
        if args.frontend:
            frontend(out, encode, implementation, args.device, args.repeat)
        generation(out, saved, model, generate, args)
    out["rss_peak_gb"] = peak_rss_gb()
    if args.device == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    log(f"time to first token {out['b1']['ttft_s']:.2f} s, decode {out['b1']['decode_tok_s']:.2f} tokens/s")
    torch.save(saved, Path(args.out).with_suffix(".pt"))
    Path(args.out).write_text(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--frontend", action="store_true", help="also time the log-mel and the encoder")
    parser.add_argument("--skip-batch", action="store_true")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
