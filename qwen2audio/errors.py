"""The exceptions a user can cause. Each message names the thing that is wrong and how to fix it."""


class Qwen2AudioError(Exception):
    """Base class: the command line prints these as one line, without a traceback."""


class ConfigError(Qwen2AudioError, ValueError):
    """config.json or generation_config.json holds something this model cannot run with."""


class WeightsError(Qwen2AudioError):
    """A checkpoint folder is missing files, shards or keys, or holds tensors of the wrong shape."""


class AudioError(Qwen2AudioError, ValueError):
    """An audio file or array cannot be read or used."""


class InputError(Qwen2AudioError, ValueError):
    """Model inputs that do not fit together (audio count vs <|AUDIO|> tokens, lengths beyond the cache, ...)."""
