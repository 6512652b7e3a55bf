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

from .cache import KVCache
from .config import GenerationConfig, Qwen2AudioConfig
from .errors import InputError, WeightsError
from .generate import GenerationOptions, decode_step, generate_stream
from .kernels.cpu import check_kernels, prepare_for_cpu
from .model import Qwen2AudioForConditionalGeneration
from .chat_template import Message, apply_chat_template, as_conversations, conversation_audios
from .processor import Processor, load_clips
from .quantize import check_quantize
from .tokenizer import Tokenizer
from .checkpoint import MODEL_FILES
from .weights import load_weights

# Used when a checkpoint's generation_config.json names no eos: Instruct replies end with <|im_end|>.
FALLBACK_EOS = (151645, 151643)
DEFAULT_MAX_NEW_TOKENS = 512


def resolve_model_path(path_or_repo_id: str | Path, quiet: bool = False) -> Path:
    """A local folder as it is; otherwise a Hub repo id, fetched (only the files the model needs) into the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise WeightsError(f"model {name!r} is neither a folder nor a Hub repo id like 'Qwen/Qwen2-Audio-7B-Instruct'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    try:
        if quiet:
            disable_progress_bars()
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES))
    except Exception as e:
        raise WeightsError(f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
                           "network, download the repo elsewhere and pass its local folder as the model path") from None
    finally:
        if quiet:
            enable_progress_bars()


def resolve_device(device: str | torch.device) -> torch.device:
    """The device to load on: "auto" picks cuda, then mps, then cpu; a device this torch build and machine cannot
    use is an InputError before any weight is read."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    available = {"cuda": torch.cuda.is_available, "mps": _mps_available}.get(device.type, lambda: True)
    if not available():
        raise InputError(f"device {str(device)!r} is not available on this machine (this torch is "
                         f"{torch.__version__}); use the CPU (device='cpu', --device cpu) or install a torch build for "
                         "that device")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


class Qwen2Audio:
    """A loaded model with everything needed to talk to it."""

    def __init__(self, model: Qwen2AudioForConditionalGeneration, path: Path,
                 generation_config: GenerationConfig | None, processor: Processor | None = None) -> None:
        self.model = model.eval()  # no dropout in Qwen2-Audio; eval() only states that this is for inference
        self.config: Qwen2AudioConfig = model.cfg
        self.path = path
        self.generation_config = generation_config or GenerationConfig()
        self.processor = processor
        self.tokenizer: Tokenizer | None = processor.tokenizer if processor else None
        self.decode_fn = decode_step  # replaced by a compiled version with load(compile=True)
        self.last_stats: dict[str, float] | None = None  # timings of the last generation that finished
        self._idle_caches: list[KVCache] = []  # caches no generation holds now, reused by the next ones
        self._lock = threading.Lock()  # guards the pool only; generations run concurrently

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- options --------------------------------------------------------------------------------------------------

    def options(self, **overrides) -> GenerationOptions:
        """GenerationOptions: the overrides given (None means "the default") over generation_config.json over
        transformers' defaults. Stop ids outside the vocabulary (the fallback ids, for a small model) are dropped."""
        g, vocab = self.generation_config, self.config.vocab_size
        eos = tuple(i for i in (g.eos_token_id or FALLBACK_EOS) if i < vocab)
        pad = g.pad_token_id if g.pad_token_id is not None and g.pad_token_id < vocab else (eos[0] if eos else 0)
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

    def _take_cache(self, batch_size: int, length: int) -> KVCache:
        with self._lock:
            for cache in self._idle_caches:
                if cache.batch_size == batch_size and cache.max_seq_len >= length:
                    self._idle_caches.remove(cache)
                    return cache
        return self.model.new_cache(batch_size, length)

    def _give_back(self, cache: KVCache) -> None:
        with self._lock:  # keep the last few, so a chat does not allocate its cache again every turn
            self._idle_caches = [cache] + self._idle_caches[:1]

    def generate_stream(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
                        options: GenerationOptions | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (tokens (B,), live (B,)) per step, as `generate.generate_stream`; records timings in
        `last_stats`."""
        options = options or self.options()
        cache = self._take_cache(*input_ids.shape[:1], input_ids.shape[-1] + options.max_new_tokens)
        start, first, steps = time.perf_counter(), 0.0, 0
        for step in generate_stream(self.model, input_ids, attention_mask, input_features, feature_attention_mask,
                                    options, cache=cache, decode_fn=self.decode_fn):
            first = first or time.perf_counter() - start
            steps += 1
            yield step
        self._give_back(cache)  # not reached when the caller abandons the stream: that cache is simply dropped
        total = time.perf_counter() - start
        decode_tps = (steps - 1) / (total - first) if steps > 1 and total > first else 0.0
        self.last_stats = {"time_to_first_token_s": round(first, 4), "new_tokens": steps,
                           "decode_tokens_per_s": round(decode_tps, 2), "generate_s": round(total, 4)}

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
        clips = load_clips(audio or [])
        return self._require_processor()(prompts, audio=clips or None, long_audio=long_audio)

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
        (conversation,), _ = as_conversations(conversation)
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
    check_quantize(quantize)
    device = resolve_device(device)
    folder = resolve_model_path(path, quiet=quiet)
    return load_weights(folder, dtype=dtype, device=device, progress=not quiet, quantize=quantize, map_files=mmap,
                        model=model, allow_missing=tuple(allow_missing))


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         quantize: str | None = None, compile: bool = False, kernels: str = "auto",
         quiet: bool = False, mmap: bool = False) -> Qwen2Audio:
    """Load a Qwen2-Audio checkpoint folder (or Hub repo id). dtype=None keeps the checkpoint's dtype.

    quantize="int8" loads the decoder's linear layers as weight-only int8, quantized as they are read (the
    full-precision decoder is never in memory); compile=True compiles the single-token decode step with
    torch.compile (CUDA graphs on CUDA). On CPU, `kernels` picks the CPU kernels, put in place by
    kernels.prepare_for_cpu: "auto" (chosen from what the CPU reports, logged on the "qwen2audio" logger),
    "native", "avx2" or "reference" (the plain model); see kernels/cpu.py. On CPU, weights kept in the file's
    dtype are read into memory on huge pages (fastest decoding); mmap=True maps the files instead (load() returns
    at once, decoding is slower; see weights.load_weights).
    """
    device = resolve_device(device)
    check_kernels(kernels, device)
    folder = resolve_model_path(path, quiet=quiet)
    model = load_model(folder, dtype=dtype, device=device, quantize=quantize, mmap=mmap, quiet=quiet)
    if device.type == "cpu":  # the CPU layers, sharing the weights (print(pipe.model) shows them)
        prepare_for_cpu(model, kernels, verbose=not quiet)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    processor = Processor.from_folder(folder) if has_tokenizer else None
    pipe = Qwen2Audio(model, folder, GenerationConfig.from_file(folder), processor)
    if compile:
        mode = "reduce-overhead" if pipe.device.type == "cuda" else None  # CUDA graphs need fixed shapes: we have them
        pipe.decode_fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return pipe
