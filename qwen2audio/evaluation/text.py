"""ASR text clean-up and normalisation, in the order of the official eval_audio/evaluate_asr.py.

For each (reference, reply) pair and the data set's language:
1. `clean_text` (the script's remove_sp): special tags like <|en|> become spaces, runs of whitespace one space, the
   space before ! , . ? ; : goes, leading spaces go; Chinese ("zh", not "yue") loses every space.
2. `normalize`: Cantonese ("yue") is converted to simplified Chinese (zhconv) and then goes through Whisper's basic
   normaliser; English goes through Whisper's English normaliser *and then* the basic one (the script's if/if-else
   sends every non-Chinese language to the basic normaliser, English included); Chinese goes through the Chinese
   text normaliser (numbers read out, punctuation removed) and nothing else; other languages through the basic one.
3. `tokens`: the script's evaluation tokenizer (fairseq's EvaluationTokenizer with sacrebleu's "none" tokenizer):
   words made only of punctuation are dropped, the text is lowercased and split on whitespace; Chinese and
   Cantonese are then scored per character (the words joined, then split into characters).

parity: the official Chinese normaliser is speechio's cn_tn.py, shipped inside their repo and on no package index.
We read numbers out with cn2an (`an2cn` transform) instead and remove cn_tn's punctuation set. The two agree on
dates, amounts of money, decimals, percentages, fractions and numbers before a measure word; they differ on bare
numbers of 4+ digits (cn_tn reads them digit by digit: 5000 -> 五零零零, cn2an as a number: 五千), phone numbers
and letter-digit-letter words like P2P. tests/test_eval_metrics.py shows each case with both results.
"""

import functools
import re
import string
import unicodedata

from .errors import optional_module

TAG = re.compile(r"<\|.*?\|>")
SPACE_BEFORE_PUNCT = re.compile(r" ?([!,.?;:])")
CHARACTER_LANGUAGES = ("zh", "yue")  # scored per character


def _chars(*spans: tuple[int, int]) -> str:
    return "".join(chr(c) for first, last in spans for c in range(first, last + 1))


# The punctuation cn_tn replaces with spaces: ASCII punctuation and these CJK / full-width marks (its list skips
# U+FF0E, the full-width full stop, so that one stays).
CHINESE_PUNCTUATION = string.punctuation + _chars(
    (0x00B7, 0x00B7), (0x2013, 0x2014), (0x2018, 0x2019), (0x201B, 0x201F), (0x2026, 0x2027),
    (0x3001, 0x3003), (0x3008, 0x3011), (0x3014, 0x301F), (0x3030, 0x3030), (0x303E, 0x303F), (0xFE4F, 0xFE4F),
    (0xFF01, 0xFF0D), (0xFF0F, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF64))
PUNCTUATION_TO_SPACE = str.maketrans(CHINESE_PUNCTUATION, " " * len(CHINESE_PUNCTUATION))


def clean_text(text: str, language: str) -> str:
    """The official remove_sp, applied to references and replies before normalising."""
    text = TAG.sub(" ", text)
    text = re.sub(r"\s+", " ", text)
    text = SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = text.lstrip(" ")
    if language == "zh":
        text = re.sub(r"\s+", "", text)
    return text


@functools.cache
def _whisper_normalizers() -> tuple:
    english = optional_module("whisper_normalizer.english").EnglishTextNormalizer()
    basic = optional_module("whisper_normalizer.basic").BasicTextNormalizer()
    return english, basic


def normalize_chinese(text: str) -> str:
    """Numbers read out in Chinese characters, then punctuation replaced by spaces (see the module note)."""
    cn2an = optional_module("cn2an")
    return cn2an.transform(text, "an2cn").translate(PUNCTUATION_TO_SPACE)


def normalize(text: str, language: str) -> str:
    """Step 2 of the module docstring."""
    english, basic = _whisper_normalizers()
    if language == "yue":
        text = optional_module("zhconv").convert(text, "zh-cn")
    if language == "en":
        text = english(text)
    if language == "zh":
        return normalize_chinese(text)
    return basic(text)  # parity: English too, after the English normaliser, as the official script does


def tokens(text: str, language: str) -> list[str]:
    """Step 3: words (or characters for Chinese and Cantonese) that the edit distance compares."""
    words = [w for w in text.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in w)]
    words = " ".join(words).lower().split()
    if language in CHARACTER_LANGUAGES:
        return list("".join(words))
    return words


def wer_tokens(text: str, language: str) -> list[str]:
    """A reference or reply as the official script compares it: clean_text, normalize, tokens."""
    return tokens(normalize(clean_text(text, language), language), language)
