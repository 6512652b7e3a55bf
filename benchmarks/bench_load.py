"""Time to be ready at the real 7B shape: load + the first answer, and decoding speed once loaded.

    python benchmarks/bench_load.py [--folder /tmp/q2a-7b] [--text-layers 32] [--audio-layers 32]
                                    [--new-tokens 8] [--cold] [--markdown]

Writes (once) a random checkpoint of Qwen2-Audio-7B's exact shape, bf16, in 4 GB shards, tensor by tensor (the
whole model is never in memory). Then each variant runs in a process of its own: transformers (from_pretrained,
bf16), ours by default (map the files, answer, move the weights into memory in the background), ours with
mmap=False (read everything before returning) and mmap=True (stay mapped). For each: load time, time to the first
token of the first request (a 10 s clip, batch 1), their sum, then decode tokens/s (greedy, eos ignored) once the
weights are where they stay (ours waits for the background move first). --cold drops the page cache before each
variant (root only), so the files come from disk.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import REAL_AUDIO, REAL_TEXT, audio_prompts, hf_generate, machine, ours_generate, print_table  # noqa: E402

VARIANTS = [("transformers", None), ("ours", None), ("ours", False), ("ours", True)]
LABELS = {("transformers", None): "transformers bf16", ("ours", None): "ours, default (map, move in background)",
          ("ours", False): "ours, mmap=False (read first)", ("ours", True): "ours, mmap=True (stay mapped)"}


def build_full_shape(folder: Path, text_layers: int, audio_layers: int, shard_bytes: int = 4 << 30) -> Path:
    """A random bf16 checkpoint of the 7B's shape, written shard by shard (the Hub's key names and layout)."""
    from safetensors.torch import save_file
    from transformers import Qwen2AudioConfig

    from qwen2audio.config import Qwen2AudioConfig as OurConfig
    from qwen2audio.weights import meta_model

    spec = {"text_layers": text_layers, "audio_layers": audio_layers}
    marker = folder / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2AudioConfig(audio_config=dict(REAL_AUDIO, encoder_layers=audio_layers),
                              text_config=dict(REAL_TEXT, num_hidden_layers=text_layers), audio_token_index=151646)
    config.save_pretrained(folder)
    shapes = {k: v.shape for k, v in meta_model(OurConfig.from_file(folder)).state_dict().items()}
    shards, shard, size, generator = [], {}, 0, torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if "norm" in key and key.endswith("weight"):
            tensor.fill_(1.0)
        shard[key], size = tensor, size + tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(_write(folder, shard, len(shards), save_file))
            shard, size = {}, 0
    if shard:
        shards.append(_write(folder, shard, len(shards), save_file))
    names = {old: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, (old, _) in enumerate(shards)}
    for old, new in names.items():
        (folder / old).rename(folder / new)
    weight_map = {key: names[old] for old, keys in shards for key in keys}
    total = sum(shapes[k].numel() * 2 for k in shapes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    marker.write_text(json.dumps(spec))
    return folder


def _write(folder: Path, shard: dict, index: int, save_file) -> tuple[str, list[str]]:
    name = f"part-{index}.safetensors"
    save_file(shard, folder / name, metadata={"format": "pt"})
    print(f"wrote {name} ({sum(t.numel() for t in shard.values()) * 2 / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    return name, list(shard)


def run_worker(args: argparse.Namespace) -> dict:
    """One variant in this process: load, first answer, then steady decoding."""
    prompt = audio_prompts([10.0])
    start = time.perf_counter()
    if args.worker == "transformers":
        from transformers import Qwen2AudioForConditionalGeneration

        model = Qwen2AudioForConditionalGeneration.from_pretrained(args.folder, dtype=torch.bfloat16).eval()
        load_s = time.perf_counter() - start
        first = hf_generate(model, prompt, 1)[0]["ttft_s"]
        steady = hf_generate(model, prompt, args.new_tokens)[0]
    else:
        import qwen2audio

        mmap = {"none": None, "false": False, "true": True}[args.mmap]
        model = qwen2audio.load(args.folder, mmap=mmap, quiet=True)
        load_s = time.perf_counter() - start
        first = ours_generate(model, prompt, 1)[0]["ttft_s"]
        model.wait_until_ready()
        steady = ours_generate(model, prompt, args.new_tokens)[0]
    return {"load_s": load_s, "first_ttft_s": first, "ready_s": load_s + first,
            "decode_tok_s": steady["decode_tok_s"], "ttft_s": steady["ttft_s"]}


def run_variant(args: argparse.Namespace, worker: str, mmap: bool | None) -> dict:
    if args.cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    command = [sys.executable, __file__, "--worker", worker, "--mmap", str(mmap).lower(), "--folder", str(args.folder),
               "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{worker} {mmap} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/q2a-7b"))
    parser.add_argument("--text-layers", type=int, default=32)
    parser.add_argument("--audio-layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each variant (root)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--mmap", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    build_full_shape(args.folder, args.text_layers, args.audio_layers)
    results = {}
    for worker, mmap in VARIANTS:
        results[(worker, mmap)] = run_variant(args, worker, mmap)
        print(f"{LABELS[(worker, mmap)]}: {results[(worker, mmap)]}", file=sys.stderr, flush=True)
    reference = results[("transformers", None)]
    rows = [[LABELS[v], f"{r['load_s']:.2f}", f"{r['first_ttft_s']:.2f}", f"{r['ready_s']:.2f}",
             f"{reference['ready_s'] / r['ready_s']:.2f}x", f"{r['decode_tok_s']:.2f}",
             f"{r['decode_tok_s'] / reference['decode_tok_s']:.2f}x"] for v, r in results.items()]
    title = (f"Time to be ready, {args.text_layers}+{args.audio_layers} layers of the 7B's shape, bf16, "
             f"{'cold' if args.cold else 'warm'} page cache, {time.strftime('%Y-%m-%d')}, {machine()}")
    print_table(title, ["variant", "load s", "first answer (TTFT, 10 s clip) s", "load + first answer s", "speed-up",
                        "decode tok/s after", "decode vs transformers"], rows, args.markdown)


if __name__ == "__main__":
    main()
