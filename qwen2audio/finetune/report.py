"""What a run tells: a progress line on stderr and OUT/log.jsonl (rank 0 only), and the final summary.

log.jsonl holds one object per step, {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
"elapsed_s"}, and one per evaluation, {"step", "eval_loss"}. A resumed run keeps the lines up to its checkpoint's
step and continues after them.
"""

import json
import sys
import time
from pathlib import Path

LOG = "log.jsonl"


class Progress:
    def __init__(self, out: Path, total_steps: int, first_step: int, enabled: bool, quiet: bool) -> None:
        self.path, self.total, self.first = out / LOG, total_steps, first_step
        self.enabled, self.quiet = enabled, quiet
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = 1 if self.tty else max(1, total_steps // 20)  # a log file gets ~20 lines
        if enabled:
            self._keep_lines_up_to(first_step)

    def _keep_lines_up_to(self, step: int) -> None:
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str, end: str = "\n") -> None:
        if self.enabled and not self.quiet:
            sys.stderr.write(text + end)
            sys.stderr.flush()

    def step(self, record: dict) -> None:
        self.write(record)
        step = record["step"]
        if step % self.every and step != self.total:
            return
        done = step - self.first
        per_step = (time.perf_counter() - self.start) / max(done, 1)
        left = (self.total - step) * per_step
        line = (f"step {step}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['tokens_per_s']:.0f} tokens/s  {per_step:.2f} s/step  left {_duration(left)}")
        self.say("\r" + line if self.tty else line, end="" if self.tty and step != self.total else "\n")

    def eval(self, step: int, loss: float) -> None:
        self.write({"step": step, "eval_loss": loss})
        self.say(("\n" if self.tty else "") + f"step {step}: eval loss {loss:.4f}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_text(summary: dict) -> str:
    parts = [f"trained {summary['steps']} steps ({summary['examples']} examples, {summary['tokens']} tokens) in "
             f"{_duration(summary['seconds'])}", f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"]
    if summary.get("eval_loss") is not None:
        parts.append(f"eval loss {summary['eval_loss']:.4f}")
    parts.append(f"peak memory {summary['peak_memory_gb']:.2f} GiB")
    return "; ".join(parts) + "\n" + "\n".join(f"  {k}: {v}" for k, v in summary["outputs"].items())
