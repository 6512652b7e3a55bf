"""Headless Chromium driven through Selenium, and what the web tests do with the page, as a person would.

Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them); the microphone is Chromium's fake
capture device, fed from a WAV file and allowed without a prompt.
"""

import base64
import os
import re
import shutil

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = [
    "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--window-size=900,720",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",  # the microphone: allowed, fake
]
WAIT_S = 60  # the longest any one step may take (a reply of a few tokens takes well under a second)


def start_chromium(profile: str, microphone_wav: str) -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("the web tests need Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--use-file-for-fake-audio-capture={microphone_wav}"]:
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return webdriver.Chrome(options=options, service=Service(driver))


def wait(driver: webdriver.Chrome, condition, message: str = ""):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.02).until(lambda d: condition(), message)


def element(driver: webdriver.Chrome, id: str):
    return driver.find_element(By.ID, id)


def js(driver: webdriver.Chrome, script: str, *args):
    return driver.execute_script(script, *args)


def fill(driver: webdriver.Chrome, id: str, value: str) -> None:
    """Types value into a field, as a person would (select all, type over it)."""
    field = element(driver, id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value)


def set_settings(driver: webdriver.Chrome, values: dict[str, str]) -> None:
    """Opens Settings, types each value into the field of that id, closes Settings again."""
    summary = element(driver, "settings").find_element(By.TAG_NAME, "summary")
    if not element(driver, "settings").get_property("open"):
        summary.click()
    for id, value in values.items():
        fill(driver, id, value)
    summary.click()  # the field loses the focus: its change event


def open_page(driver: webdriver.Chrome, url: str, key: str, max_tokens: int, model: str) -> None:
    """The page, freshly loaded with these settings kept in the browser's storage, where the page keeps the ones a
    person types in: temperature 0 (greedy), max new tokens, the API key."""
    driver.get(url)
    js(driver, "localStorage.clear(); localStorage.setItem('qwen2audio.temperature', '0'); "
               "localStorage.setItem('qwen2audio.max-tokens', arguments[0]); "
               "sessionStorage.setItem('qwen2audio.api-key', arguments[1]);", str(max_tokens), key)
    driver.refresh()
    wait(driver, lambda: element(driver, "model").text == model, "the page did not connect")


def add_file(driver: webdriver.Chrome, path: str) -> None:
    element(driver, "file").send_keys(str(path))  # the hidden file input behind "Add file"


def type_and_send(driver: webdriver.Chrome, text: str) -> None:
    element(driver, "text").send_keys(text, Keys.ENTER)


def replies(driver: webdriver.Chrome) -> list[str]:
    """The text of every reply, exactly (textContent keeps every space and newline)."""
    return js(driver, "return [...document.querySelectorAll('.turn.assistant .text')].map(e => e.textContent)")


def turn_roles(driver: webdriver.Chrome) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('.turn')].map(e => e.classList[1])")


def wait_for_replies(driver: webdriver.Chrome, n: int) -> list[str]:
    """Waits until n replies are shown and none is still streaming; returns them."""
    wait(driver, lambda: js(driver, "return document.querySelectorAll('.turn.assistant').length === arguments[0] "
                                    "&& !document.querySelector('.streaming')", n), f"no reply {n}")
    return replies(driver)


def watch_last_reply(driver: webdriver.Chrome) -> None:
    """Records the text of the newest reply every time the page changes it (read back by `reply_growth`)."""
    js(driver, """
        window.growth = [];
        new MutationObserver(() => {
          const texts = document.querySelectorAll('.turn.assistant .text');
          const text = texts.length ? texts[texts.length - 1].textContent : '';
          if (text && text !== window.growth[window.growth.length - 1]) window.growth.push(text);
        }).observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true});
    """)


def reply_growth(driver: webdriver.Chrome) -> list[str]:
    return js(driver, "return window.growth")


def clip_bytes(driver: webdriver.Chrome, selector: str) -> bytes:
    """The bytes behind an <audio> player of the page (its blob: URL), read in the page."""
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.querySelector(arguments[0]).src).then(r => r.arrayBuffer()).then(buffer => {
          let text = '';
          new Uint8Array(buffer).forEach(byte => text += String.fromCharCode(byte));
          done(btoa(text));
        });
    """, selector)
    return base64.b64decode(data)


def error_text(driver: webdriver.Chrome) -> str | None:
    """The error the page shows, or None."""
    return None if element(driver, "error").get_attribute("hidden") is not None else element(driver, "error-text").text


def is_stale(element) -> bool:
    """Whether the element has left the page."""
    try:
        element.is_displayed()
        return False
    except StaleElementReferenceException:
        return True


def luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a CSS rgb() colour."""
    channels = [int(c) / 255 for c in re.findall(r"\d+", colour)[:3]]
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(foreground: str, background: str) -> float:
    """WCAG 2 contrast ratio: (L1 + 0.05) / (L2 + 0.05), the lighter colour's luminance over the darker's."""
    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)
