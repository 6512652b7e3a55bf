"""A real server on 127.0.0.1 (uvicorn in a thread of the test process) over a tiny random model, and raw HTTP."""

import base64
import http.client
import json
from dataclasses import dataclass


from qwen2audio.audio import AudioPolicy
from qwen2audio.serve.app import ServerConfig, build_app
from qwen2audio.serve.cli import start_in_thread
from qwen2audio.serve.prompts import Limits
from qwen2audio.serve.scheduler import Scheduler

NAME, KEY = "tiny-audio", "sekret"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Running:
    server: object  # uvicorn.Server
    port: int
    scheduler: Scheduler

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.thread.join(timeout=30)


def start(pipe, max_batch: int = 8, context: int = 512, max_queue: int = 8, max_body_bytes: int = 4 << 20,
          defaults: dict | None = None) -> Running:
    scheduler = Scheduler(pipe, max_batch, context)
    limits = Limits(context, AudioPolicy.strict(max_bytes=max_body_bytes, max_seconds=20.0), "truncate",
                    tuple((defaults or {}).items()))
    config = ServerConfig(NAME, limits, KEY, max_body_bytes, max_queue)
    server, port = start_in_thread(build_app(pipe, scheduler, config))
    return Running(server, port, scheduler)


def request(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
            headers: dict | None = None) -> tuple[int, dict | str]:
    """(status, the JSON body or the text) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        connection.close()


def assert_error(status_body: tuple[int, object], status: int, param: str | None = None) -> dict:
    """OpenAI's error body with the expected status (and param); returns the error object."""
    got, body = status_body
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def multipart(fields: dict[str, str], file: bytes | None) -> tuple[bytes, dict]:
    """(body, headers) of a multipart/form-data upload, as OpenAI's transcription endpoint takes it."""
    boundary = "qwen2audio-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                     f'Content-Type: audio/wav\r\n\r\n'.encode() + file + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
