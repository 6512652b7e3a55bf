"""Frozen configs read from a checkpoint's config.json / generation_config.json, with transformers' defaults.

Field names are the ones in config.json. The Hub config of Qwen2-Audio-7B(-Instruct) omits hidden_size, the layer
and head counts and hidden_act, so the defaults below are what really applies to the 7B (Qwen2Config defaults).
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


def _pick(cls: type, raw: dict) -> dict:
    """Keep the keys `cls` knows; unknown keys are ignored as transformers does."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
        _require(self.d_model % self.encoder_attention_heads == 0,
                 f"audio_config: d_model {self.d_model} is not divisible by encoder_attention_heads "
                 f"{self.encoder_attention_heads}")
        _require(self.activation_function == "gelu",
                 f"audio_config: activation_function {self.activation_function!r} is not supported (only 'gelu')")
        _require(min(self.num_mel_bins, self.encoder_layers, self.encoder_ffn_dim, self.max_source_positions) > 0,
                 "audio_config: sizes must be positive")

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
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"text_config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                     f"{self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"text_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads {self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, f"text_config: head_dim {self.head_dim} must be even for rotary embeddings")
        _require(self.hidden_act == "silu", f"text_config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        _require(self.rope_scaling is None or self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
                 in (None, "default"), f"text_config: rope scaling {self.rope_scaling} is not supported")
        _require(self.rope_theta > 0 and self.rms_norm_eps > 0, "text_config: rope_theta and rms_norm_eps must be > 0")

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
        _require(not raw.get("use_sliding_window", False), "text_config: use_sliding_window=true is not supported")
        _require(not raw.get("use_mrope", False), "text_config: use_mrope=true is not supported")
        return cls(**_pick(cls, raw))


@dataclass(frozen=True)
class Qwen2AudioConfig:
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    torch_dtype: str | None = None  # the checkpoint's declared dtype, if any

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen2AudioConfig":
        if raw.get("model_type", "qwen2_audio") != "qwen2_audio":
            raise ConfigError(f"config.json has model_type {raw.get('model_type')!r}; expected 'qwen2_audio'")
        text = dict(raw.get("text_config") or {})
        # Qwen2AudioConfig's own text default is a Qwen2 config of vocab 151936 with the defaults above.
        text_cfg = TextConfig.from_dict(text)
        audio_cfg = AudioConfig(**_pick(AudioConfig, raw.get("audio_config") or {}))
        token = raw.get("audio_token_index", raw.get("audio_token_id", 151646))
        dtype = raw.get("torch_dtype", raw.get("dtype")) or text.get("torch_dtype", text.get("dtype"))
        return cls(audio_cfg, text_cfg, int(token), dtype)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2AudioConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; a model folder needs config.json beside its safetensors")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(raw)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults from generation_config.json (transformers' defaults where the file is silent)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "GenerationConfig":
        raw = _pick(cls, raw)
        eos = raw.get("eos_token_id")
        raw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig | None":
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
