"""The evaluation's text normalisation and metrics on crafted cases.

OFFICIAL values were printed by the official code itself: QwenLM/Qwen2-Audio eval_audio/evaluate_asr.py at commit
595360e (its remove_sp and compute_wer, with its own copies of Whisper's normalisers and of speechio's cn_tn.py,
and sacrebleu 1.5.1, which its EvaluationTokenizer needs), run once on exactly these strings. Other expected values
come from the package a metric follows (sacrebleu, whisper-normalizer, editdistance) or are counted by hand.
"""

import math

import pytest

from qwen2audio.evaluation.errors import EvalError
from qwen2audio.evaluation.metrics import (accuracy, asr_score, bleu_tokenizer, corpus_bleu, corpus_wer,
                                           edit_distance, exact_match)
from qwen2audio.evaluation.text import clean_text, normalize_chinese, tokens, wer_tokens


def wer(language: str, refs: list[str], hyps: list[str]) -> float:
    return corpus_wer([asr_score(h, r, language) for r, h in zip(refs, hyps)])


# ------------------------------------------------------------------------------------- clean-up and tokens
@pytest.mark.parametrize("language, text, cleaned, official_tokens", [
    ("en", "<|en|>I can't believe it's 1990!", "I can't believe it's 1990!",
     ["i", "can", "not", "believe", "it", "is", "1990"]),
    # spaces before , and ? go; Whisper's English normaliser turns "7 o'clock" into "70 clock" (a quirk of its own)
    ("en", "We'll meet at 7 o'clock , OK ?", "We'll meet at 7 o'clock, OK?",
     ["we", "will", "meet", "at", "70", "clock", "ok"]),
    # the basic normaliser after the English one: "$10000" loses "$", and "25.5%" becomes two words "25 5"
    ("en", "He paid $10,000 for 25.5% of the shares, didn't he?",
     "He paid $10,000 for 25.5% of the shares, didn't he?",
     ["he", "paid", "10000", "for", "25", "5", "of", "the", "shares", "did", "not", "he"]),
    ("en", "Um, I think (laughs) that's [noise] right.", "Um, I think (laughs) that's [noise] right.",
     ["i", "think", "that", "is", "right"]),
    ("en", "Mr. Smith's colour TV costs £3.50.", "Mr. Smith's colour TV costs £3.50.",
     ["mister", "smith", "is", "color", "tv", "costs", "3", "50"]),
    # Chinese: every space goes at clean-up; numbers read out, punctuation removed, one token per character
    ("zh", " 他说：“我有1000本书！” 好 的", "他说：“我有1000本书！”好的",
     ["他", "说", "我", "有", "一", "千", "本", "书", "好", "的"]),
    # Cantonese: traditional -> simplified (zhconv), then per character
    ("yue", "佢哋喺度食緊飯。", "佢哋喺度食緊飯。", ["佢", "哋", "喺", "度", "食", "紧", "饭"]),
    # French: the basic normaliser only (accents kept, apostrophes split words)
    ("fr", "Bonjour, ça va ? C'est l'été !", "Bonjour, ça va? C'est l'été!",
     ["bonjour", "ça", "va", "c", "est", "l", "été"]),
])
def test_clean_up_and_tokens_as_the_official_script(language, text, cleaned, official_tokens):
    assert clean_text(text, language) == cleaned
    assert wer_tokens(text, language) == official_tokens


def test_evaluation_tokenizer_drops_punctuation_words_then_lowercases():
    # fairseq's EvaluationTokenizer: a word made only of Unicode punctuation goes; a word with a letter stays whole
    assert tokens("Hello , -- «world» x-ray ¿", "fr") == ["hello", "«world»", "x-ray"]
    assert tokens("ab CD", "zh") == ["a", "b", "c", "d"]


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert edit_distance([], ["a"]) == 1 and edit_distance(["a"], []) == 1


