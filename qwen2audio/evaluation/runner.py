"""`evaluate()`: one official benchmark data file through the model, scored the official way.

Each rank reads the whole data file, takes its contiguous share of the items not yet done, and generates in
batches with the official decoding: left-padded batches, greedy, max_new_tokens=256, min_new_tokens=1, every other
generation setting (the repetition penalty, the stop tokens) from the checkpoint's generation_config.json, as
transformers' generate() does for the official scripts; only the new tokens are decoded, special tokens skipped.
Rank 0 gathers the results, writes them in data-file order and prints the summary.
"""

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .data import BadItem, Item, decode_audio, read_items, resolve_decoder
from ..ranks import Ranks, barrier, broadcast, gather, setup, shard, teardown
from .errors import EvalError
from .results import append_rows, format_table, part_path, previous_results, write_results, write_summary
from .tasks import Task, asr_language, get_task

if TYPE_CHECKING:
    from ..pipeline import Qwen2Audio

OFFICIAL_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Run:
    task: Task
    data: Path
    out: Path
    language: str | None
    decoder: str
    batch_size: int
    max_new_tokens: int
    model: str
    ranks: Ranks
    log: Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def evaluate(task: str, data: str | Path, model: "str | Path | Qwen2Audio | None" = None,
             out: str | Path | None = None, *, batch_size: int | None = None, limit: int | None = None,
             resume: bool = False, language: str | None = None, audio_root: str | Path | None = None,
             audio_decoder: str = "auto", max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS, dtype: str | None = None,
             device: str = "cpu",
             load_options: dict | None = None, quiet: bool = False) -> list[dict]:
    """Evaluate `model` (a folder, a Hub repo id, a loaded `qwen2audio.Qwen2Audio`, or None for the task's official
    checkpoint) on one official jsonl file; returns the summary rows {"source", "items", "metric", "value"}.

    Results go to `out` (default: DATA_STEM.TASK.jsonl in the current folder) as they come, the summary to
    OUT_STEM.summary.json. Under torchrun the items are sharded over the ranks; every rank returns the summary.
    """
    spec = get_task(task)
    if any(v is not None and v < 1 for v in (batch_size, limit, max_new_tokens)):
        raise EvalError(f"batch_size, limit and max_new_tokens must be >= 1, got {batch_size}, {limit}, "
                        f"{max_new_tokens}")
    if language and spec.name != "asr":
        raise EvalError(f"language only applies to the asr task (its text normalisation), not to {spec.name}")
    ranks = setup(str(model.device) if hasattr(model, "generate") else device)
    log = (lambda text: None) if quiet or not ranks.is_main else _stderr
    data = Path(data)
    out = Path(out) if out is not None else Path(f"{data.stem}.{spec.name}.jsonl")
    try:
        items, bad = _read(spec, data, audio_root, limit, log)
        run = Run(spec, data, out, asr_language(str(data), items, language) if spec.name == "asr" else None,
                  resolve_decoder(audio_decoder), batch_size or spec.batch_size, max_new_tokens,
                  str(getattr(model, "path", None) or model or spec.model), ranks, log)
        return _evaluate(run, items, bad, model, resume, dtype, load_options or {})
    finally:
        teardown(ranks)


def _read(task: Task, data: Path, audio_root, limit: int | None, log) -> tuple[list[Item], list[BadItem]]:
    """The good items and the bad lines (reported now), with prompts the model cannot take counted as bad."""
    items, bad = read_items(data, task.name, audio_root, limit)
    good = []
    for item in items:
        try:
            task.check(item)
            good.append(item)
        except EvalError as e:
            bad.append(BadItem(str(data), item.line, str(e)))
    bad.sort(key=lambda b: b.line)
    for b in bad:
        log(f"bad item, skipped: {b}")
    if not good:
        raise EvalError(f"{data} has no usable item ({len(bad)} bad line(s))")
    return good, bad


def _evaluate(run: Run, items: list[Item], bad: list[BadItem], model, resume: bool, dtype: str | None,
              load_options: dict) -> list[dict]:
    done = previous_results(run.out, resume, {i.id for i in items}, run.log)
    run.out.parent.mkdir(parents=True, exist_ok=True)
    barrier(run.ranks)  # every rank has read the earlier results before any rank appends new ones
    todo = [i for i in items if i.id not in done]
    mine = [todo[k] for k in shard(len(todo), run.ranks.rank, run.ranks.world)]
    pipe = model if hasattr(model, "generate") else _load(run, dtype, load_options) if mine else None
    _header(run, pipe, len(items), len(done), len(bad))
    new_rows, failed = _generate(run, pipe, mine) if mine else ([], [])
    everything = gather((new_rows, failed), run.ranks)
    summary = None
    if run.ranks.is_main:
        summary = _finish(run, items, done, bad, everything)
    return broadcast(summary, run.ranks)


