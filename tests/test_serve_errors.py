"""The server under bad, hostile and impatient clients: every error with its status and OpenAI's error body, never a
500 or a traceback, no file of the machine readable through a request, limits enforced, a full server answering 429,
and clients that leave mid-stream freeing their rows while the server keeps serving."""

import http.client
import json
import logging
import time

import pytest
import torch
from helpers import test_signal, wav_bytes
from serve_helpers import KEY, NAME, assert_error, b64, multipart, request, start
from tokenizer_fixture import model_folder

import qwen2audio

WAV = b64(wav_bytes(test_signal(0.5)))
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = qwen2audio.load(model_folder(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "model"), quiet=True)
    running = start(pipe, max_batch=2, max_queue=1, context=256, max_body_bytes=1 << 20)
    yield running
    running.stop()
    torch.set_num_threads(before)


def chat(content: object = "hi", **fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def audio_part(url: str) -> list[dict]:
    return [{"type": "audio_url", "audio_url": {"url": url}}]


P0 = "messages[0].content[0]"
BAD_REQUESTS = [
    (chat([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]), 400,
     f"{P0}.input_audio.data"),
    (chat([{"type": "input_audio", "input_audio": {"data": b64(b"hello, not audio"), "format": "wav"}}]), 400, P0),
    (chat([{"type": "input_audio", "input_audio": {"data": WAV, "format": "midi"}}]), 400, f"{P0}.input_audio.format"),
    (chat(audio_part("/etc/passwd")), 400, f"{P0}.audio_url"),
    (chat(audio_part("file:///etc/passwd")), 400, f"{P0}.audio_url"),
    (chat(audio_part("http://127.0.0.1:9/a.wav")), 400, P0),  # downloads are off unless --allow-audio-urls
    (chat(audio_part("data:audio/wav;base64,@@@")), 400, P0),
    (chat([{"type": "image_url", "image_url": {"url": "x"}}]), 400, P0),
    (chat(audio_part(f"data:audio/wav;base64,{b64(wav_bytes(test_signal(21.0)))}")), 400, P0),  # > 20 s
    (chat(temperature=-1), 400, "temperature"), (chat(temperature="hot"), 400, "temperature"),
    (chat(top_p=0), 400, "top_p"), (chat(max_tokens=0), 400, "max_tokens"), (chat(seed=-5), 400, "seed"),
    (chat(max_tokens=True), 400, "max_tokens"), (chat(stop=[""]), 400, "stop"), (chat(n=2), 400, "n"),
    (chat(top_k=-2), 400, "top_k"), (chat(repetition_penalty=0), 400, "repetition_penalty"),
    (chat(frobnicate=1), 400, "frobnicate"), (chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (chat(max_tokens=250), 400, "max_tokens"),  # the prompt + 250 exceed the 256-token context
    (chat("<|AUDIO|> in the text, but no clip"), 400, "messages"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    (dict(chat(), model="gpt-4o"), 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS)
def test_bad_requests(server, body, status, param):
    error = assert_error(request(server.port, "POST", CHAT, body), status, param)
    assert "root:" not in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"[" * 100_000, b""])
def test_bodies_that_are_not_a_request(server, raw):
    assert_error(request(server.port, "POST", CHAT, raw), 400)


@pytest.mark.parametrize("fields, file, status, param", [
    ({"model": NAME}, None, 400, "file"),
    ({"model": "whisper-1"}, wav_bytes(test_signal(0.5)), 404, "model"),
    ({"model": NAME, "response_format": "srt"}, wav_bytes(test_signal(0.5)), 400, "response_format"),
    ({"model": NAME, "language": "English"}, wav_bytes(test_signal(0.5)), 400, "language"),
    ({"model": NAME, "temperature": "warm"}, wav_bytes(test_signal(0.5)), 400, "temperature"),
    ({"model": NAME, "timestamp_granularities[]": "word"}, wav_bytes(test_signal(0.5)), 400, None),
    ({"model": NAME}, b"RIFF not really", 400, "file"),
])
def test_bad_transcription_requests(server, fields, file, status, param):
    body, headers = multipart(fields, file)
    assert_error(request(server.port, "POST", "/v1/audio/transcriptions", body, headers=headers), status, param)


def test_transcription_needs_a_multipart_form(server):
    assert_error(request(server.port, "POST", "/v1/audio/transcriptions", chat()), 400)
    body, headers = multipart({"model": NAME}, wav_bytes(test_signal(0.5)))
    status, reply = request(server.port, "POST", "/v1/audio/transcriptions", body, headers=headers)
    assert status == 200 and isinstance(reply["text"], str)


def test_no_local_file_is_read_or_quoted(server, tmp_path):
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"RIFF-SECRET-CONTENTS" * 10)
    for url in (str(secret), f"file://{secret}", f"../../../../{secret}"):
        error = assert_error(request(server.port, "POST", CHAT, chat(audio_part(url))), 400)
        assert "SECRET" not in error["message"] and str(secret) not in error["message"]


def test_api_key_routes_and_methods(server):
    assert_error(request(server.port, "GET", "/v1/models", key=None), 401)
    assert_error(request(server.port, "POST", CHAT, chat(), key="wrong"), 401)
    assert request(server.port, "GET", "/health", key=None) == (200, {"status": "ok"})
    assert_error(request(server.port, "GET", "/v1/nothing"), 404)
    assert_error(request(server.port, "GET", CHAT), 405)
    status, body = request(server.port, "POST", CHAT, chat())
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_body_over_the_limit_is_refused_unread(server):
    big = json.dumps(chat([{"type": "input_audio", "input_audio": {"data": "A" * (2 << 20), "format": "wav"}}]))
    assert_error(request(server.port, "POST", CHAT, big.encode()), 413)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # no Content-Length: chunked
    connection.request("POST", CHAT, body=(big[i:i + 65536].encode() for i in range(0, len(big), 65536)),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                       encode_chunked=True)
    assert connection.getresponse().status == 413
    connection.close()


def test_other_sites_and_host_names_are_refused(server):
    assert_error(request(server.port, "GET", "/v1/models", headers={"Origin": "http://evil.example"}), 403)
    assert_error(request(server.port, "GET", "/health", headers={"Host": "evil.example"}), 403)
    same = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert request(server.port, "GET", "/v1/models", headers=same)[0] == 200


def open_stream(port: int, tokens: int = 200) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = chat("Talk.", max_tokens=tokens, min_tokens=tokens, stream=True)
    connection.request("POST", CHAT, body=json.dumps(body),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")  # the role chunk
    return connection, response


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_server_429_then_disconnects_free_the_rows(server, caplog):
    """2 rows + 1 queue place: a 4th request gets a 429 with Retry-After; clients that leave mid-stream free their
    rows at once (the 200-token replies are far from done), and the server goes on serving."""
    caplog.set_level(logging.INFO, logger="qwen2audio.serve")
    streams = [open_stream(server.port) for _ in range(3)]
    wait_until(lambda: all(server.scheduler.rows))
    assert_error(request(server.port, "POST", CHAT, chat()), 429)
    for connection, response in streams:
        assert response.readline()  # the streams are moving
        connection.close()
    wait_until(lambda: not any(server.scheduler.rows) and not server.scheduler.pending)
    assert caplog.text.count("client gone") >= 2
    status, body = request(server.port, "POST", CHAT, chat())
    assert status == 200 and body["usage"]["completion_tokens"] <= 2


def test_a_client_leaving_a_plain_request_frees_its_row(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", CHAT, body=json.dumps(chat("Talk.", max_tokens=200, min_tokens=200)),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_until(lambda: any(server.scheduler.rows))
    connection.close()
    wait_until(lambda: not any(server.scheduler.rows))
    assert request(server.port, "POST", CHAT, chat())[0] == 200
