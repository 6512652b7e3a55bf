"""Result files: one JSON line per item, appended as replies come, merged in data-file order at the end.

A result line: {"id", "line", "source", "audio", "prompt", "reply", "reference", "score"}. While a run is going
each rank appends to its own part file (`OUT.rank<r>`; a single process appends to OUT itself); rank 0 then writes
OUT whole, in the order of the data file, and removes the part files. `--resume` reads OUT and any part files an
interrupted run left, and skips the items found there.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import EvalError


def part_path(out: Path, rank: int, world: int) -> Path:
    return out if world == 1 else out.with_name(f"{out.name}.rank{rank}")


def leftover_parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.rank*"))


def _read_rows(path: Path, warn) -> list[dict]:
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            if not isinstance(row, dict) or "id" not in row or "reply" not in row:
                raise ValueError("not a result line")
        except ValueError:  # e.g. the last line of a run that was killed mid-write: that item is generated again
            warn(f"{path}:{number}: not a result line, ignored (its item will be evaluated again)")
            continue
        rows.append(row)
    return rows


def previous_results(out: Path, resume: bool, item_ids: set, warn) -> dict:
    """id -> result row from an earlier run (resume=True); without resume, earlier results are an error."""
    files = [p for p in [out, *leftover_parts(out)] if p.is_file() and p.stat().st_size > 0]
    if not resume:
        if files:
            raise EvalError(f"{files[0]} already holds results: pass --resume to continue that run, or choose "
                            "another --out")
        return {}
    done = {row["id"]: row for path in files for row in _read_rows(path, warn)}
    strangers = [i for i in done if i not in item_ids]
    if strangers:
        raise EvalError(f"{out} holds results for {len(strangers)} id(s) that the data file does not have (e.g. "
                        f"{strangers[0]!r}): is it the results file of another data set?")
    return done


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_results(out: Path, rows: Sequence[dict]) -> None:
    """OUT whole (through a temporary file and a rename, so it is never half written); part files removed."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    for part in leftover_parts(out):
        part.unlink()


def summary_path(out: Path) -> Path:
    return out.with_name((out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name) + ".summary.json")


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_summary(out: Path, report: dict) -> Path:
    """The run's settings and summary as JSON beside OUT (a value with no number, e.g. chat's, as null)."""
    path = summary_path(out)
    report = dict(report, summary=[dict(r, value=None if _is_nan(r["value"]) else r["value"])
                                   for r in report["summary"]])
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def format_table(summary: Sequence[dict]) -> str:
    """The summary rows as an aligned text table (values with 4 decimals, as the official scripts print)."""
    header = ("source", "items", "metric", "value")
    lines = [(r["source"], str(r["items"]), r["metric"],
              "-" if _is_nan(r["value"]) else f"{r['value']:.4f}")
             for r in summary]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines])
