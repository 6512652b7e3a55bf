"""The five official tasks: how an item becomes a prompt, how a reply is scored, how a data set is summarised.

Prompts follow the official eval_audio scripts: ASR, S2TT, SER and VSC give the base model the audio tags followed
by the item's own prompt (no chat template); chat (AIR-Bench) renders a system message and the item's query, which
holds its own audio tags, in the ChatML template of the Instruct model.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import Item
from .errors import EvalError
from .metrics import accuracy, asr_score, bleu_tokenizer, corpus_bleu, corpus_wer, exact_match

AUDIO_TAGS = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_PLACEHOLDER = "<|AUDIO|>"
SYSTEM_PROMPT = "You are a helpful assistant."
BASE_MODEL = "Qwen/Qwen2-Audio-7B"
INSTRUCT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
# The language of each official ASR file, as evaluate_asr.py's ds_collections gives it.
ASR_FILE_LANGUAGES = {
    "librispeech_eval": "en", "aishell2_eval": "zh", "cv15_asr_en_eval": "en", "cv15_asr_zh_eval": "zh",
    "cv15_asr_yue_eval": "yue", "cv15_asr_fr_eval": "fr", "fleurs_asr_zh_eval": "zh",
}
LANGUAGE_TAG = re.compile(r"<\|([a-z]{2,3})\|>\s*$")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    batch_size: int  # the official launcher's (EVALUATION.md)
    model: str  # the checkpoint the official script defaults to
    metric: str | None  # what the summary reports

    def prompt(self, item: Item) -> str:
        if self.name != "chat":
            return AUDIO_TAGS + item.prompt
        from .. import apply_chat_template

        conversation = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item.prompt}]
        return apply_chat_template(conversation, add_generation_prompt=True)

    def check(self, item: Item) -> None:
        """A problem that would stop the batch holding this item, raised before it runs."""
        count = self.prompt(item).count(AUDIO_PLACEHOLDER)
        if count != 1:
            where = "query" if self.name == "chat" else "prompt (after the audio tags put before it)"
            raise EvalError(f"the {where} holds {count} {AUDIO_PLACEHOLDER} placeholders; an item has one audio, so "
                            "it needs exactly one")

    def score(self, reply: str, reference: str | None, language: str | None) -> dict | None:
        """The per-item score written with the result (None where the metric only exists for a corpus)."""
        if self.name == "asr":
            return asr_score(reply, reference, language)
        if self.name in ("ser", "vsc"):
            return {"correct": exact_match(reply, reference)}
        return None

    def summarize(self, source: str, rows: Sequence[dict]) -> dict:
        """One summary row: {"source", "items", "metric", "value"}."""
        if self.name == "asr":
            metric, value = "WER", corpus_wer([r["score"] for r in rows])
        elif self.name == "s2tt":
            tokenize = bleu_tokenizer(source)
            metric = f"BLEU (tokenize={tokenize})"
            value = corpus_bleu([r["reply"] for r in rows], [r["reference"] for r in rows], tokenize)
        elif self.name in ("ser", "vsc"):
            metric, value = "ACC", accuracy([r["score"]["correct"] for r in rows])
        else:
            metric, value = "responses for an external judge", math.nan
        return {"source": source, "items": len(rows), "metric": metric, "value": value}


TASKS = {
    "asr": Task("asr", "speech recognition: corpus WER", 20, BASE_MODEL, "WER"),
    "s2tt": Task("s2tt", "speech translation: corpus BLEU (sacrebleu)", 8, BASE_MODEL, "BLEU"),
    "ser": Task("ser", "speech emotion (MELD): accuracy", 8, BASE_MODEL, "ACC"),
    "vsc": Task("vsc", "vocal sounds (VocalSound): accuracy", 8, BASE_MODEL, "ACC"),
    "chat": Task("chat", "AIR-Bench chat: responses for an external judge", 8, INSTRUCT_MODEL, None),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def asr_language(data_file: str, items: Sequence[Item], language: str | None) -> str:
    """The language an ASR data set is normalised for: the one given, else the official file's, else the language
    tag that ends every item's prompt (e.g. "... recognize the speech: <|en|>")."""
    if language:
        return language
    stem = Path(data_file).stem
    if stem in ASR_FILE_LANGUAGES:
        return ASR_FILE_LANGUAGES[stem]
    tags = {m.group(1) if (m := LANGUAGE_TAG.search(item.prompt)) else None for item in items}
    if len(tags) == 1 and None not in tags:
        return tags.pop()
    raise EvalError(f"cannot tell the language of {data_file} (its file name is not an official one and its prompts "
                    "do not all end in the same tag like <|en|>); pass --language en|zh|yue|fr|...")
