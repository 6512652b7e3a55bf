"""qwen2audio: Qwen2-Audio in plain PyTorch, loaded straight from the Hugging Face safetensors checkpoints."""

from .audio import load_audio
from .config import AudioConfig, GenerationConfig, Qwen2AudioConfig, TextConfig
from .errors import AudioError, ConfigError, InputError, Qwen2AudioError, WeightsError
from .convert import convert, save
from .model import Qwen2AudioForConditionalGeneration
from .pipeline import Qwen2Audio, load, load_model
from .chat_template import apply_chat_template
from .processor import Processor
from .tokenizer import Tokenizer

__all__ = ["AudioConfig", "AudioError", "ConfigError", "GenerationConfig", "InputError", "Processor", "Qwen2Audio",
           "Qwen2AudioConfig", "Qwen2AudioError", "Qwen2AudioForConditionalGeneration", "TextConfig", "Tokenizer",
           "WeightsError", "apply_chat_template", "convert", "load", "load_audio", "load_model", "save"]
