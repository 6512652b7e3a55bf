"""The Qwen2 byte-level BPE tokenizer (matches transformers' Qwen2Tokenizer), its special tokens, streaming decode.

A checkpoint ships `tokenizer.json` (the whole pipeline, read by the `tokenizers` library) and also `vocab.json` +
`merges.txt`; from the latter two we rebuild the same pipeline: NFC normalisation, the Qwen split regex, byte-level
mapping, BPE, no BOS. Added tokens (`<|im_start|>`, `<|AUDIO|>`, ...) come from tokenizer_config.json's
`added_tokens_decoder`, at the ids it declares.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer

from .errors import ConfigError
from .tokenizer_files import add_declared_tokens, read_backend, read_tokenizer_config, special_token_string

# Qwen2's pre-tokenizer split (transformers' PRETOKENIZE_REGEX): contractions, letter runs with one optional leading
# non-letter, single digits (numbers are split digit by digit), punctuation runs, newlines, other whitespace.
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
REQUIRED_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS)  # the prompt format's tags
REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decode shows for an incomplete UTF-8 sequence


def _set_qwen2_pipeline(tok: _BackendTokenizer) -> _BackendTokenizer:
    """Install Qwen2's text pipeline around the BPE model.

    parity: transformers 5.24 builds Qwen2Tokenizer's pipeline in code even when tokenizer.json is present (it
    keeps only the vocabulary, merges, added tokens and post-processor of the file), so we do the same.
    """
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars, no regex
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Text <-> token ids for Qwen2-Audio. Special tokens written inside the text are recognised as such."""

    def __init__(self, backend: _BackendTokenizer, eos_token: str | None = ENDOFTEXT,
                 pad_token: str | None = ENDOFTEXT, source: Path | None = None) -> None:
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.source = source  # the folder it was read from, named in errors

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Load from a checkpoint folder: tokenizer.json if present, else vocab.json + merges.txt; the files are
        checked (tokenizer_files.py), and so are the special tokens a Qwen2-Audio prompt needs."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        backend = _set_qwen2_pipeline(read_backend(folder))
        add_declared_tokens(backend, config, folder / "tokenizer_config.json")
        # Qwen2Tokenizer's defaults when tokenizer_config.json does not name them; an explicit null stays None.
        eos = special_token_string(config, "eos_token", ENDOFTEXT, folder)
        pad = special_token_string(config, "pad_token", ENDOFTEXT, folder)
        for token in (eos, pad):  # transformers registers them as special tokens if the files did not
            if token is not None and backend.token_to_id(token) is None:
                backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        tokenizer = cls(backend, eos_token=eos, pad_token=pad, source=folder)
        tokenizer.check_special_tokens()
        return tokenizer

    def check_special_tokens(self) -> None:
        """Each tag of the prompt format must encode to its one id: a tokenizer that lacks one, or holds it as
        ordinary text, would cut `<|AUDIO|>` into pieces and the model would answer nonsense."""
        for token in REQUIRED_TOKENS:
            token_id, ids = self.backend.token_to_id(token), self.backend.encode(token, add_special_tokens=False).ids
            if token_id is None or ids != [token_id]:
                raise ConfigError(f"the tokenizer in {self.source} does not hold {token} as one token (it encodes "
                                  f"as {len(ids)} tokens of text); a Qwen2-Audio tokenizer declares it in "
                                  "tokenizer_config.json's added_tokens_decoder: copy the tokenizer files of the "
                                  "model's Hub repo")

    def check_model(self, vocab_size: int, audio_token_index: int, config_file: Path | str) -> None:
        """The model must have an embedding row for every id this tokenizer produces and read audio at the id of
        <|AUDIO|>; a ConfigError naming both files otherwise."""
        top = max(self.backend.get_vocab(with_added_tokens=True).values())
        if top >= vocab_size:
            raise ConfigError(f"the tokenizer in {self.source} has token ids up to {top}, but {config_file} "
                              f"declares text_config.vocab_size {vocab_size}: the model has no embedding for them; "
                              "the tokenizer and the weights are not from one model")
        if self.audio_token_id != audio_token_index:
            raise ConfigError(f"{config_file} declares audio_token_index {audio_token_index}, but the tokenizer in "
                              f"{self.source} gives {AUDIO} the id {self.audio_token_id}; the tokenizer and the "
                              "config are not from one model")

    # --- ids -------------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"the tokenizer has no {token} token; is this a Qwen2-Audio checkpoint?")
        return token_id

    @property
    def audio_token_id(self) -> int:
        return self._required_id(AUDIO)  # 151646

    @property
    def audio_bos_id(self) -> int:
        return self._required_id(AUDIO_BOS)  # 151647

    @property
    def audio_eos_id(self) -> int:
        return self._required_id(AUDIO_EOS)  # 151648

    @property
    def im_start_id(self) -> int:
        return self._required_id(IM_START)  # 151644

    @property
    def im_end_id(self) -> int:
        return self._required_id(IM_END)  # 151645, where an Instruct reply ends

    @property
    def endoftext_id(self) -> int:
        return self._required_id(ENDOFTEXT)  # 151643

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids that decode(..., skip_special_tokens=True) drops."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)  # as len() of a transformers tokenizer

    # --- text <-> ids ----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, as transformers' decode with clean_up_tokenization_spaces=False. Invalid UTF-8 -> U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Decodes ids one at a time into text pieces whose concatenation equals `decode(all ids)`.

    One character can span several byte-level tokens (most CJK characters and emoji are 3-4 bytes), so the text of the
    ids since the last emitted piece is held back while it ends in U+FFFD (an incomplete UTF-8 sequence). Once a
    piece ends on a whole character, byte-level decoding of what follows does not depend on it, so only the pending
    ids are decoded each step.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []  # ids not yet emitted as text

    def put(self, token_id: int) -> str:
        """Add one id; returns the text that is now complete ("" while a character is unfinished)."""
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """The held-back rest at the end of generation (it may end in U+FFFD if the model stopped mid-character)."""
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens) if self.pending else ""
        self.pending = []
        return text

    def pieces(self, ids: Iterable[int]) -> Iterator[str]:
        """All non-empty pieces for a sequence of ids, then the flushed rest."""
        for token_id in ids:
            if piece := self.put(token_id):
                yield piece
        if rest := self.flush():
            yield rest
