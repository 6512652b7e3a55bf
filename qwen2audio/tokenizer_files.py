"""Reading a checkpoint's tokenizer files: tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json.

Every file is read as a regular file of bounded size (a FIFO or a device in its place is refused, never waited on),
must be UTF-8 and of the shape it should have; anything else is a ConfigError naming the file and the field. The
`tokenizers` library only ever sees text we read ourselves, and its own errors become ConfigErrors too.
"""

from pathlib import Path

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _BackendTokenizer
from tokenizers.models import BPE

from .files import parse_json, present, read_json_file, read_regular_file
from .errors import ConfigError

MAX_TOKEN_ID = 2**31 - 1  # ids beyond this cannot be an embedding row (and overflow the library's u32)
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _read_text(path: Path) -> str:
    raw = read_regular_file(path, path.name, error=ConfigError)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); copy the file again from the model's repo")


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json as a dict ({} when the folder has none)."""
    path = folder / "tokenizer_config.json"
    if not present(path):
        return {}
    config = read_json_file(path, "tokenizer_config.json", ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _library_error(path: Path, e: BaseException) -> ConfigError:
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return ConfigError(f"{path} is not a tokenizer the tokenizers library can read ({reason})")


def library_call(fn, path: Path):
    """fn(), with the tokenizers library's errors as ConfigErrors naming the file: it raises plain Exceptions for a
    bad file, and for some (a BPE whose prefix is longer than a token) a Rust panic, which Python sees as a
    PanicException deriving from BaseException."""
    try:
        return fn()
    except Exception as e:
        raise _library_error(path, e) from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        raise _library_error(path, e) from None


# The BPE settings of Qwen2's byte-level tokenizer; a file setting others describes another tokenizer (and some
# values make the library panic).
_QWEN2_BPE = {"continuing_subword_prefix": (None, ""), "end_of_word_suffix": (None, ""), "dropout": (None,),
              "byte_fallback": (None, False), "fuse_unk": (None, False)}


def _check_bpe_spec(spec: object, path: Path) -> None:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(spec).__name__}")
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise ConfigError(f"{path} holds a {kind!r:.40} model, not the byte-level BPE of Qwen2")
    for key, allowed in _QWEN2_BPE.items():
        if model.get(key) not in allowed:
            raise ConfigError(f"{path}: model.{key} is {model.get(key)!r:.40}; Qwen2's byte-level BPE has "
                              f"{allowed[-1]!r}")


def _from_tokenizer_json(path: Path) -> _BackendTokenizer:
    text = _read_text(path)
    try:
        _check_bpe_spec(parse_json(text.encode(), str(path)), path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    backend = library_call(lambda: _BackendTokenizer.from_str(text), path)
    if not isinstance(backend.model, BPE):
        raise ConfigError(f"{path} holds a {type(backend.model).__name__} model, not the byte-level BPE of Qwen2")
    return backend


def _vocab(path: Path) -> dict[str, int]:
    vocab = read_json_file(path, "vocab.json", ConfigError)
    if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i <= MAX_TOKEN_ID for i in vocab.values()):
        raise ConfigError(f"{path} must map each token to its id (an integer from 0 to {MAX_TOKEN_ID})")
    return vocab


def _merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as the tokenizers library reads it: a `#version` line, then one "left right" pair a line."""
    lines = _read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"{path} line {number} is not a merge of two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _from_vocab_files(folder: Path) -> _BackendTokenizer:
    """The tokenizer.json model rebuilt from vocab.json + merges.txt."""
    vocab, merges = _vocab(folder / "vocab.json"), _merges(folder / "merges.txt")
    tok = library_call(lambda: _BackendTokenizer(BPE(vocab, merges, continuing_subword_prefix="",
                                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False)),
                       folder / "merges.txt")  # merges naming tokens the vocabulary lacks, ...
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as in tokenizer.json: adds no tokens, no BOS
    return tok


def read_backend(folder: Path) -> _BackendTokenizer:
    """The BPE tokenizer of a folder: tokenizer.json if present, else vocab.json + merges.txt."""
    if present(folder / "tokenizer.json"):
        return _from_tokenizer_json(folder / "tokenizer.json")
    if present(folder / "vocab.json") and present(folder / "merges.txt"):
        return _from_vocab_files(folder)
    raise ConfigError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt "
                      "(copy them from the Hugging Face repo of the model)")


def _declared_tokens(config: dict, path: Path) -> list[tuple[int, dict]]:
    """tokenizer_config.json's added_tokens_decoder as (id, spec) in id order, every field checked."""
    declared = config.get("added_tokens_decoder", {})
    if not isinstance(declared, dict):
        raise ConfigError(f"{path}: added_tokens_decoder must be an object of id -> token, got "
                          f"{type(declared).__name__}")
    tokens = []
    for key, spec in declared.items():
        if not (key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
            raise ConfigError(f"{path}: added_tokens_decoder key {key[:40]!r} is not a token id (0..{MAX_TOKEN_ID})")
        if not isinstance(spec, dict) or type(spec.get("content")) is not str or not spec["content"] or \
                any(type(spec.get(flag, False)) is not bool for flag in _ADDED_TOKEN_FLAGS):
            raise ConfigError(f"{path}: added_tokens_decoder[{key}] must be an object with a non-empty string "
                              f"'content' and true/false flags ({', '.join(_ADDED_TOKEN_FLAGS)})")
        tokens.append((int(key), spec))
    return sorted(tokens, key=lambda t: t[0])


def add_declared_tokens(backend: _BackendTokenizer, config: dict, path: Path) -> None:
    """Add the declared tokens the vocabulary lacks, in id order so that each lands on the next free id (one call:
    adding them one by one rebuilds the library's matcher each time), then check each has its declared id."""
    declared = _declared_tokens(config, path)
    new = [AddedToken(spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                      rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                      special=spec.get("special", True))
           for _, spec in declared if backend.token_to_id(spec["content"]) is None]
    if new:
        library_call(lambda: backend.add_tokens(new), path)
    for token_id, spec in declared:
        if backend.token_to_id(spec["content"]) != token_id:
            raise ConfigError(f"{path}: added token {spec['content'][:40]!r} is declared with id {token_id} but the "
                              f"vocabulary gives it id {backend.token_to_id(spec['content'])}")


def special_token_string(config: dict, key: str, default: str | None, folder: Path) -> str | None:
    """tokenizer_config.json writes a special token as a string, as an AddedToken object with "content", or null."""
    value = config.get(key, default)
    value = value.get("content", 0) if isinstance(value, dict) else value  # an object without content: refused
    if value is not None and (type(value) is not str or not value):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: {key} must be a token (a string, or an object with "
                          "a string 'content') or null")
    return value