# ------------------------------------------------------------------------------------- corpus WER
def test_wer_is_summed_over_the_corpus_not_averaged():
    scores = [{"errors": 1, "reference_tokens": 2}, {"errors": 0, "reference_tokens": 8}]
    assert corpus_wer(scores) == pytest.approx(1 / 10)  # the mean of per-item rates would be 0.25
    assert math.isnan(corpus_wer([{"errors": 0, "reference_tokens": 0}]))  # the official script divides by zero


@pytest.mark.parametrize("language, refs, hyps, official", [
    ("en", ["<|en|>I can't believe it's 1990!", "We'll meet at 7 o'clock , OK ?"],
     ["<|en|> i cannot believe it is nineteen ninety", "we will meet at seven o'clock okay"], 3 / 14),
    ("en", ["He paid $10,000 for 25.5% of the shares, didn't he?", "Mr. Smith's colour TV costs £3.50."],
     [" he paid ten thousand dollars for twenty five point five percent of the shares did not he",
      "mister smith's color tv costs three pounds fifty"], 0.0),
    ("zh", ["我在2019年3月5日出生，价格是12.5元。", "增长了50%，一共有3个人！"],
     ["我在二零一九年三月五日出生价格是十二点五元", "增长了百分之五十 一共有三个人"], 0.0),
    ("yue", ["佢哋喺度食緊飯。", "我哋聽日見"], ["佢哋喺度食紧饭", "我哋听日见啦"], 1 / 12),
    ("fr", ["Bonjour, ça va ? C'est l'été !", "Il a 3 ans."], ["bonjour ça va c'est l'ete", "il a trois ans"],
     2 / 11),
])
def test_corpus_wer_equals_the_official_script(language, refs, hyps, official):
    assert wer(language, refs, hyps) == pytest.approx(official, abs=1e-12)


def test_english_quirk_basic_after_english_changes_the_number():
    """The official chain sends English through Whisper's English normaliser and then the basic one: "25.5%"
    becomes two words. The official script prints wer: 0.2000; the English normaliser alone would give 0.25."""
    from whisper_normalizer.english import EnglishTextNormalizer

    refs, hyps = ["It costs 25.5% more."], ["it costs 25% more"]
    assert wer("en", refs, hyps) == pytest.approx(0.2)  # OFFICIAL: 1 deletion over "it costs 25 5 more"
    english = EnglishTextNormalizer()
    english_only = edit_distance(english(refs[0]).split(), english(hyps[0]).split()) / len(english(refs[0]).split())
    assert english_only == pytest.approx(0.25)


CN_TN_AGREES = [  # (text, what the official cn_tn prints): cn2an reads these the same way
    ("我在2019年3月5日出生", "我在二零一九年三月五日出生"),
    ("价格是12.5元", "价格是十二点五元"),
    ("增长了50%", "增长了百分之五十"),
    ("大约1/3的人", "大约三分之一的人"),
    ("我有1000本书", "我有一千本书"),
]
CN_TN_DIFFERS = [  # (text, cn_tn, cn2an): bare numbers of 4+ digits, phone numbers, 两 before 百/千, "25年"
    ("大约有5000名观众", "大约有五零零零名观众", "大约有五千名观众"),
    ("电话13800138000", "电话一三八零零一三八零零零", "电话一百三十八亿零一十三万八千"),
    ("共有200多名志愿者", "共有两百多名志愿者", "共有二百多名志愿者"),
    ("已经25年了", "已经二十五年了", "已经二五年了"),
]


@pytest.mark.parametrize("text, cn_tn", CN_TN_AGREES)
def test_chinese_numbers_as_the_official_cn_tn(text, cn_tn):
    assert normalize_chinese(text) == cn_tn


@pytest.mark.parametrize("text, cn_tn, ours", CN_TN_DIFFERS)
def test_chinese_numbers_where_cn2an_differs_from_cn_tn(text, cn_tn, ours):
    assert normalize_chinese(text) == ours != cn_tn