def _load(run: Run, dtype: str | None, load_options: dict):
    import qwen2audio

    pipe = qwen2audio.load(run.model, dtype=dtype, device=run.ranks.device, quiet=True, **load_options)
    if pipe.processor is None:
        raise EvalError(f"{run.model} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): copy them "
                        "from the Hub repo into the model folder")
    return pipe


def _header(run: Run, pipe, n_items: int, n_done: int, n_bad: int) -> None:
    g = getattr(pipe, "generation_config", None)
    penalty = getattr(g, "repetition_penalty", "?")
    prompt = ("ChatML: system 'You are a helpful assistant.' + the item's query" if run.task.name == "chat"
              else "<|audio_bos|><|AUDIO|><|audio_eos|> + the item's prompt (base-model format)")
    run.log(f"eval {run.task.name} of {run.model} on {run.data}: {n_items} items, {n_done} already done, {n_bad} "
            f"bad skipped; results -> {run.out}")
    run.log(f"decoding (official): {prompt}; greedy, max_new_tokens={run.max_new_tokens}, min_new_tokens=1, "
            f"repetition_penalty={penalty} and stop tokens from generation_config.json; left padding, batch size "
            f"{run.batch_size}; audio decoded by {run.decoder} at 16 kHz; {run.ranks.world} rank(s)"
            + (f"; language {run.language}" if run.language else ""))


def _decode_batch(run: Run, batch: Sequence[Item]) -> tuple[list[Item], list, list[BadItem]]:
    from ..errors import AudioError

    kept, clips, failed = [], [], []
    for item in batch:
        try:
            clips.append(decode_audio(item.audio_path, run.decoder))
            kept.append(item)
        except (AudioError, EvalError) as e:
            failed.append(BadItem(str(run.data), item.line, f"audio could not be decoded: {e}"))
            _stderr(f"bad item, skipped: {failed[-1]}")
    return kept, clips, failed


def _generate(run: Run, pipe, mine: Sequence[Item]) -> tuple[list[dict], list[BadItem]]:
    """This rank's items in batches; each batch's rows are appended to the rank's part file at once."""
    part = part_path(run.out, run.ranks.rank, run.ranks.world)
    rows, failed = [], []
    for start in range(0, len(mine), run.batch_size):
        batch, clips, bad = _decode_batch(run, mine[start:start + run.batch_size])
        failed += bad
        if not batch:
            continue
        prompts = [run.task.prompt(item) for item in batch]
        inputs = pipe.processor(text=prompts, audio=clips, padding=True)
        new_ids = pipe.generate(**inputs, max_new_tokens=run.max_new_tokens, min_new_tokens=1, do_sample=False)
        replies = pipe.tokenizer.batch_decode(new_ids.tolist(), skip_special_tokens=True)
        new = [_row(run, item, prompt, reply) for item, prompt, reply in zip(batch, prompts, replies)]
        append_rows(part, new)
        rows += new
        run.log(f"{run.task.name}: {start + len(batch)}/{len(mine)} items on rank {run.ranks.rank}")
    return rows, failed


def _row(run: Run, item: Item, prompt: str, reply: str) -> dict:
    return {"id": item.id, "line": item.line, "source": item.source, "audio": item.audio, "prompt": prompt,
            "reply": reply, "reference": item.reference,
            "score": run.task.score(reply, item.reference, run.language)}


def _finish(run: Run, items: list[Item], done: dict, bad: list[BadItem], everything: list) -> list[dict]:
    """Rank 0: all results in data-file order written to OUT, the summary printed and written beside it."""
    new = {row["id"]: row for rows, _ in everything for row in rows}
    failed = [b for _, fails in everything for b in fails]
    rows = [new.get(i.id) or done.get(i.id) for i in items]
    rows = [r for r in rows if r is not None]
    write_results(run.out, rows)
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    summary = [run.task.summarize(source, group) for source, group in by_source.items()]
    skipped = sorted(bad + failed, key=lambda b: b.line)
    report = {"task": run.task.name, "data": str(run.data), "model": run.model, "language": run.language,
              "decoder": run.decoder,
              "max_new_tokens": run.max_new_tokens, "batch_size": run.batch_size, "ranks": run.ranks.world,
              "bad_items": [str(b) for b in skipped], "summary": summary}
    write_summary(run.out, report)
    print(format_table(summary), flush=True)
    if skipped:
        print(f"skipped {len(skipped)} bad item(s): {'; '.join(str(b) for b in skipped[:3])}"
              + (" ..." if len(skipped) > 3 else ""), flush=True)
    return summary
