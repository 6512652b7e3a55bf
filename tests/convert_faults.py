"""Runs conversions and interrupts them, for tests/test_hostile_convert.py: one process that imports qwen2audio once
and forks a child per case (a fresh process per case would pay torch's import each time; this process does no
torch computation before forking, so no thread pool is copied half-used).

    python tests/convert_faults.py CASES.json  ->  one JSON line: a result per case

A case: {"src", "dst", "dtype", "max_shard_size", "force", "signal_at" (a folder_swap step, "STEP" kills,
"STEP:STOP" stops the child there), "kill_after_s" (SIGKILL after that many seconds), "no_renameat2" (the fallback
of systems without it), "rlimit_fsize" (bytes: writes past it fail with EFBIG), "during" ("create": make dst with a
file of someone else's while the child is stopped; "fill": put a file into the empty dst; "fill-disk": fill the
disk dst is on)}. A result: {"killed", "exit", "error"}.
"""

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

from qwen2audio import folder_swap
from qwen2audio.convert import convert
from qwen2audio.errors import Qwen2AudioError


def child(case: dict, report: Path) -> None:
    os.environ.pop("QWEN2AUDIO_TEST_SIGNAL_AT", None)
    if case.get("signal_at"):
        os.environ["QWEN2AUDIO_TEST_SIGNAL_AT"] = case["signal_at"]
    if case.get("no_renameat2"):
        folder_swap._RENAMEAT2 = None  # what a system without renameat2 has: the journaled two-rename fallback
    if case.get("rlimit_fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["rlimit_fsize"], case["rlimit_fsize"]))
    code = 0
    try:
        convert(case["src"], case["dst"], dtype=case.get("dtype"), max_shard_size=case.get("max_shard_size", "2GB"),
                force=case.get("force", False))
    except Qwen2AudioError as e:
        report.write_text(f"{type(e).__name__}: {e}")
        code = 3
    except BaseException:
        report.write_text(traceback.format_exc())
        code = 4
    os._exit(code)


def interfere(case: dict) -> None:
    """What another process does at the destination while the child is stopped: make the folder, write into it, or
    fill the disk it is on."""
    dst = Path(case["dst"])
    if case["during"] == "fill-disk":
        with open(dst.parent / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                return
    if case["during"] == "create":
        dst.mkdir()
    (dst / "theirs.txt").write_text("someone else's file")


def run(case: dict, report: Path) -> dict:
    pid = os.fork()
    if pid == 0:
        child(case, report)
    if case.get("signal_at", "").endswith(":STOP"):
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            return {"killed": False, "exit": os.waitstatus_to_exitcode(status), "error": "never stopped"}
        interfere(case)
        os.kill(pid, signal.SIGCONT)
    elif case.get("kill_after_s") is not None:
        time.sleep(case["kill_after_s"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "exit": None if killed else os.waitstatus_to_exitcode(status),
            "error": report.read_text() if report.exists() else None}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for i, case in enumerate(cases):
        report = Path(sys.argv[1]).with_suffix(f".{i}.txt")
        report.unlink(missing_ok=True)
        results.append(run(case, report))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
