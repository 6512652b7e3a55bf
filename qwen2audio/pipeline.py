"""`qwen2audio.load()`: a model folder or Hub repo id -> a ready pipeline (model, config, tokenizer, processor).

The pipeline turns conversations into replies: audio items are decoded (audio.py), the prompt is rendered and the
model inputs built (processor.py), and generate.py produces the tokens. Each generation holds a KV cache of its own
(taken from a small pool), so one pipeline serves several threads, and interleaved streams, without mixing them up.
"""

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .adapters import check_merge_args, merge_adapter
from .cache import KVCache
from .checkpoint import mapped_files
from .files import present
from .config import GenerationConfig, Qwen2AudioConfig
from .errors import WeightsError
from .generate import GenerationOptions, decode_step, generate_stream
from .kernels.cpu import check_kernels, prepare_for_cpu
from .memory import check_cache_fits
from .model import Qwen2AudioForConditionalGeneration
from .chat_template import Message, apply_chat_template, as_conversations, conversation_audios
from .pipeline_checks import (check_audio_list, check_fits, check_generate_inputs, check_load_args, check_loaded,
                              check_single, resolve_device, resolve_model_path)
from .prefix import CachedPrefix, audio_after, held_prefix, reusable_length, window_spans
from .processor import Processor, load_clips
from .resident import MoveIntoMemory
from .quantize import check_quantize
from .tokenizer import Tokenizer
from .weights import load_weights

# Used when a checkpoint's generation_config.json names no eos: Instruct replies end with <|im_end|>.
FALLBACK_EOS = (151645, 151643)
DEFAULT_MAX_NEW_TOKENS = 512
IDLE_CACHES = 2  # caches kept for reuse between generations (each holds one conversation's prefix, or a batch)


