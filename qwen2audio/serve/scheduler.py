"""Continuous batching: one model thread owns a batch KV cache of max_batch rows and keeps every request moving.

Each turn of the thread's loop (1) prefills one request that arrived into a free row, alone into its row
(`cache.rows(i, i + 1)`), so a prompt never waits for another's padding, and (2) runs one decode step for all active
rows together. One prefill per turn: while a burst of new prompts is prefilled, the replies being written (the
burst's first ones included) get a token after each prefill instead of waiting for all of them; and requests that
arrived together end a step apart, so that clients sending their next request on the last one's end do not all
arrive together again. In the step, rows sit at different cache slots (input_pos is (B, 1)), which attention handles
exactly as if each were alone (tests/test_generate.py::test_rows_at_different_cache_slots_decode_as_if_alone). Each
row's logits go through its own GenerationOptions (its temperature, top-p, seed, penalties, stop ids), each row
stops on its own (eos, a stop string, max_tokens), and a row is freed as soon as its request ends or its client
disconnects. The event loop never waits on the model: jobs come in through `submit`, text goes out through each
job's `emit` callback.

Reuse: a freed row's cache still holds its request's prompt and reply (prefix.py). A new request takes the free row
that holds the longest beginning of its prompt, unless that row would widen every decode step for little (_row_for),
and prefills only the rest: the next turn of a conversation (which sends the whole history again) finds its previous
turn there, and any request finds at least the chat template's system prompt and opening.
"""

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generate import GenerationOptions, all_finite, decode_step, prefill, process_logits, sample, seen_token_mask
from ..model import causal_padding_mask
from ..pipeline import Qwen2Audio
from ..prefix import CachedPrefix, audio_after, held_prefix, reusable_length, window_spans
from ..tokenizer import StreamDecoder
from .errors import APIError

log = logging.getLogger("qwen2audio.serve")
# What one more row in every decode step costs, in prompt tokens to prefill (an estimate for the 7B on a 2-core
# Zen 4): a product of the 7B's widths takes about 0.1 ms more per row at 1-8 rows (2.9 ms at 1 row, 3.6 at 8;
# benchmarks/README.md), some 20 ms per step over its 225 products, 2 s over a 100-token reply: the prefill of
# about 50 tokens (13 GFLOP each at 360 GFLOP/s).
WIDER_STEP_TOKENS = 48
_ids = itertools.count(1)


class Job:
    """One request's generation. `emit` is called from the model thread with ("text", str), ("done", finish_reason,
    prompt_tokens, completion_tokens) or ("error", APIError); it must not block."""

    def __init__(self, inputs: dict[str, Tensor], options: GenerationOptions, stop: tuple[str, ...],
                 emit: Callable[[tuple], None]) -> None:
        self.id = f"{next(_ids)}"
        self.inputs, self.options, self.stop, self.emit = inputs, options, stop, emit
        self.cancelled = False  # set from the event loop (client gone); the model thread frees the row


