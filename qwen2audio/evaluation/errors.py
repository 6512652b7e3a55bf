"""The evaluation's own error, and the lazy import of the `eval` extra's packages."""

import importlib
from types import ModuleType

from ..errors import Qwen2AudioError

INSTALL_HINT = "pip install 'qwen2audio[eval]'"


class EvalError(Qwen2AudioError, ValueError):
    """A data file, an option or a results file the evaluation cannot use."""


def optional_module(name: str) -> ModuleType:
    """Import one of the `eval` extra's packages, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise EvalError(f"the evaluation metrics need {name.split('.')[0]!r} ({e}): {INSTALL_HINT}") from None