def test_chinese_difference_shows_in_the_wer():
    """Replies that write 4-digit numbers in digits. The official script prints wer: 0.1667: cn_tn reads 5000 as
    五零零零 (3 edits against 五千) and 2024 as 二零二四 (0 edits). Ours is 0.1111: cn2an reads 5000 as 五千
    (0 edits) and 2024 as 二千零二十四 (2 edits against 二零二四)."""
    refs, hyps = ["约五千人参加了会议", "编号二零二四的房间"], ["约5000人参加了会议", "编号2024的房间"]
    assert [asr_score(h, r, "zh")["errors"] for r, h in zip(refs, hyps)] == [0, 2]  # official: [3, 0]
    assert wer("zh", refs, hyps) == pytest.approx(2 / 18)  # official: 3 / 18


def test_chinese_punctuation_set():
    # cn_tn's set: ASCII punctuation and CJK marks; the full-width full stop U+FF0E is not in it, so it stays
    assert normalize_chinese("你好，世界！「对」…《书》").split() == ["你好", "世界", "对", "书"]
    assert "．" in normalize_chinese("你好．")


# ------------------------------------------------------------------------------------- BLEU
HYPS = ["Das ist ein kleiner Test, nicht wahr?", "Er sagte: \"Hallo\" — und ging.", "", "the cat sat on the mat."]
REFS = ["Das ist ein Test, oder?", "Er sagte „Hallo“ und ging.", "Nichts.", "The cat sat on the mat."]
ZH_HYPS = ["我今天很高兴，因为天气很好。", "他说：“你好！”然后走了。"]
ZH_REFS = ["今天我很开心，因为天气不错。", "他说“你好”，然后离开了。"]


@pytest.mark.parametrize("tokenize", ["13a", "zh", "intl", "none"])
def test_bleu_is_sacrebleus_corpus_bleu(tokenize):
    import sacrebleu

    for hyps, refs in ((HYPS, REFS), (ZH_HYPS, ZH_REFS)):
        assert corpus_bleu(hyps, refs, tokenize) == sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score


def test_bleu_values_as_sacrebleu_1_5_1_prints_them():
    # sacrebleu 1.5.1 (the version EVALUATION.md pins) printed these for the same texts; 2.x gives the same
    assert corpus_bleu(HYPS, REFS, "13a") == pytest.approx(35.870175592738036, abs=1e-9)
    assert corpus_bleu(ZH_HYPS, ZH_REFS, "zh") == pytest.approx(26.46776498542415, abs=1e-9)
    assert corpus_bleu(ZH_HYPS, ZH_REFS, "13a") == 0.0  # Chinese scored with 13a: one "word" per clause


@pytest.mark.parametrize("source, tokenize", [
    ("covost2_en_zh_test", "zh"), ("covost2_zh_en", "zh"), ("covost2_en_ja_test", "ja-mecab"),
    ("covost2_en_de_test", "13a"), ("covost2_zh", "13a"), ("covost2", "13a"),
])
def test_bleu_tokenizer_follows_the_second_to_last_field_of_source(source, tokenize):
    assert bleu_tokenizer(source) == tokenize


def test_japanese_bleu_without_mecab_names_the_install(monkeypatch):
    import sacrebleu

    def no_mecab(*args, **kwargs):
        raise RuntimeError("Japanese tokenization requires extra dependencies")

    monkeypatch.setattr(sacrebleu, "corpus_bleu", no_mecab)
    with pytest.raises(EvalError, match=r"pip install 'sacrebleu\[ja\]'"):
        corpus_bleu(["a"], ["a"], "ja-mecab")


# ------------------------------------------------------------------------------------- accuracy
def test_accuracy_strips_leading_whitespace_only():
    replies = [" happy", "\nsad", "neutral ", "Anger", "surprise"]
    refs = ["happy", "sad", "neutral", "anger", "surprise"]
    correct = [exact_match(r, g) for r, g in zip(replies, refs)]
    assert correct == [True, True, False, False, True]  # trailing space and case count, as in sklearn's accuracy
    assert accuracy(correct) == pytest.approx(3 / 5)
    assert math.isnan(accuracy([]))