class StopText:
    """Holds back text that may be the start of a stop string, so a stop string is never sent to the client."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held = stops, ""

    def put(self, piece: str) -> tuple[str, bool]:
        """(the text that can be sent now, whether a stop string was found: the text ends before it)"""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False


@dataclass
class Row:
    """A request's state while it holds a cache row (model thread only)."""
    job: Job
    slot: int  # the cache slot (and RoPE position) the next fed token is written to
    seen: Tensor  # (1, V) bool: ids in the prompt and the reply, for the repetition penalty
    eos: Tensor  # (n_eos,) stop ids
    generator: torch.Generator | None
    decoder: StreamDecoder
    stops: StopText
    spans: list[tuple[int, int]]  # (first position, tokens) of each audio window of the prompt
    fed: list[int] = field(default_factory=list)  # the generated tokens fed back so far (their keys are cached)
    token: int = 0  # the last token generated: the next step's input
    n: int = 0  # tokens generated
    peak: int = 1  # the most requests that shared one of its decode steps
    start: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, pipe: Qwen2Audio, max_batch: int, context: int) -> None:
        self.pipe, self.model, self.max_batch, self.context = pipe, pipe.model, max_batch, context
        self.cache = self.model.new_cache(max_batch, context)  # (max_batch, kv_heads, context, head_dim) per layer
        self.ones = torch.ones(max_batch, context, dtype=torch.bool, device=self.model.device)  # no row has padding
        self.rows: list[Row | None] = [None] * max_batch
        self.held: list[CachedPrefix | None] = [None] * max_batch  # what each free row's cache holds, for reuse
        self.pending: deque[Job] = deque()
        self.wake = threading.Condition()
        self.closing = False
        # A compiled decode step keeps one shape (all rows); eager decoding runs only up to the last active row.
        self.full_width = pipe.decode_fn is not decode_step
        self.thread = threading.Thread(target=self._run, name="qwen2audio-model", daemon=True)
        self.steps = 0  # decode steps run, for the log and the tests

    # -- the event loop's side ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.pending.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: the row (or the queue place) is freed before the next decode step."""
        job.cancelled = True
        with self.wake:
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # -- the model thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._wait_for_work()) is not None:
                for job in admitted:
                    i, cached, spans = self._row_for(job)
                    self._guarded([i], lambda: self._prefill(i, job, cached, spans))
                self._drop_cancelled()
                active = [i for i, row in enumerate(self.rows) if row]
                if active:
                    self._guarded(active, lambda: self._step(active))

    def _wait_for_work(self) -> list[Job] | None:
        """Block until there is something to do; take the first waiting job if a row is free (one prefill per turn:
        see the module's docstring). None: the server is closing."""
        with self.wake:
            while not self.closing and not self.pending and not any(self.rows):
                self.wake.wait()
            if self.closing:
                return None
            admitted = []
            free = sum(row is None for row in self.rows)
            while self.pending and not admitted and free:
                job = self.pending.popleft()
                if not job.cancelled:
                    admitted.append(job)
            return admitted

    def _row_for(self, job: Job) -> tuple[int, int, list[tuple[int, int]]]:
        """(a free row for the job, how many tokens of its prompt that row's cache holds already, the prompt's audio
        windows). Each free row scores the tokens it holds, less WIDER_STEP_TOKENS for each row an eager decode step
        would grow by (it runs every row up to the last one in use); the best, and the first of equals."""
        ids, inputs = job.inputs["input_ids"][0], job.inputs
        spans = window_spans(ids, self.model.cfg.audio_token_index, inputs.get("feature_attention_mask"))
        width = self._step_width()
        free = [i for i, row in enumerate(self.rows) if row is None]
        cached = {i: reusable_length(self.held[i], ids, spans, inputs.get("input_features")) for i in free}
        i = max(free, key=lambda i: (cached[i] - WIDER_STEP_TOKENS * max(0, i + 1 - width), -i))
        return i, cached[i], spans

    def _step_width(self) -> int:
        """The rows a decode step runs: all of them when compiled (one shape), else every row up to the last in use."""
        return self.max_batch if self.full_width else max((i + 1 for i, row in enumerate(self.rows) if row), default=0)

    def _guarded(self, indices: list[int], work: Callable[[], None]) -> None:
        """Run work; if it fails, end the requests of those rows with a 500 (logged with its traceback) and go on."""
        try:
            work()
        except Exception as error:
            log.exception("the model failed on rows %s", indices)
            message = str(error) if isinstance(error, APIError) else "the model failed on this request; see the log"
            for i in indices:
                if self.rows[i] is not None:
                    self.rows[i].job.emit(("error", error if isinstance(error, APIError) else APIError(500, message)))
                    self.rows[i] = None

    def _prefill(self, i: int, job: Job, cached: int, spans: list[tuple[int, int]]) -> None:
        """Prefill the job's prompt into row i from slot `cached` on (slots before it hold the prompt's beginning)."""
        device, o = self.model.device, job.options
        ids = job.inputs["input_ids"].to(device)  # (1, T)
        self.held[i] = None  # overwritten from here on
        self.rows[i] = Row(job, ids.shape[1], seen_token_mask(ids, torch.ones_like(ids), self.model.cfg.vocab_size),
                           torch.tensor(o.eos_token_ids, dtype=torch.long, device=device),
                           None if o.seed is None else torch.Generator(device=device).manual_seed(o.seed),
                           self.pipe.tokenizer.stream(skip_special_tokens=True), StopText(job.stop), spans)
        audio = {k: None if v is None else v.to(device) for k, v in audio_after(job.inputs, spans, cached).items()}
        logits = prefill(self.model, ids[:, cached:], self.ones[:1], self.cache.rows(i, i + 1),
                         audio.get("input_features"), audio.get("feature_attention_mask"), start=cached)  # (1, V)
        log.debug("request %s: prefilled %d tokens into row %d, %d more found there", job.id, ids.shape[1] - cached,
                  i, cached)
        self._advance(i, logits, 1)

    def _drop_cancelled(self) -> None:
        for i, row in enumerate(self.rows):
            if row is not None and row.job.cancelled:
                log.info("request %s: client gone after %d tokens; row %d freed", row.job.id, row.n, i)
                self._free(i)

    def _free(self, i: int) -> None:
        """Row i's request has ended: the row is free, and keeps what its cache holds for a later request."""
        row, self.rows[i] = self.rows[i], None
        self.held[i] = held_prefix(row.job.inputs["input_ids"][0], row.fed, row.spans,
                                   row.job.inputs.get("input_features"))

    def _step(self, active: list[int]) -> None:
        """One decode step for every active row, each at its own slot; then each row's next token."""
        width = self._step_width()
        # Rows outside `active` are free: each writes the slot just past what its cache holds, which no one reads.
        slots = [len(held.ids) if held else 0 for held in self.held[:width]]
        tokens = [0] * width
        for i in active:
            tokens[i], slots[i] = self.rows[i].token, self.rows[i].slot
        device = self.model.device
        tokens = torch.tensor(tokens, device=device)[:, None]  # (width, 1)
        input_pos = torch.tensor(slots, device=device)[:, None]  # (width, 1): positions equal slots, no padding
        mask = causal_padding_mask(self.ones[:width], input_pos, self.context)  # (width, 1, 1, context)
        cache = self.cache if width == self.max_batch else self.cache.rows(0, width)
        logits = self.pipe.decode_fn(self.model, tokens, input_pos, cache, input_pos, mask)  # (width, V)
        self.steps += 1
        log.debug("decode step %d: %d requests (%s) in rows %s", self.steps, len(active),
                  " ".join(self.rows[i].job.id for i in active), active)
        for i in active:
            self.rows[i].slot += 1
            self.rows[i].fed.append(self.rows[i].token)
            self._advance(i, logits[i:i + 1], len(active))

    def _advance(self, i: int, logits: Tensor, sharing: int) -> None:
        """Pick row i's next token from its logits (1, V) with its own options; send its text; end it if done."""
        row, o = self.rows[i], self.rows[i].job.options
        if not all_finite(logits):
            raise APIError(500, "the model computed NaN or infinite logits (broken weights, or float16 overflow)")
        scores = process_logits(logits, row.seen, row.n, row.eos, o)
        token = int(sample(scores, row.generator) if o.do_sample else scores.argmax(dim=-1))
        row.seen[0, token] = True
        row.token, row.n, row.peak = token, row.n + 1, max(row.peak, sharing)
        is_eos = not o.ignore_eos and token in o.eos_token_ids
        text, hit = row.stops.put("" if is_eos else row.decoder.put(token))
        finish = "stop" if is_eos or hit else "length" if row.n >= o.max_new_tokens else None
        if finish and not hit:  # the end: what the decoder and the stop matcher held back
            tail, hit = row.stops.put(row.decoder.flush())
            text += tail + ("" if hit else row.stops.held)
            finish = "stop" if hit else finish
        if text:
            row.job.emit(("text", text))
        if finish:
            self._finish(i, finish)

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        self._free(i)
        prompt_tokens = row.job.inputs["input_ids"].shape[1]
        row.job.emit(("done", reason, prompt_tokens, row.n))
        log.info("request %s: %d prompt + %d completion tokens, finish %s, %.2f s, decode steps shared with up to %d "
                 "requests", row.job.id, prompt_tokens, row.n, reason, time.perf_counter() - row.start, row.peak)