class Qwen2Audio:
    """A loaded model with everything needed to talk to it."""

    def __init__(self, model: Qwen2AudioForConditionalGeneration, path: Path,
                 generation_config: GenerationConfig | None, processor: Processor | None = None) -> None:
        self._model = model.eval()  # no dropout in Qwen2-Audio; eval() only states that this is for inference
        self.config: Qwen2AudioConfig = model.cfg
        self.path = path
        self.generation_config = generation_config or GenerationConfig()
        self.processor = processor
        self.tokenizer: Tokenizer | None = processor.tokenizer if processor else None
        self.decode_fn = decode_step  # replaced by a compiled version with load(compile=True)
        self.last_stats: dict[str, float] | None = None  # timings of the last generation that finished
        self._idle: list[tuple[KVCache, CachedPrefix | None]] = []  # caches no generation holds, with their content
        self._lock = threading.Lock()  # guards the pool only; generations run concurrently
        self.moving: MoveIntoMemory | None = None  # weights still moving from the mapped files (see load())
        check_loaded(self)

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def model(self) -> Qwen2AudioForConditionalGeneration:
        """The model, once its weights are in memory of their own: load() may still be moving them there in the
        background (resident.py), and an edit made before the move would be lost, so this waits for it (a few
        seconds after load() at most). The pipeline's own generation does not wait."""
        self.wait_until_ready()
        return self._model

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """Wait until the weights are in memory of their own (load() moves them there in the background); False
        if the timeout passed first. `pipe.model` waits for this; generation does not need to."""
        return self.moving is None or self.moving.wait(timeout)

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    # -- options --------------------------------------------------------------------------------------------------

    def options(self, **overrides) -> GenerationOptions:
        """GenerationOptions: the overrides given (None means "the default") over generation_config.json over
        transformers' defaults. The fallback stop ids outside a small model's vocabulary are dropped; the file's own
        ids are checked against the vocabulary at load (pipeline_checks.check_loaded)."""
        g, vocab = self.generation_config, self.config.vocab_size
        eos = g.eos_token_id or tuple(i for i in FALLBACK_EOS if i < vocab)
        pad = g.pad_token_id if g.pad_token_id is not None else (eos[0] if eos else 0)
        defaults = GenerationOptions(max_new_tokens=g.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample=g.do_sample,
                                     temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                     repetition_penalty=g.repetition_penalty, eos_token_ids=eos, pad_token_id=pad)
        return defaults.replace(**{k: v for k, v in overrides.items() if v is not None})

    def _require_processor(self) -> Processor:
        if self.processor is None:
            raise WeightsError(f"{self.path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
                               "copy them from the Hub repo into the model folder")
        return self.processor

    # -- token level ------------------------------------------------------------------------------------------------

    def _take_cache(self, batch: dict, length: int) -> tuple[KVCache, int, dict]:
        """A cache for this batch, the number of prompt tokens it holds already, and the model inputs to give
        `generate_stream` (for a reused prefix, the audio of the rest of the prompt only).

        One-row prompts reuse the idle cache that shares the longest prefix with them (the previous turn of the
        conversation), grown when it is too short; a batch gets an idle cache of its size, or a new one."""
        ids, rows, mask = batch["input_ids"], batch["input_ids"].shape[0], batch["attention_mask"]
        rows = rows if rows > 1 or mask is None or bool(mask.all()) else -1  # no reuse for a padded single row
        spans = window_spans(ids[0], self.config.audio_token_index, batch.get("feature_attention_mask")) \
            if rows == 1 else []
        with self._lock:
            scored = [(reusable_length(prefix, ids[0], spans, batch.get("input_features")) if rows == 1 else 0, i)
                      for i, (cache, prefix) in enumerate(self._idle) if cache.batch_size == rows]
            cached, index = max(scored, default=(0, None))
            cache = self._idle.pop(index)[0] if index is not None else None
        rows = ids.shape[0]
        if cache is None or cache.max_seq_len < length:  # grow with room for the turns to come
            limit = self.config.text_config.max_position_embeddings
            size = min(max(length, 2 * (cache.max_seq_len if cache else 0)), limit)
            check_cache_fits(self.config, rows, size, self.dtype, self.device)
            cache = cache.grown(size, cached) if cache is not None and cached else self._model.new_cache(rows, size)
        return cache, cached, {**batch, **audio_after(batch, spans, cached)} if cached else batch

    def _give_back(self, cache: KVCache, batch: dict, tokens: list[Tensor]) -> None:
        """Keep the cache for the next generation, with what it holds when it is one row: the prompt and every
        generated token but the last (which was never fed back)."""
        prefix = None
        mask = batch["attention_mask"]
        if cache.batch_size == 1 and tokens and (mask is None or bool(mask.all())):
            ids = batch["input_ids"][0]
            spans = window_spans(ids, self.config.audio_token_index, batch.get("feature_attention_mask"))
            prefix = held_prefix(ids, [int(t) for t in tokens[:-1]], spans, batch.get("input_features"))
        with self._lock:  # keep the last few, so a chat does not allocate its cache again every turn
            self._idle = [(cache, prefix)] + self._idle[:IDLE_CACHES - 1]

    def forget_prefixes(self) -> None:
        """Keep the idle caches' memory but not what they hold: the next generation prefills its whole prompt
        (benchmarks timing a prompt they repeat; a conversation that must not reuse an earlier one's work)."""
        with self._lock:
            self._idle = [(cache, None) for cache, _ in self._idle]

    def generate_stream(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
                        options: GenerationOptions | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (tokens (B,), live (B,)) per step, as `generate.generate_stream`; records timings in
        `last_stats` (with the prompt tokens taken from an earlier turn's cache, `cached_tokens`)."""
        options = options or self.options()
        check_generate_inputs(self._model, input_ids, input_features, feature_attention_mask)
        for mapped in mapped_files(list(self._model.state_dict().values())):  # load(mmap=True): files unchanged?
            mapped.check()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "input_features": input_features, "feature_attention_mask": feature_attention_mask}
        cache, cached, inputs = self._take_cache(batch, input_ids.shape[-1] + options.max_new_tokens)
        start, first, tokens = time.perf_counter(), 0.0, []
        for step in generate_stream(self._model, **inputs, options=options, cache=cache, decode_fn=self.decode_fn,
                                    cached=cached):
            first = first or time.perf_counter() - start
            tokens.append(step[0])
            yield step
        self._give_back(cache, batch, tokens)  # not reached when the caller abandons the stream: it is dropped
        total = time.perf_counter() - start
        decode_tps = (len(tokens) - 1) / (total - first) if len(tokens) > 1 and total > first else 0.0
        self.last_stats = {"time_to_first_token_s": round(first, 4), "new_tokens": len(tokens),
                           "decode_tokens_per_s": round(decode_tps, 2), "generate_s": round(total, 4),
                           "cached_tokens": cached}

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, input_features: Tensor | None = None,
                 feature_attention_mask: Tensor | None = None, **options) -> Tensor:
        """New token ids only, (B, n), each row padded with the pad id after it stops (transformers' generate()
        without the prompt). Options as for `options()`."""
        steps = self.generate_stream(input_ids, attention_mask, input_features, feature_attention_mask,
                                     self.options(**options))
        return torch.stack([tokens for tokens, _ in steps], dim=1)

    # -- text level -------------------------------------------------------------------------------------------------

    def inputs(self, prompts: str | list[str], audio: Sequence | None = None,
               long_audio: str = "truncate") -> dict[str, Tensor]:
        """Prompt text(s) with <|AUDIO|> placeholders + audio (paths, URLs, bytes or 16 kHz arrays) -> model inputs."""
        clips = load_clips(check_audio_list(audio))
        return self._require_processor()(prompts, audio=clips or None, long_audio=long_audio,
                                         max_tokens=self.config.text_config.max_position_embeddings)

    def _token_rows(self, batch: dict[str, Tensor], options: dict) -> Iterator[list[int | None]]:
        """Yield, per step, each row's new token id (None once the row has stopped)."""
        for tokens, live in self.generate_stream(**batch, options=self.options(**options)):
            yield [t if alive else None for t, alive in zip(tokens.tolist(), live.tolist())]

    def complete(self, prompts: str | list[str], audio: Sequence | None = None, long_audio: str = "truncate",
                 **options) -> str | list[str]:
        """Raw prompt(s) with <|audio_bos|><|AUDIO|><|audio_eos|> placeholders (the base model's format) -> text."""
        batch = self.inputs(prompts, audio, long_audio)
        rows: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
        for step in self._token_rows(batch, options):
            for row, t in zip(rows, step):
                if t is not None:
                    row.append(t)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        return texts if isinstance(prompts, list) else texts[0]

    def stream_prompt(self, prompt: str, audio: Sequence | None = None, long_audio: str = "truncate",
                      **options) -> Iterator[str]:
        """Like `complete` for one prompt, yielding text pieces as they are decoded."""
        batch = self.inputs(prompt, audio, long_audio)
        decoder = self.tokenizer.stream(skip_special_tokens=True)
        for (token,) in self._token_rows(batch, options):
            if token is not None and (piece := decoder.put(token)):
                yield piece
        if tail := decoder.flush():
            yield tail

    def chat(self, conversation: Sequence[Message] | Sequence[Sequence[Message]], long_audio: str = "truncate",
             **options) -> str | list[str]:
        """The assistant's reply to a conversation (a list of replies for a list of conversations)."""
        conversations, batched = as_conversations(conversation)
        prompts = [apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        audio = [clip for c in conversations for clip in conversation_audios(c)]
        replies = self.complete(prompts, audio, long_audio, **options)
        return replies if batched else replies[0]

    def stream(self, conversation: Sequence[Message], long_audio: str = "truncate", **options) -> Iterator[str]:
        """The assistant's reply to one conversation, as text pieces while it is generated."""
        conversation = check_single(*as_conversations(conversation))
        prompt = apply_chat_template(conversation, add_generation_prompt=True)
        return self.stream_prompt(prompt, conversation_audios(conversation), long_audio, **options)


def load_model(path: str | Path, model: torch.nn.Module | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantize: str | None = None, mmap: bool = False,
               allow_missing: Sequence[str] = (), quiet: bool = False) -> torch.nn.Module:
    """The model alone, a plain nn.Module that trains like any other (no tokenizer, no CPU kernels, no eval()).

    model: a model you built yourself (your subclass of Qwen2AudioForConditionalGeneration, a module replaced, a
    head added), best on the meta device (`with torch.device("meta"): model = MyModel(config)`) so that nothing is
    allocated twice; every parameter name must be in the checkpoint, with the shape it has there, except those
    matching an `allow_missing` pattern (fnmatch, e.g. "my_head.*"), which keep their values or, on the meta
    device, are initialised by their module's reset_parameters(). Other arguments as for `load`.
    """
    check_load_args(path, dtype, allow_missing, mmap=mmap, quiet=quiet)
    check_quantize(quantize)
    device = resolve_device(device)
    folder = resolve_model_path(path, quiet=quiet)
    check_fits(folder, dtype, device, quantize, mapped=mmap)
    return load_weights(folder, dtype=dtype, device=device, progress=not quiet, quantize=quantize, map_files=mmap,
                        model=model, allow_missing=tuple(allow_missing))


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         quantize: str | None = None, compile: bool = False, kernels: str = "auto",
         quiet: bool = False, mmap: bool | None = None, adapter: str | Path | None = None) -> Qwen2Audio:
    """Load a Qwen2-Audio checkpoint folder (or Hub repo id). dtype=None keeps the checkpoint's dtype.

    quantize="int8" loads the decoder's linear layers as weight-only int8, quantized as they are read (the
    full-precision decoder is never in memory); compile=True compiles the single-token decode step with
    torch.compile (CUDA graphs on CUDA). On CPU, `kernels` picks the CPU kernels, put in place by
    kernels.prepare_for_cpu: "auto" (chosen from what the CPU reports, logged on the "qwen2audio" logger),
    "native", "avx2" or "reference" (the plain model); see kernels/cpu.py.

    On CPU, weights kept in the file's dtype end in memory of their own on huge pages (fastest decoding). By default
    (mmap=None, no quantize) the files are mapped, load() returns at once, and the weights move into that memory in
    the background while the first answer is computed (resident.py; `pipe.model` and `pipe.wait_until_ready()`
    wait for it).
    mmap=False reads them before returning; mmap=True keeps them mapped (decoding is slower, and the files must
    not change while the model lives: a file truncated under the mapping kills the process with SIGBUS when read;
    each generation first checks the sizes and modification times of the files it still maps, a WeightsError if
    one changed). adapter: a LoRA adapter folder in PEFT's layout (`qwen2audio finetune`'s OUT/adapter), folded
    into the weights after loading (the weights are then read, not mapped).
    """
    check_load_args(path, dtype, compile=compile, quiet=quiet, mmap=mmap)
    check_quantize(quantize)
    device = resolve_device(device)
    check_kernels(kernels, device)
    folder = resolve_model_path(path, quiet=quiet)
    check_fits(folder, dtype, device, quantize, mapped=bool(mmap))
    if adapter is not None:
        check_merge_args(adapter, quantize, mmap)
    mapped: list = []
    background = mmap is None and quantize is None and adapter is None  # an int8 decoder is read anyway
    model = load_weights(folder, dtype=dtype, device=device, progress=not quiet, quantize=quantize,
                         map_files=bool(mmap) or background, mapped=mapped if background else None)
    if adapter is not None:
        merge_adapter(model, adapter)
    if device.type == "cpu":  # the CPU layers, sharing the weights (print(pipe.model) shows them)
        prepare_for_cpu(model, kernels, verbose=not quiet)
    has_tokenizer = present(folder / "tokenizer.json") or present(folder / "vocab.json")
    processor = Processor.from_folder(folder) if has_tokenizer else None
    pipe = Qwen2Audio(model, folder, GenerationConfig.from_file(folder), processor)
    pipe.moving = MoveIntoMemory(model, mapped)  # `ready` at once when nothing was mapped
    if compile:
        mode = "reduce-overhead" if pipe.device.type == "cuda" else None  # CUDA graphs need fixed shapes: we have them
        pipe.decode_fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return pipe
