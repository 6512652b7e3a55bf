"""The HTTP side: a Starlette app with OpenAI's routes, served by uvicorn.

Why Starlette (+ uvicorn) and not FastAPI: FastAPI's value is request models validated by pydantic, but its 422 body
is not OpenAI's error shape, so this server checks every field itself anyway (schema.py); what remains is routing,
streaming responses that notice a client leaving, and multipart parsing, which Starlette (the toolkit FastAPI is
built on) does with two small dependencies (anyio, python-multipart), no pydantic and no OpenAPI machinery.

The event loop only parses, checks and relays: audio decoding and the processor run in a worker pool, the model in
the scheduler's thread. A request is admitted only while fewer than max_batch + max_queue are in flight (generating,
waiting for a row, or having its audio decoded); past that it gets a 429 at once, before its body is parsed.
"""

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..pipeline import Qwen2Audio
from . import shapes
from .bodies import EventStream, parse_form, read_body
from .errors import APIError
from .guard import Guard
from .prompts import Limits, prepare, server_busy
from .scheduler import Job, Scheduler
from .schema import ChatRequest, parse_chat, transcription_request

log = logging.getLogger("qwen2audio.serve")
STATIC = Path(__file__).parent / "static"  # the web page: HTML, CSS and JavaScript, shipped as package data


@dataclass(frozen=True)
class ServerConfig:
    served_name: str
    limits: Limits
    api_key: str | None = None
    max_body_bytes: int = 25 << 20
    max_queue: int = 64  # requests that may wait for a free row; beyond, 429
    loopback_only: bool = True  # answer only requests addressed to localhost (security: DNS rebinding)
    audio_workers: int = 2


