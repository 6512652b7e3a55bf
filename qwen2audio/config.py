"""Frozen configs read from a checkpoint's config.json / generation_config.json, with transformers' defaults.

Field names are the ones in config.json. The Hub config of Qwen2-Audio-7B(-Instruct) omits hidden_size, the layer
and head counts and hidden_act, so the defaults below are what really applies to the 7B (Qwen2Config defaults).
Every field is checked for its type (an integer is never a float, a string or a bool) and its range when a config
is made, so a hostile or broken file is a ConfigError naming the file and the field, never a foreign exception.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .files import is_folder, present, read_json_file
from .errors import ConfigError


def _pick(cls: type, raw: dict) -> dict:
    """Keep the keys `cls` knows; unknown keys are ignored as transformers does."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(v: object) -> bool:
    return type(v) is int and -2**63 <= v < 2**63  # not bool, not 32.0, and what a tensor can index with


def _is_number(v: object) -> bool:
    return type(v) is int or type(v) is float and math.isfinite(v)


def _show(value: object) -> str:
    """A value in a message: its repr, cut short (an int of thousands of digits has none)."""
    try:
        return f"{value!r:.40} ({type(value).__name__})"
    except ValueError:
        return f"a {type(value).__name__} too long to show"


# The annotation of a field -> (test, what the value must be).
_KINDS = {
    "int": (_is_int, "an integer (64-bit)"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "str": (lambda v: type(v) is str, "a string"),
    "str | None": (lambda v: v is None or type(v) is str, "a string or null"),
    "dict | None": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "int | list[int] | None": (lambda v: v is None or _is_int(v) or isinstance(v, list) and all(map(_is_int, v)),
                               "a token id, a list of token ids or null"),
    "tuple[int, ...]": (lambda v: isinstance(v, tuple) and all(map(_is_int, v)), "a token id or a list of token ids"),
}


def check_fields(obj: object, section: str) -> None:
    """Each dataclass field of `obj` against its annotation; the first that does not fit is a ConfigError naming
    `section` and the field."""
    for f in dataclasses.fields(obj):
        test, expected = _KINDS[f.type.__name__ if isinstance(f.type, type) else str(f.type)]
        value = getattr(obj, f.name)
        if not test(value):
            raise ConfigError(f"{section}: {f.name} must be {expected}, got {_show(value)}")


def check_positive(obj: object, section: str, names: list[str]) -> None:
    for name in names:
        _require(getattr(obj, name) > 0, f"{section}: {name} must be at least 1, got {_show(getattr(obj, name))}")


def check_token_ids(section: str, vocab_size: int, **ids: int | list[int] | tuple[int, ...] | None) -> None:
    """Every id named must be a token of the vocabulary (0..vocab_size-1)."""
    for name, value in ids.items():
        for token in value if isinstance(value, (list, tuple)) else [value]:
            _require(token is None or 0 <= token < vocab_size, f"{section}: {name} {token} is not a token id of "
                     f"the vocabulary (0..{vocab_size - 1}, text_config.vocab_size {vocab_size})")


def _section(raw: dict, key: str, section: str) -> dict:
    value = raw.get(key)
    _require(value is None or isinstance(value, dict), f"{section}: {key} must be an object, got "
             f"{type(value).__name__}")
    return dict(value or {})


@dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False  # computed but never applied by the reference

    def __post_init__(self) -> None:
        check_fields(self, "audio_config")
        check_positive(self, "audio_config", ["num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                                              "encoder_ffn_dim", "max_source_positions"])
        _require(self.d_model % self.encoder_attention_heads == 0,
                 f"audio_config: d_model {self.d_model} is not divisible by encoder_attention_heads "
                 f"{self.encoder_attention_heads}")
        _require(self.activation_function == "gelu",
                 f"audio_config: activation_function {self.activation_function!r} is not supported (only 'gelu')")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def n_frames(self) -> int:
        """Mel frames the encoder expects: two frames per position (conv2 has stride 2)."""
        return self.max_source_positions * 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> same as num_attention_heads (transformers' rule)
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "text_config")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        check_positive(self, "text_config", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "max_position_embeddings"])
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"text_config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                     f"{self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"text_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads {self.num_key_value_heads}")
        _require(self.head_dim > 0 and self.head_dim % 2 == 0,
                 f"text_config: head_dim {self.head_dim} must be positive and even for rotary embeddings")
        _require(self.hidden_act == "silu", f"text_config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        _require(self.rope_scaling is None or self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
                 in (None, "default"), f"text_config: rope scaling {str(self.rope_scaling)[:80]} is not supported")
        _require(self.rope_theta > 0 and self.rms_norm_eps > 0,
                 f"text_config: rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        check_token_ids("text_config", self.vocab_size, bos_token_id=self.bos_token_id,
                        eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    @classmethod
    def from_dict(cls, raw: dict) -> "TextConfig":
        raw = dict(raw)
        # transformers 5 moves rope_theta (and rope scaling) into rope_parameters.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):
            raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                raw.setdefault("rope_scaling", rope)
        # Sliding window attention is off unless use_sliding_window is true (the Hub's sliding_window is inert).
        _require(raw.get("use_sliding_window", False) in (False, None),
                 "text_config: use_sliding_window=true is not supported")
        _require(raw.get("use_mrope", False) in (False, None), "text_config: use_mrope=true is not supported")
        return cls(**_pick(cls, raw))


@dataclass(frozen=True)
class Qwen2AudioConfig:
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    torch_dtype: str | None = None  # the checkpoint's declared dtype, if any

    def __post_init__(self) -> None:
        # An audio_token_index beyond a small vocabulary leaves a text-only model (the tokenizer check at load
        # refuses to pair it with a tokenizer whose <|AUDIO|> is elsewhere).
        _require(_is_int(self.audio_token_index) and self.audio_token_index >= 0, f"audio_token_index must be a "
                 f"token id (an integer >= 0), got {_show(self.audio_token_index)}")
        _require(self.torch_dtype is None or type(self.torch_dtype) is str,
                 f"dtype must be a string like 'bfloat16', got {_show(self.torch_dtype)}")

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen2AudioConfig":
        _require(isinstance(raw, dict), f"the config must be a JSON object, got {type(raw).__name__}")
        if raw.get("model_type", "qwen2_audio") != "qwen2_audio":
            raise ConfigError(f"model_type is {_show(raw.get('model_type'))}; expected 'qwen2_audio'")
        text = _section(raw, "text_config", "config")
        # Qwen2AudioConfig's own text default is a Qwen2 config of vocab 151936 with the defaults above.
        text_cfg = TextConfig.from_dict(text)
        audio_cfg = AudioConfig(**_pick(AudioConfig, _section(raw, "audio_config", "config")))
        token = raw.get("audio_token_index", raw.get("audio_token_id", 151646))
        dtype = raw.get("torch_dtype", raw.get("dtype")) or text.get("torch_dtype", text.get("dtype"))
        return cls(audio_cfg, text_cfg, token, dtype)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2AudioConfig":
        path = Path(path)
        if is_folder(path):
            path = path / "config.json"
        if not present(path):
            raise ConfigError(f"no config.json at {path}; a model folder needs config.json beside its safetensors")
        raw = read_json_file(path, "config.json", ConfigError)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults from generation_config.json (transformers' defaults where the file is silent). Types are
    checked here; ranges where they are used, by generate.GenerationOptions (the pipeline checks them at load)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "generation config")

    @classmethod
    def from_dict(cls, raw: dict) -> "GenerationConfig":
        _require(isinstance(raw, dict), f"a generation config must be a JSON object, got {type(raw).__name__}")
        raw = _pick(cls, raw)
        eos = raw.get("eos_token_id")
        raw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else () if eos is None else \
            (eos,) if _is_int(eos) else eos  # anything else is refused by check_fields
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig | None":
        path = Path(path)
        if is_folder(path):
            path = path / "generation_config.json"
        if not present(path):
            return None
        raw = read_json_file(path, "generation_config.json", ConfigError)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
