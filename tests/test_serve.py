"""`qwen2audio serve` as clients meet it: the real `openai` package over 127.0.0.1, replies equal to `pipe.chat` on
the same input, and 32 concurrent requests of different lengths batched together, each equal to its reply alone."""

import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from helpers import test_signal, wav_bytes
from serve_helpers import KEY, NAME, b64, request, start
from tokenizer_fixture import model_folder

import qwen2audio
from qwen2audio.chat_template import apply_chat_template, base_prompt
from qwen2audio.generate import GenerationOptions
from qwen2audio.prefix import CachedPrefix
from qwen2audio.serve.scheduler import Job
from qwen2audio.serve.schema import ASR_PROMPT


pytestmark = pytest.mark.usefixtures("module_on_one_thread")


@pytest.fixture(scope="module")
def work(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_folder(tiny_checkpoint, root / "model")
    for i, seconds in enumerate((1.5, 0.7, 2.3, 1.1)):
        (root / f"{i}.wav").write_bytes(wav_bytes(test_signal(seconds, seed=i)))
    return root


@pytest.fixture(scope="module")
def pipe(work):
    return qwen2audio.load(work / "model", quiet=True)


@pytest.fixture(scope="module")
def server(pipe):
    running = start(pipe, max_batch=8, max_queue=8, defaults={"max_new_tokens": 12})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def audio_message(work, i: int, text: str, kind: str = "input_audio") -> dict:
    data = b64((work / f"{i}.wav").read_bytes())
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}} if kind == "input_audio" else \
        {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}}
    return {"role": "user", "content": [part, {"type": "text", "text": text}]}


def local_message(work, i: int, text: str) -> dict:
    """The same message as the pipeline takes it (a path)."""
    return {"role": "user", "content": [{"type": "audio", "audio_url": str(work / f"{i}.wav")},
                                        {"type": "text", "text": text}]}


@pytest.mark.parametrize("kind", ["input_audio", "audio_url"])
def test_chat_with_audio_equals_the_pipeline(work, pipe, client, kind):
    reply = client.chat.completions.create(model=NAME, messages=[audio_message(work, 0, "What is it?", kind)],
                                           max_tokens=10, temperature=0)
    expected = pipe.chat([local_message(work, 0, "What is it?")], max_new_tokens=10, do_sample=False)
    assert expected and reply.choices[0].message.content == expected
    assert reply.object == "chat.completion" and reply.model == NAME and reply.id.startswith("chatcmpl-")
    prompt = apply_chat_template([local_message(work, 0, "What is it?")], add_generation_prompt=True)
    ids = pipe.inputs(prompt, [str(work / "0.wav")])["input_ids"]
    assert reply.usage.prompt_tokens == ids.shape[1]  # the audio tokens counted
    assert int((ids == pipe.processor.audio_token_id).sum()) == 37  # 1.5 s: 37 audio tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_with_usage_and_a_system_prompt(work, pipe, client):
    conversation = [{"role": "system", "content": "Answer briefly."}, audio_message(work, 2, "And this?")]
    stream = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    expected = pipe.chat([conversation[0], local_message(work, 2, "And this?")], max_new_tokens=9, do_sample=False)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # it came in pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens <= 9
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_and_text_only_messages(pipe, client):
    messages = [{"role": "user", "content": "Say something long."}]
    full = pipe.chat(messages, max_new_tokens=12, do_sample=False)
    stop = full[6:9]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_transcription_and_models_list(work, pipe, client):
    with open(work / "1.wav", "rb") as f:
        result = client.audio.transcriptions.create(model=NAME, file=f, language="en")
    expected = pipe.complete(base_prompt(f"{ASR_PROMPT} <|en|>"), [str(work / "1.wav")], max_new_tokens=12,
                             do_sample=False)
    assert result.text == expected and result.usage.output_tokens <= 12
    with open(work / "1.wav", "rb") as f:
        text = client.audio.transcriptions.create(model=NAME, file=f, response_format="text")
    assert text == pipe.complete(base_prompt(ASR_PROMPT), [str(work / "1.wav")], max_new_tokens=12, do_sample=False)
    assert [m.id for m in client.models.list()] == [NAME]


def test_32_requests_from_8_clients_share_decode_steps(work, pipe, client, server, caplog):
    """Different prompts, lengths and options (greedy and seeded sampling) at once: each reply equals the same
    request run alone through the pipeline, and the log shows requests decoded in the same steps."""
    cases = []
    for i in range(32):
        options = dict(max_tokens=3 + (i * 7) % 17, temperature=0)
        if i % 4 == 3:
            options = dict(options, temperature=0.8, top_p=0.9, seed=i, extra_body={"top_k": 50})
        text = "Describe it." + " Please." * (i % 5)
        cases.append((audio_message(work, i % 4, text) if i % 3 else {"role": "user", "content": text}, options,
                      local_message(work, i % 4, text) if i % 3 else {"role": "user", "content": text}))
    expected = []
    for _, o, local in cases:
        sampled = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=o["seed"]) if "seed" in o else \
            dict(do_sample=False)
        expected.append(pipe.chat([local], max_new_tokens=o["max_tokens"], **sampled))

    def ask(case) -> str:
        message, options, _ = case
        reply = client.chat.completions.create(model=NAME, messages=[message], **options)
        return reply.choices[0].message.content

    caplog.set_level(logging.DEBUG, logger="qwen2audio.serve")
    with ThreadPoolExecutor(8) as clients:
        replies = list(clients.map(ask, cases))
    assert replies == expected
    shared = [int(n) for n in re.findall(r"decode step \d+: (\d+) requests", caplog.text)]
    finished = re.findall(r"request \S+: \d+ prompt \+ \d+ completion tokens", caplog.text)
    assert len(finished) == 32 and max(shared) >= 4, max(shared)
    assert sum(shared) == sum(int(n) for n in re.findall(r"\+ (\d+) completion tokens", caplog.text)) - 32
    assert all(row is None for row in server.scheduler.rows)


