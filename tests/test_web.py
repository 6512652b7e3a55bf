"""The web page at `GET /`, used in a real headless Chromium against the server on 127.0.0.1 (a tiny random model):
files and the microphone in, replies streamed and equal to `pipe.chat` on the same conversation (greedy), Stop,
Regenerate, Clear, errors, a phone-width window and dark colours. (`qwen2audio serve --open`: tests/test_serve.py.)

One browser and one server serve every test; each test loads the page afresh. The server's scheduler keeps every
request it was given, so a test sees what the page sent and how each request ended.
"""

import base64
import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import (add_file, clip_bytes, contrast, element, error_text, is_stale, js, luminance, open_page, replies,
                     reply_growth, set_settings, start_chromium, turn_roles, type_and_send, wait, wait_for_replies,
                     watch_last_reply)
from helpers import test_signal, write_wav
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from serve_helpers import KEY, NAME, request
from tokenizer_fixture import model_folder

import qwen2audio
from qwen2audio.audio import AudioPolicy
from qwen2audio.serve.app import ServerConfig, build_app
from qwen2audio.serve.cli import page_url, start_in_thread
from qwen2audio.serve.prompts import Limits
from qwen2audio.serve.scheduler import Scheduler

MAX_TOKENS = 12  # what the page's settings ask for: short replies keep the tests fast
CONTEXT = 2048  # room for a long reply, for Stop to interrupt
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "web"  # screenshots (ignored by git)


