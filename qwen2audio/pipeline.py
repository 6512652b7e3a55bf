"""`qwen2audio.load()`: a model folder or Hub repo id -> a ready pipeline (model, config, tokenizer, processor).

The pipeline turns conversations into replies: audio items are decoded (audio.py), the prompt is rendered
(prompt.py), the processor builds the model inputs, and generate.py produces the tokens.
"""

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .config import GenerationConfig, Qwen2AudioConfig
from .errors import InputError, WeightsError
from .generate import decode_step, generate_stream
from .kernels.cpu import use_cpu_gemv
from .model import Qwen2AudioForConditionalGeneration
from .prompt import Message, Processor, apply_chat_template, conversation_audios
from .tokenizer import Tokenizer
from .weights import MODEL_FILES, load_weights

# Used when a checkpoint has no generation_config.json: Instruct replies end with <|im_end|>.
FALLBACK_EOS = (151645, 151643)
DEFAULT_MAX_NEW_TOKENS = 512
_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
            "seed", "ignore_eos", "long_audio"}


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


def device_available(kind: str) -> bool:
    """Whether this torch build and machine can use a device type ('cpu', 'cuda', 'mps'; others are left to torch)."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return True


def check_device(device: str | torch.device) -> None:
    """A device that this torch build and machine cannot use is a clear error before 16 GB of weights are read."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if not device_available(kind):
        raise InputError(f"device {device!r} is not available on this machine (this torch is {torch.__version__}); "
                         "use device='cpu' or install a torch build for that device")


