"""qwen2audio: Qwen2-Audio in plain PyTorch, loaded straight from the Hugging Face safetensors checkpoints."""

from .config import AudioConfig, GenerationConfig, Qwen2AudioConfig, TextConfig
from .errors import AudioError, ConfigError, InputError, Qwen2AudioError, WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .pipeline import Qwen2Audio, load

__all__ = ["AudioConfig", "AudioError", "ConfigError", "GenerationConfig", "InputError", "Qwen2Audio",
           "Qwen2AudioConfig", "Qwen2AudioError", "Qwen2AudioForConditionalGeneration", "TextConfig",
           "WeightsError", "load"]
