"""`qwen2audio serve`: its options, and starting the server. The main CLI (qwen2audio/cli.py) only registers it.

This module imports nothing beyond the standard library at import time: the web packages (the `serve` extra) are
imported by `run`, with a message saying how to install them.
"""

import argparse
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import InputError

DEFAULT_CONTEXT = 2048  # tokens per cache row unless --max-model-len says otherwise (30 s of audio is 750)
API_KEY_ENV = "QWEN2AUDIO_API_KEY"


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` subcommand, with the loading options of the other commands (`common`); its generation options
    become the server's defaults, which each request's own parameters override."""
    serve = subparsers.add_parser(
        "serve", parents=[common], help="an OpenAI-compatible HTTP server (pip install 'qwen2audio[serve]')",
        description="Serve the model over OpenAI's API (/v1/chat/completions with audio, /v1/audio/transcriptions, "
                    "/v1/models, /health), batching concurrent requests. Binds 127.0.0.1 unless --host says otherwise.")
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--served-model-name", help="the model's name in the API (default: the folder or repo name)")
    g.add_argument("--open", action="store_true",
                   help="open the web page (GET /) in the default browser once the server is listening")
    g.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (default: %(default)s)")
    g.add_argument("--max-queue", type=_at_least_zero, default=64,
                   help="requests that may wait for a free batch row; beyond, 429 (default: %(default)s)")
    g.add_argument("--max-model-len", type=_positive,
                   help=f"tokens per request, prompt (audio included) + reply: the cache row length "
                        f"(default: {DEFAULT_CONTEXT}, at most the model's max_position_embeddings)")
    g.add_argument("--max-body-mb", type=_positive, default=25, help="request body limit in MiB (default: 25)")
    g.add_argument("--max-audio-seconds", type=_positive,
                   help="longest clip accepted (default: as much audio as fits the context, 25 tokens/s)")
    g.add_argument("--allow-audio-urls", action="store_true",
                   help="let audio_url name http(s) URLs that the server downloads (off: data: URIs only)")
    g.add_argument("--audio-url-host", action="append", default=[], metavar="HOST",
                   help="with --allow-audio-urls: the only hosts that may be named (repeatable; strongly advised)")
    return serve


def _positive(text: str) -> int:
    value = _at_least_zero(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _at_least_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def served_name(model: str) -> str:
    """A local folder's name, or the Hub repo id as given (what vLLM lists)."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def server_parts(pipe, args: argparse.Namespace):
    """(scheduler, ServerConfig) from the command line; the scheduler allocates the batch cache."""
    from ..audio import AudioPolicy
    from ..commands import generation_overrides
    from .app import ServerConfig
    from .prompts import Limits
    from .scheduler import Scheduler

    if args.audio_url_host and not args.allow_audio_urls:
        raise InputError("--audio-url-host only applies with --allow-audio-urls; add it or drop the hosts")
    limit = pipe.config.text_config.max_position_embeddings
    context = min(args.max_model_len or DEFAULT_CONTEXT, limit)
    seconds = args.max_audio_seconds or math.ceil(context / 25)
    policy = AudioPolicy.strict(allow_downloads=args.allow_audio_urls, max_bytes=args.max_body_mb << 20,
                                download_hosts=frozenset(args.audio_url_host) or None, max_seconds=float(seconds))
    # seed is left out: one seed for every request would make all sampled replies to one prompt the same
    defaults = {k: v for k, v in generation_overrides(args).items() if k != "seed" and v is not None}
    limits = Limits(context, policy, args.long_audio, tuple(defaults.items()))
    config = ServerConfig(args.served_model_name or served_name(args.model), limits, args.api_key,
                          args.max_body_mb << 20, args.max_queue, loopback_only=_is_loopback(args.host))
    return Scheduler(pipe, args.max_batch, context), config


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before uvicorn starts so the real port can be printed."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=128)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port or "
                         "--host") from None


def uvicorn_server(app, log_level: str, max_connections: int):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False)
    return uvicorn.Server(config)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve app from a background thread (tests, benchmarks); returns (server, port). Stop: server.should_exit =
    True, then join server.thread."""
    sock = bind(host, port)
    server = uvicorn_server(app, log_level, 1000)
    server.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    server.thread.start()
    while not server.started and server.thread.is_alive():
        server.thread.join(0.01)
    return server, sock.getsockname()[1]


def page_url(host: str, port: int) -> str:
    """The web page's address. A wildcard bind (0.0.0.0, ::) is opened through this machine's loopback, where
    browsers also allow the microphone without https."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def open_when_listening(server, url: str) -> None:
    """--open: the page in the default browser (Python's webbrowser: $BROWSER, else the desktop's) as soon as
    uvicorn serves; a thread waits for that, so the server starts as it always does."""
    def wait_then_open() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        import webbrowser

        if not webbrowser.open(url):
            print(f"no browser could be started; open {url} yourself", file=sys.stderr, flush=True)
    threading.Thread(target=wait_then_open, name="qwen2audio-open", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("the server needs its web packages: pip install 'qwen2audio[serve]' (starlette, uvicorn, "
                         "python-multipart)") from None
    from ..commands import load_pipeline
    from .app import build_app

    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(format="%(name)s: %(message)s")  # main() may have set it up already
    logging.getLogger("qwen2audio.serve").setLevel(level)  # one line per request; with --debug, per decode step
    sock = bind(args.host, args.port)  # a taken port is an error before the weights load
    pipe, _ = load_pipeline(args)  # as every subcommand loads
    scheduler, config = server_parts(pipe, args)
    if not config.loopback_only and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
    if args.allow_audio_urls and not args.audio_url_host:
        print("warning: --allow-audio-urls without --audio-url-host: clients can make this server fetch any URL, "
              "internal addresses included", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"serving {config.served_name!r} on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(batch {scheduler.max_batch} x {scheduler.context} tokens); the web page: {page_url(host, port)}",
          file=sys.stderr, flush=True)
    server = uvicorn_server(build_app(pipe, scheduler, config), logging.getLevelName(level).lower(),
                            scheduler.max_batch + config.max_queue + 32)
    if args.open:
        open_when_listening(server, page_url(host, port))
    server.run(sockets=[sock])
    return 0