class Qwen2Audio:
    """A loaded model with everything needed to talk to it."""

    def __init__(self, model: Qwen2AudioForConditionalGeneration, config: Qwen2AudioConfig, path: Path,
                 generation_config: GenerationConfig | None, processor: Processor | None = None) -> None:
        self.model = model
        self.config = config
        self.path = path
        self.generation_config = generation_config or GenerationConfig()
        self.processor = processor
        self.tokenizer: Tokenizer | None = processor.tokenizer if processor else None
        self.decode_fn = decode_step  # replaced by a compiled version with load(compile=True)
        self.last_stats: dict[str, float] | None = None  # timings of the last generation

    @property
    def device(self) -> torch.device:
        return self.model.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.model.embed_tokens.weight.dtype

    # -- options --------------------------------------------------------------------------------------------------

    def _options(self, options: dict) -> dict:
        """Explicit options over generation_config.json over transformers' defaults."""
        unknown = set(options) - _OPTIONS
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(_OPTIONS))}")
        g = self.generation_config
        pad = g.pad_token_id
        eos = g.eos_token_id or FALLBACK_EOS
        merged = dict(max_new_tokens=g.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample=g.do_sample,
                      temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                      repetition_penalty=g.repetition_penalty, eos_token_ids=eos,
                      pad_token_id=pad if pad is not None else eos[0])
        merged.update({k: v for k, v in options.items() if v is not None and k != "long_audio"})
        return merged

    def _require_processor(self) -> Processor:
        if self.processor is None:
            raise WeightsError(f"{self.path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
                               "copy them from the Hub repo into the model folder")
        return self.processor

    # -- token level ------------------------------------------------------------------------------------------------

    def generate_stream(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
                        **options) -> Iterator[Tensor]:
        """Yield each step's tokens (B,) as they are produced; records timings in `last_stats`."""
        opts = self._options(options)
        start = time.perf_counter()
        steps, first = 0, None
        for token in generate_stream(self.model, input_ids, attention_mask, input_features, feature_attention_mask,
                                     decode_fn=self.decode_fn, **opts):
            if first is None:
                first = time.perf_counter() - start
            steps += 1
            yield token
        total = time.perf_counter() - start
        decode_tps = (steps - 1) / (total - first) if steps > 1 and total > first else 0.0
        self.last_stats = {"time_to_first_token_s": round(first or 0.0, 4), "new_tokens": steps,
                           "decode_tokens_per_s": round(decode_tps, 2), "generate_s": round(total, 4)}

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, input_features: Tensor | None = None,
                 feature_attention_mask: Tensor | None = None, **options) -> Tensor:
        """New token ids only, (B, n), each row padded with the pad id after it stops."""
        steps = list(self.generate_stream(input_ids, attention_mask, input_features, feature_attention_mask,
                                          **options))
        return torch.stack(steps, dim=1)

    # -- text level -------------------------------------------------------------------------------------------------

    def inputs(self, prompts: str | list[str], audio: Sequence | None = None,
               long_audio: str = "truncate") -> dict[str, Tensor]:
        """Prompt text(s) with <|AUDIO|> placeholders + audio (paths, URLs, bytes or 16 kHz arrays) -> model inputs."""
        from .audio import load_audio

        # Arrays and tensors in conversations are taken to be 16 kHz; files are decoded and resampled.
        clips = [load_audio(a, None if isinstance(a, (str, Path, bytes)) else 16000) for a in (audio or [])]
        return self._require_processor()(prompts, audio=clips or None, long_audio=long_audio)

    def _replies(self, batch: dict[str, Tensor], options: dict) -> Iterator[list[int | None]]:
        """Yield, per step, each row's new token id (None once the row has stopped)."""
        eos = set(self._options(options)["eos_token_ids"])
        stopped = [False] * batch["input_ids"].shape[0]
        for token in self.generate_stream(**batch, **options):
            row_tokens = []
            for i, t in enumerate(token.tolist()):
                row_tokens.append(None if stopped[i] else t)
                stopped[i] = stopped[i] or (t in eos and not options.get("ignore_eos"))
            yield row_tokens

    def complete(self, prompts: str | list[str], audio: Sequence | None = None, **options) -> str | list[str]:
        """Raw prompt(s) with <|audio_bos|><|AUDIO|><|audio_eos|> placeholders (the base model's format) -> text."""
        batch = self.inputs(prompts, audio, options.get("long_audio") or "truncate")
        rows: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
        for step in self._replies(batch, options):
            for row, t in zip(rows, step):
                if t is not None:
                    row.append(t)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        return texts if isinstance(prompts, list) else texts[0]

    def stream_prompt(self, prompt: str, audio: Sequence | None = None, **options) -> Iterator[str]:
        """Like `complete` for one prompt, yielding text pieces as they are decoded."""
        batch = self.inputs(prompt, audio, options.get("long_audio") or "truncate")
        decoder = self.tokenizer.stream(skip_special_tokens=True)
        for (token,) in self._replies(batch, options):
            piece = decoder.put(token) if token is not None else ""
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def chat(self, conversation: Sequence[Message] | Sequence[Sequence[Message]], **options) -> str | list[str]:
        """The assistant's reply to a conversation (a list of replies for a list of conversations)."""
        batched = len(conversation) > 0 and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        prompts = [apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        audio = [clip for c in conversations for clip in conversation_audios(c)]
        replies = self.complete(prompts, audio, **options)
        return replies if batched else replies[0]

    def stream(self, conversation: Sequence[Message], **options) -> Iterator[str]:
        """The assistant's reply to one conversation, as text pieces while it is generated."""
        prompt = apply_chat_template(conversation, add_generation_prompt=True)
        return self.stream_prompt(prompt, conversation_audios(conversation), **options)


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         quantize: str | None = None, compile: bool = False, cpu_gemv: bool | None = None,
         quiet: bool = False, mmap: bool = False) -> Qwen2Audio:
    """Load a Qwen2-Audio checkpoint folder (or Hub repo id). dtype=None keeps the checkpoint's dtype.

    quantize="int8" loads the decoder's linear layers as weight-only int8, quantized as they are read (the
    full-precision decoder is never in memory); compile=True compiles the single-token decode step with
    torch.compile (CUDA graphs on CUDA). cpu_gemv (default: on for CPU) runs decoder products of a few rows with
    weight-streaming kernels (kernels/cpu.py): matrix-vector products, and for int8 a C++ kernel built on first
    use on CPUs with AVX-512 VNNI (torch's own int8 kernel otherwise). On CPU, weights kept in the file's dtype
    are read into memory on huge pages (fastest decoding); mmap=True maps the files instead (load() returns at
    once, decoding is slower; see weights.load_weights).
    """
    if quantize not in (None, "int8"):
        raise WeightsError(f"quantize must be None or 'int8', got {quantize!r}")
    check_device(device)
    folder = resolve_model_path(path, quiet=quiet)
    config = Qwen2AudioConfig.from_file(folder)
    model = load_weights(folder, config, dtype=dtype, device=device, progress=not quiet, quantize=quantize,
                         map_files=mmap)
    if cpu_gemv if cpu_gemv is not None else torch.device(device).type == "cpu":
        use_cpu_gemv(model, verbose=not quiet)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    processor = Processor.from_folder(folder) if has_tokenizer else None
    pipe = Qwen2Audio(model, config, folder, GenerationConfig.from_file(folder), processor)
    if compile:
        mode = "reduce-overhead" if pipe.device.type == "cuda" else None  # CUDA graphs need fixed shapes: we have them
        pipe.decode_fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return pipe