class Service:
    """The routes' state: the pipeline, the scheduler that owns its batch cache, the audio worker pool."""

    def __init__(self, pipe: Qwen2Audio, scheduler: Scheduler, config: ServerConfig) -> None:
        self.pipe, self.scheduler, self.config = pipe, scheduler, config
        self.pool = ThreadPoolExecutor(config.audio_workers, thread_name_prefix="qwen2audio-audio")
        self.inflight = 0  # touched only on the event loop's thread
        self.created = int(time.time())

    # -- plumbing -----------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        limit = self.scheduler.max_batch + self.config.max_queue
        if self.inflight >= limit:
            raise server_busy(self.inflight, limit)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def blocking(self, function: Callable, *args: object) -> object:
        """function(*args) in the worker pool: the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def submit(self, chat: ChatRequest) -> tuple[Job, asyncio.Queue]:
        """Decode and check in the worker pool, then hand the job to the scheduler; events arrive on the queue."""
        prepared = await self.blocking(prepare, self.pipe, chat, self.config.limits)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:  # called from the model thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(prepared.inputs, prepared.options, chat.stop, emit)
        self.scheduler.submit(job)
        return job, queue

    async def collect(self, request: Request, job: Job, queue: asyncio.Queue) -> tuple[str, str, int, int]:
        """The whole reply (text, finish_reason, prompt and completion tokens); a client that leaves meanwhile
        frees its row."""
        async def reply() -> tuple[str, str, int, int]:
            parts = []
            while (event := await queue.get())[0] == "text":
                parts.append(event[1])
            if event[0] == "error":
                raise event[1]
            return "".join(parts), *event[1:]

        async def client_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        answer, gone = asyncio.ensure_future(reply()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                self.scheduler.cancel(job)
        if answer.cancelled():  # the client left: nobody reads what is answered now
            raise ClientDisconnect()
        return answer.result()

    # -- routes -------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if not self.scheduler.thread.is_alive():
            raise APIError(503, "the model thread is not running")
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse(shapes.model_list(self.config.served_name, self.scheduler.context, self.created))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_body(request, self.config.max_body_bytes)
        with self.admitted():
            chat = await self.blocking(parse_chat, body, self.config.served_name)
            job, queue = await self.submit(chat)
            if not chat.stream:
                text, finish, prompt_tokens, completion_tokens = await self.collect(request, job, queue)
                return JSONResponse(shapes.completion(shapes.new_id("chatcmpl"), chat.model, text, finish,
                                                      prompt_tokens, completion_tokens))
            self.inflight += 1  # the stream keeps its place until it ends

        def closed() -> None:  # however the response ends: finished, failed, or the client gone
            self.scheduler.cancel(job)  # nothing to do if it finished; frees the row if the client left
            self.inflight -= 1
        return EventStream(self.stream(chat, job, queue), closed)

    async def stream(self, chat: ChatRequest, job: Job, queue: asyncio.Queue) -> AsyncIterator[bytes]:
        """Server-sent events as OpenAI sends them: a first chunk with the role, one per piece of text, one with
        the finish_reason, with include_usage one without choices holding the usage, then [DONE]."""
        id, created, usage = shapes.new_id("chatcmpl"), int(time.time()), chat.include_usage
        yield shapes.sse(shapes.chunk(id, chat.model, created, {"role": "assistant", "content": ""},
                                      include_usage=usage))
        while (event := await queue.get())[0] == "text":
            yield shapes.sse(shapes.chunk(id, chat.model, created, {"content": event[1]}, include_usage=usage))
        if event[0] == "error":  # OpenAI's way: an error object as an event, then the stream ends
            yield shapes.sse(event[1].body())
        else:
            _, finish, prompt_tokens, completion_tokens = event
            yield shapes.sse(shapes.chunk(id, chat.model, created, {}, finish, include_usage=usage))
            if usage:
                yield shapes.sse(shapes.chunk(id, chat.model, created, None, include_usage=True,
                                              usage_now=shapes.usage(prompt_tokens, completion_tokens)))
        yield shapes.SSE_DONE

    async def transcriptions(self, request: Request) -> Response:
        body = await read_body(request, self.config.max_body_bytes)
        with self.admitted():
            fields, file = await parse_form(request, body)
            chat = transcription_request(fields, file, self.config.served_name)
            job, queue = await self.submit(chat)
            text, _, prompt_tokens, completion_tokens = await self.collect(request, job, queue)
        if chat.response_format == "text":
            return PlainTextResponse(text)
        return JSONResponse(shapes.transcription(text, prompt_tokens, completion_tokens))




# ---------------------------------------------------------------------------------------------------------------
def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), error.status, headers=headers)


def endpoint(service: Service, handler: Callable, auth: bool = True) -> Callable:
    """A route: the API key checked, every failure answered in OpenAI's error shape (never a traceback)."""
    async def run(request: Request) -> Response:
        try:
            if auth:
                service.check_key(request)
            return await handler(request)
        except APIError as error:
            return error_response(error)
        except ClientDisconnect:  # the client left (sending its body, or waiting for its reply): nobody reads this
            return Response(status_code=400)
        except Exception:
            log.exception("internal error on %s %s", request.method, request.url.path)
            return error_response(APIError(500, "internal server error; the server's log has the details"))
    return run


async def page(request: Request) -> Response:
    """The web page (static/index.html), which talks to /v1/chat/completions from the browser."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def route_error(request: Request, error: HTTPException) -> Response:
    """Unknown paths (404) and methods (405), in OpenAI's error shape."""
    message = f"no route {request.method} {request.url.path}" if error.status_code == 404 else \
        f"{request.method} is not allowed on {request.url.path}"
    return error_response(APIError(error.status_code, message, None, "not_found" if error.status_code == 404 else
                                   "method_not_allowed"))


def build_app(pipe: Qwen2Audio, scheduler: Scheduler, config: ServerConfig) -> Starlette:
    """The ASGI app; the scheduler's thread starts with the app (lifespan) and stops with it."""
    service = Service(pipe, scheduler, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()
            service.pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        # The web page, unauthenticated like /health (it asks for the key itself); the Guard limits callers to
        # this server's own pages.
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/health", endpoint(service, service.health, auth=False), methods=["GET"]),
        Route("/v1/models", endpoint(service, service.models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(service, service.chat_completions), methods=["POST"]),
        Route("/v1/audio/transcriptions", endpoint(service, service.transcriptions), methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, loopback_only=config.loopback_only)],
                     exception_handlers={HTTPException: route_error}, lifespan=lifespan)