class RecordingScheduler(Scheduler):
    """The server's scheduler, keeping each job it is given and the events sent for it."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.jobs = []

    def submit(self, job) -> None:
        job.events, emit = [], job.emit
        job.emit = lambda event: (job.events.append(event), emit(event))
        self.jobs.append(job)
        super().submit(job)


pytestmark = pytest.mark.usefixtures("module_on_one_thread")


@pytest.fixture(scope="module")
def work(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("web")
    model_folder(tiny_checkpoint, root / "model")
    write_wav(root / "clip.wav", test_signal(1.5, seed=3))
    (root / "broken.wav").write_bytes(b"this is not audio, whatever its name says\n" * 40)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("the microphone is fed speech from the espeak-ng program (apt-get install espeak-ng; .ci/run does)")
    subprocess.run([espeak, "-w", str(root / "speech.wav"), "What is the weather like in Paris today?"], check=True)
    return root


@pytest.fixture(scope="module")
def pipe(work):
    return qwen2audio.load(work / "model", quiet=True)


@pytest.fixture(scope="module")
def server(pipe):
    scheduler = RecordingScheduler(pipe, 2, CONTEXT)
    limits = Limits(CONTEXT, AudioPolicy.strict(max_bytes=8 << 20, max_seconds=30.0))
    server, port = start_in_thread(build_app(pipe, scheduler, ServerConfig(NAME, limits, KEY, 8 << 20)))
    server.port, server.url, server.scheduler = port, f"http://127.0.0.1:{port}/", scheduler
    yield server
    server.should_exit = True
    server.thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(work, tmp_path_factory):
    driver = start_chromium(str(tmp_path_factory.mktemp("chromium-profile")), str(work / "speech.wav"))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    open_page(browser, server.url, KEY, MAX_TOKENS, NAME)
    return browser


def user(text: str | None = None, clip: Path | None = None) -> dict:
    """A user message as the pipeline takes it."""
    content = [{"type": "audio", "audio_url": str(clip)}] if clip else []
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}


def chat(pipe, conversation: list[dict]) -> str:
    return pipe.chat(conversation, max_new_tokens=MAX_TOKENS, do_sample=False)


def test_a_file_and_a_question_stream_a_reply_equal_to_the_pipeline(page, work, pipe, server):
    add_file(page, work / "clip.wav")
    wait(page, lambda: js(page, "const a = document.querySelector('#attachments audio'); return a && a.readyState >= 1"))
    assert abs(js(page, "return document.querySelector('#attachments audio').duration") - 1.5) < 0.01  # it plays
    watch_last_reply(page)
    type_and_send(page, "What is it?")
    [reply] = wait_for_replies(page, 1)
    assert reply and reply == chat(pipe, [user("What is it?", work / "clip.wav")])
    growth = reply_growth(page)  # the reply as it was shown, each time it changed
    assert len(growth) >= 2 and growth[-1] == reply and all(b.startswith(a) for a, b in zip(growth, growth[1:]))
    assert turn_roles(page) == ["user", "assistant"]
    shown = js(page, "const t = document.querySelector('.turn.user'); return [t.querySelector('audio').duration, "
                     "t.querySelector('figcaption').textContent, t.querySelector('.text').textContent]")
    assert abs(shown[0] - 1.5) < 0.01 and shown[1:] == ["clip.wav", "What is it?"]
    assert "input_features" in server.scheduler.jobs[-1].inputs  # the server was sent the audio
    loaded = js(page, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(server.url) for name in loaded), loaded  # nothing from elsewhere


def test_a_dropped_file_joins_the_message(page, work):
    """A drop event carrying a file, as the browser sends it when a file is dragged onto the page."""
    page.execute_script("""
        const file = new File([Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0))], 'dropped.wav',
                              {type: 'audio/wav'});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById('conversation').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer,
                                                                                    bubbles: true}));
    """, base64.b64encode((work / "clip.wav").read_bytes()).decode())
    assert [e.text for e in page.find_elements(By.CSS_SELECTOR, "#attachments figcaption")] == ["dropped.wav"]
    assert clip_bytes(page, "#attachments audio") == (work / "clip.wav").read_bytes()
    assert element(page, "send").is_enabled()


def test_two_turns_send_the_whole_conversation_and_a_screenshot_is_saved(page, work, pipe):
    add_file(page, work / "clip.wav")
    type_and_send(page, "What is it?")
    [first] = wait_for_replies(page, 1)
    box = element(page, "text")
    box.send_keys("Is it loud?")
    ActionChains(page).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    box.send_keys("Answer briefly.")
    assert box.get_attribute("value") == "Is it loud?\nAnswer briefly." and len(turn_roles(page)) == 2  # not sent
    box.send_keys(Keys.ENTER)
    second = wait_for_replies(page, 2)[1]
    conversation = [user("What is it?", work / "clip.wav"), {"role": "assistant", "content": first},
                    user("Is it loud?\nAnswer briefly.")]
    assert second == chat(pipe, conversation)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(ARTIFACTS / "two-turns.png"))


def test_the_microphone_records_a_wav_and_the_server_answers_it(page, work, pipe, server):
    element(page, "record").click()
    wait(page, lambda: js(page, "return parseFloat(document.getElementById('level').style.width) > 0"), "no level")
    wait(page, lambda: element(page, "timer").text == "0:01", "the timer does not run")
    element(page, "record").click()
    wait(page, lambda: js(page, "return document.querySelectorAll('#attachments audio').length === 1"))
    recorded = clip_bytes(page, "#attachments audio")
    with wave.open(io.BytesIO(recorded)) as w:  # the page's own encoder: 16-bit PCM, mono, 16 kHz
        assert (w.getsampwidth(), w.getnchannels(), w.getframerate()) == (2, 1, 16000)
    path = work / "recorded.wav"
    path.write_bytes(recorded)
    samples = qwen2audio.load_audio(path)  # the built-in WAV reader, no decoder needed
    assert 1.0 <= len(samples) / 16000 <= 10 and np.sqrt(np.mean(samples ** 2)) > 0.01  # speech, not silence
    n = len(server.scheduler.jobs)
    element(page, "send").click()  # the recording alone is a turn
    [reply] = wait_for_replies(page, 1)
    assert reply == chat(pipe, [user(clip=path)])
    assert "input_features" in server.scheduler.jobs[n].inputs


def test_regenerate_replaces_the_last_reply(page, pipe, server):
    type_and_send(page, "Say something.")
    [first] = wait_for_replies(page, 1)
    asked = server.scheduler.jobs[-1].inputs["input_ids"]
    for temperature in ("0", "1"):  # greedy: the same reply again; sampled: another one
        set_settings(page, {"temperature": temperature})
        old = page.find_element(By.CSS_SELECTOR, ".turn.assistant")
        n = len(server.scheduler.jobs)
        element(page, "regenerate").click()
        wait(page, lambda: is_stale(old), "the old reply stayed")
        [reply] = wait_for_replies(page, 1)
        assert turn_roles(page) == ["user", "assistant"]
        assert torch.equal(server.scheduler.jobs[n].inputs["input_ids"], asked)  # the old reply is not in it
        assert reply == first if temperature == "0" else reply != first
    assert first == chat(pipe, [user("Say something.")])


def test_stop_ends_the_stream_and_the_server_frees_the_slot(page, pipe, server):
    set_settings(page, {"max-tokens": str(CONTEXT - 100)})
    n = len(server.scheduler.jobs)
    type_and_send(page, "Tell me a long story.")
    wait(page, lambda: (replies(page) or [""])[-1] != "", "the reply did not begin")
    element(page, "stop").click()
    [shown] = wait_for_replies(page, 1)
    assert page.find_element(By.CSS_SELECTOR, ".turn.assistant .status").text == "stopped"
    job = server.scheduler.jobs[n]
    wait(page, lambda: all(row is None for row in server.scheduler.rows), "the server kept the row")
    assert job.cancelled and not [e for e in job.events if e[0] != "text"]  # ended by the disconnect, not finished
    assert "".join(e[1] for e in job.events).startswith(shown)
    assert len(job.events) < CONTEXT - 200  # far short of the max_tokens asked for
    set_settings(page, {"max-tokens": str(MAX_TOKENS)})
    type_and_send(page, "And now?")  # the page and the server go on, the stopped reply in the history
    reply = wait_for_replies(page, 2)[1]
    conversation = [user("Tell me a long story."), {"role": "assistant", "content": shown}, user("And now?")]
    assert reply == chat(pipe, conversation)


def test_clear_empties_the_history(page, pipe, server):
    type_and_send(page, "Hello.")
    wait_for_replies(page, 1)
    type_and_send(page, "Again.")
    wait_for_replies(page, 2)
    element(page, "clear").click()
    assert turn_roles(page) == [] and element(page, "empty").is_displayed()
    assert not element(page, "regenerate").is_enabled() and not element(page, "clear").is_enabled()
    n = len(server.scheduler.jobs)
    type_and_send(page, "Fresh start.")
    [reply] = wait_for_replies(page, 1)
    assert reply == chat(pipe, [user("Fresh start.")])
    assert server.scheduler.jobs[n].inputs["input_ids"].shape[1] < server.scheduler.jobs[n - 1].inputs[
        "input_ids"].shape[1]  # only the new turn was sent


def test_a_server_error_is_shown_and_the_page_keeps_working(page, work, pipe):
    add_file(page, work / "broken.wav")
    type_and_send(page, "What is it?")
    wait(page, lambda: error_text(page), "no error shown")
    message = error_text(page)
    assert message.startswith("The server could not use “broken.wav”:") and "WAV" in message, message
    assert turn_roles(page) == []  # the failed turn is not in the conversation: it is back in the box
    assert element(page, "text").get_attribute("value") == "What is it?"
    assert [e.text for e in page.find_elements(By.CSS_SELECTOR, "#attachments figcaption")] == ["broken.wav"]
    page.find_element(By.CSS_SELECTOR, "#attachments .remove").click()
    element(page, "text").send_keys(Keys.ENTER)
    [reply] = wait_for_replies(page, 1)
    assert reply == chat(pipe, [user("What is it?")]) and error_text(page) is None


def test_without_the_key_the_page_says_so_then_connects(browser, server):
    browser.get(server.url)
    js(browser, "sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda: error_text(browser), "no error shown")
    assert "API key" in error_text(browser) and element(browser, "model").text == "not connected"
    set_settings(browser, {"api-key": KEY})  # typed in: the page connects with it
    wait(browser, lambda: element(browser, "model").text == NAME, "the page did not connect")
    assert error_text(browser) is None
    browser.refresh()  # the settings typed in are kept
    wait(browser, lambda: element(browser, "model").text == NAME, "the key was not kept")
    assert [element(browser, id).get_attribute("value") for id in ("temperature", "max-tokens", "api-key")] == \
        ["0", str(MAX_TOKENS), KEY]


def test_a_phone_width_window_and_both_colour_schemes(page):
    colours = "const s = getComputedStyle(document.documentElement); return [s.color, s.backgroundColor]"
    fits = "return document.documentElement.scrollWidth <= innerWidth && " \
           "document.getElementById('send').getBoundingClientRect().right <= innerWidth"
    page.set_window_size(390, 844)
    try:
        assert js(page, fits)  # nothing wider than the phone, the Send button on screen
        light = js(page, colours)
        page.execute_cdp_cmd("Emulation.setEmulatedMedia",
                             {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark = js(page, colours)
        assert luminance(dark[1]) < 0.05 < 0.8 < luminance(light[1])  # a dark page and a light one
        assert contrast(*light) >= 7 and contrast(*dark) >= 7  # text readable in both (WCAG AAA)
    finally:
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        page.set_window_size(900, 720)


def test_the_page_and_its_files_are_served(server):
    status, html = request(server.port, "GET", "/", key=None)
    assert status == 200 and '<script type="module" src="static/app.js">' in html
    for name in ("app.js", "api.js", "audio.js", "style.css"):
        status, text = request(server.port, "GET", f"/static/{name}", key=None)
        assert status == 200 and text
    assert request(server.port, "GET", "/static/missing.js", key=None)[0] == 404
    assert request(server.port, "GET", "/static/../app.py", key=None)[0] == 404


def test_the_page_address_for_each_bind():
    assert page_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert page_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"  # a wildcard: through the loopback
    assert page_url("::", 80) == "http://[::1]:80/" and page_url("::1", 80) == "http://[::1]:80/"
