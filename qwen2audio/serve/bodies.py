"""Reading request bodies within limits, and the event-stream response."""

from collections.abc import AsyncIterator, Callable

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, bad_request


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed the limit (its header, or the bytes so far):
    nothing past the limit is ever held in memory."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-mb)", None,
                       "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


class EventStream(StreamingResponse):
    """A text/event-stream response that calls on_close however it ends. A client that disconnects makes Starlette
    cancel the response, even before the generator's first step (when a `finally` inside it would never run)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def parse_form(request: Request, body: bytes) -> tuple[dict[str, str], bytes | None]:
    """A multipart form already read (within the body limit): its text fields, and the bytes of its one file."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data (a 'file' part, as OpenAI's API takes it)")

    async def chunks() -> AsyncIterator[bytes]:
        yield body
        yield b""

    parser = MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16, max_part_size=1 << 16)
    parser.spool_max_size = len(body) + 1  # keep the upload in memory: it is within the body limit already
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise bad_request(f"the multipart form cannot be read ({error.message})") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        return fields, await files[0].read() if files else None
    finally:
        await form.close()