def test_the_next_turn_prefills_only_its_new_tokens(work, pipe, client, caplog):
    """A conversation's second turn finds its first (prompt and reply) in the row that served it, and prefills only
    what is new; the reply equals the pipeline's on the whole conversation computed from scratch."""
    caplog.set_level(logging.DEBUG, logger="qwen2audio.serve")
    first = [audio_message(work, 3, "What is it?")]
    answer = client.chat.completions.create(model=NAME, messages=first, max_tokens=6, temperature=0)
    reply = answer.choices[0].message.content
    second = client.chat.completions.create(model=NAME, messages=[
        *first, {"role": "assistant", "content": reply}, audio_message(work, 1, "And now?")], max_tokens=6,
        temperature=0)
    prefills = re.findall(r"prefilled (\d+) tokens into row \d+, (\d+) more found there", caplog.text)
    new, found = map(int, prefills[-1])
    assert found >= answer.usage.prompt_tokens and new + found == second.usage.prompt_tokens
    pipe.forget_prefixes()  # the reference: every token of the conversation prefilled
    local = [local_message(work, 3, "What is it?"), {"role": "assistant", "content": reply},
             local_message(work, 1, "And now?")]
    assert second.choices[0].message.content == pipe.chat(local, max_new_tokens=6, do_sample=False)
    assert pipe.last_stats["cached_tokens"] == 0


def test_a_request_takes_the_row_holding_most_of_its_prompt_unless_steps_widen_for_little(server):
    scheduler = server.scheduler  # every row is free between tests; eager steps run rows 0 .. the last in use
    ids = torch.arange(10, 400)[None]  # a text-only prompt of 390 tokens
    job = Job({"input_ids": ids}, None, (), lambda event: None)
    saved = list(scheduler.held)
    try:
        scheduler.held[:] = [CachedPrefix(ids[0, :20], [])] * len(saved)  # every row: the first 20 tokens
        scheduler.held[5] = CachedPrefix(ids[0, :300], [])  # row 5: a history of 300, worth 5 more rows per step
        assert scheduler._row_for(job)[:2] == (5, 300)
        scheduler.held[5] = CachedPrefix(ids[0, :60], [])  # 40 more than row 0: not worth them
        assert scheduler._row_for(job)[:2] == (0, 20)
    finally:
        scheduler.held[:] = saved


def test_requests_arriving_together_are_prefilled_one_per_decode_step(server, caplog):
    """Three prompts waiting at once: the first is prefilled, then every decode step is preceded by at most one
    prefill, so the replies already started get a token between the later prefills (before, all three prefills ran
    back to back); each reply is its full length."""
    scheduler, done = server.scheduler, []
    options = GenerationOptions(max_new_tokens=4, min_new_tokens=4)
    jobs = [Job({"input_ids": torch.arange(10 + i, 40 + 9 * i)[None]}, options, (),
                lambda event: done.append(event) if event[0] == "done" else None) for i in range(3)]
    caplog.set_level(logging.DEBUG, logger="qwen2audio.serve")
    with scheduler.wake:  # all three waiting before the model thread looks
        scheduler.pending.extend(jobs)
        scheduler.wake.notify()
    deadline = time.monotonic() + 60
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    events = re.findall(r"(prefilled|decode step) \d", caplog.text)
    assert [e[3] for e in done] == [4, 4, 4]
    assert events[:6] == ["prefilled", "decode step"] * 3, events
    assert events.count("decode step") == 5, events  # the last, prefilled before step 3, needs steps 3, 4 and 5


def test_the_command_serves_until_stopped(work, tmp_path):
    """`qwen2audio serve` for real: port 0, the URL printed, /health and /v1/models answered, a key required; with
    --open, the web page handed to Python's webbrowser, which runs $BROWSER: here a script noting the URL."""
    opened = tmp_path / "opened.txt"
    (tmp_path / "browser.py").write_text(f"import os, sys\nopen({str(opened)!r} + '.part', 'w').write(sys.argv[1])\n"
                                         f"os.replace({str(opened)!r} + '.part', {str(opened)!r})\n")
    command = [sys.executable, "-m", "qwen2audio", "serve", "--model", str(work / "model"), "--port", "0",
               "--api-key", KEY, "--served-model-name", "mine", "--quiet", "--open"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BROWSER": f"{sys.executable} {tmp_path / 'browser.py'} %s"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)", process.stderr.readline())):
            assert process.poll() is None, process.stderr.read()
        port = int(found.group(1))
        for _ in range(600):  # until uvicorn accepts connections
            try:
                status, _ = request(port, "GET", "/health", key=None)
                break
            except ConnectionError:
                time.sleep(0.05)
        assert status == 200
        assert request(port, "GET", "/v1/models")[1]["data"][0]["id"] == "mine"
        assert request(port, "GET", "/v1/models", key=None)[0] == 401
        for _ in range(600):
            if opened.exists():
                break
            time.sleep(0.05)
        assert opened.read_text() == f"http://127.0.0.1:{port}/"
        status, page = request(port, "GET", "/", key=None)
        assert status == 200 and "<title>qwen2audio</title>" in page
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says SIGTERM
        assert process.wait(timeout=30) in (0, -15), process.stderr.read()

