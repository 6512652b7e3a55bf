"""The official scores: corpus WER, corpus BLEU (sacrebleu), exact-match accuracy.

Each data set is scored per `source` (the jsonl key), as the official scripts group their results.
"""

import math
from collections.abc import Sequence

from .errors import EvalError, optional_module
from .text import wer_tokens


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between token lists (the `editdistance` package the official script uses)."""
    return optional_module("editdistance").eval(list(reference), list(hypothesis))


def asr_score(reply: str, reference: str, language: str) -> dict[str, int]:
    """One item's share of the corpus WER: edits and reference tokens after the official normalisation."""
    ref, hyp = wer_tokens(reference, language), wer_tokens(reply, language)
    return {"errors": edit_distance(ref, hyp), "reference_tokens": len(ref)}


def corpus_wer(scores: Sequence[dict[str, int]]) -> float:
    """Edits summed over the corpus over reference tokens summed (not a mean of per-item rates).

    The official script divides by zero when no reference has a token; we return nan for that."""
    total = sum(s["reference_tokens"] for s in scores)
    return sum(s["errors"] for s in scores) / total if total else math.nan


def bleu_tokenizer(source: str) -> str:
    """sacrebleu's tokenizer for a data set, chosen as the official evaluate_st.py does: the second-to-last
    "_"-separated field of `source` names the language; "ja" -> ja-mecab, "zh" -> zh, anything else -> 13a."""
    fields = source.split("_")
    language = fields[-2] if len(fields) >= 2 else ""  # parity: the official script raises IndexError here
    return {"ja": "ja-mecab", "zh": "zh"}.get(language, "13a")


def corpus_bleu(replies: Sequence[str], references: Sequence[str], tokenize: str) -> float:
    """sacrebleu.corpus_bleu(replies, [references], tokenize=...).score, on the raw texts (no clean-up)."""
    sacrebleu = optional_module("sacrebleu")
    try:
        return sacrebleu.corpus_bleu(list(replies), [list(references)], tokenize=tokenize).score
    except (ImportError, RuntimeError) as e:  # ja-mecab without its optional packages
        raise EvalError(f"sacrebleu's {tokenize!r} tokenizer is not usable here ({e}); for Japanese: "
                        "pip install 'sacrebleu[ja]'") from None


def exact_match(reply: str, reference: str) -> bool:
    """SER / VSC: the reply with leading whitespace stripped equals the reference exactly (case and trailing
    whitespace count), as the official scripts' sklearn accuracy_score(refs, [r.lstrip() for r in replies])."""
    return reply.lstrip() == reference


def accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct) if correct else math.nan
