"""Shared by the hostile-input tests and fuzzers: run a call under a time bound and check that it is refused with
our error and a sentence naming the file or field."""

import threading

import pytest

from qwen2audio.errors import Qwen2AudioError


def bounded(fn, seconds: float = 10.0):
    """fn()'s result or exception, or a failure if it has not returned within `seconds` (a hang: a FIFO opened
    for reading, an endless loop). A hung call is left running in a daemon thread."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the call did not return within {seconds} s (a hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def refused(fn, error: type[Qwen2AudioError], *fragments: str) -> str:
    """Assert that fn() raises `error` (ours) within the time bound, with every fragment in its message."""
    with pytest.raises(error) as info:
        bounded(fn)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message
