"""The official Qwen2-Audio evaluations (eval_audio/ of QwenLM/Qwen2-Audio): prompts, decoding and scores.

    from qwen2audio.evaluation import evaluate
    summary = evaluate("asr", "librispeech_eval.jsonl", "Qwen/Qwen2-Audio-7B", device="cuda")

Only `qwen2audio eval` imports this package; its metrics need the `eval` extra (pip install 'qwen2audio[eval]').
"""

from .errors import EvalError
from .runner import evaluate
from .tasks import TASKS

__all__ = ["EvalError", "TASKS", "evaluate"]
