"""The request schema: OpenAI's chat completion JSON, checked field by field into a `ChatRequest`.

Every problem is an APIError 400 naming the field as OpenAI does (`param`: "messages[0].content[1].input_audio"),
raised before any audio is decoded or any token generated. Validation is ours rather than a framework's: OpenAI's
error body is the contract, and each field's range is GenerationOptions' (checked once more when it is built).
"""

import base64
import binascii
import json
import math
from dataclasses import dataclass

from ..chat_template import base_prompt
from ..commands import ASR_PROMPT  # what `qwen2audio transcribe` sends too
from .errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm")  # a hint: the bytes are sniffed anyway
MAX_STOP = 16
# Fields OpenAI defines that change nothing here when left at these values; any other value is a 400.
NEUTRAL = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
           "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "modalities": (["text"],),
           "response_format": ({"type": "text"},)}
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier"}
SAMPLING = {"temperature", "top_p", "top_k", "seed", "repetition_penalty", "min_tokens"}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options"} | SAMPLING


@dataclass(frozen=True)
class AudioItem:
    """One clip as the client sent it: base64-decoded bytes (input_audio) or a data:/http(s) URL (audio_url)."""
    param: str  # where it was in the request, for errors about it
    data: bytes | None = None
    url: str | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # our message format; audio parts are {"type": "audio", "audio": <index into audio>}
    audio: list[AudioItem]
    options: dict  # overrides for pipeline.options(); max_new_tokens None: "as much as the defaults and context allow"
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    raw_prompt: str | None = None  # a prompt in the base model's format instead of messages (transcriptions)
    response_format: str = "json"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, low: int, high: int = 2**63 - 1) -> int | None:
    value = body.get(name)
    if value is not None and not (_is_int(value) and low <= value <= high):
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {value!r:.40}", name, "invalid_value")
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (low < value if low_open else low <= value) and value <= high
    if not ok:
        span = f"{'above' if low_open else 'from'} {low} {'and at most' if low_open else 'to'} {high}"
        raise bad_request(f"{name} must be a number {span}, got {value!r:.40}", name, "invalid_value")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r:.40}", name, "invalid_value")
    return bool(value)


def check_fields(body: dict) -> None:
    for name, value in body.items():
        if name in KNOWN or name in IGNORED or value is None:
            continue
        if name not in NEUTRAL:
            raise bad_request(f"unrecognized request argument: {name!r:.60}", name, "unknown_parameter")
        if value not in NEUTRAL[name]:
            raise bad_request(f"{name}={value!r:.60} is not supported by this server (only "
                              f"{' or '.join(repr(v) for v in NEUTRAL[name])})", name, "unsupported_value")


def sampling_options(body: dict) -> dict:
    """OpenAI's / vLLM's sampling fields -> GenerationOptions overrides (None: the generation_config default).
    temperature 0 means greedy, as in vLLM; a temperature above 0 samples; top_k -1 or 0 turns top-k off."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_k = _int(body, "top_k", -1, 1 << 31)
    options = {"top_p": _number(body, "top_p", 0.0, 1.0, low_open=True), "top_k": 0 if top_k == -1 else top_k,
               "seed": _int(body, "seed", 0), "min_new_tokens": _int(body, "min_tokens", 0, 1 << 31),
               "repetition_penalty": _number(body, "repetition_penalty", 0.0, 100.0, low_open=True)}
    if temperature is not None:
        options["do_sample"] = temperature > 0
        options["temperature"] = temperature if temperature > 0 else None
    return options


def max_tokens(body: dict) -> int | None:
    given = [name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
    return _int(body, given[0], 1, 1 << 31) if given else None


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stop)


def _audio_part(part: dict, param: str) -> AudioItem:
    if part["type"] == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad_request("input_audio must be {\"data\": BASE64, \"format\": \"wav\"|\"mp3\"|...}", param)
        if audio.get("format") not in AUDIO_FORMATS:
            raise bad_request(f"input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, got "
                              f"{audio.get('format')!r:.30}", f"{param}.input_audio.format")
        try:
            return AudioItem(param, data=base64.b64decode(audio["data"], validate=True))
        except (binascii.Error, ValueError):
            raise bad_request("input_audio.data is not valid base64", f"{param}.input_audio.data",
                              "invalid_base64") from None
    url = part.get("audio_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.lower().startswith(("data:", "http://", "https://")):
        # security: local paths and file:// are refused here already, before the audio reader sees them
        raise bad_request("audio_url must be {\"url\": \"data:audio/...;base64,...\"} (or an http(s) URL where the "
                          "server allows them); local paths and file:// URLs are never read", f"{param}.audio_url")
    return AudioItem(param, url=url)


def _content(content: object, param: str, audio: list[AudioItem]) -> str | list[dict] | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts", param)
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("input_audio", "audio_url"):
            audio.append(_audio_part(part, where))
            parts.append({"type": "audio", "audio": len(audio) - 1})
        else:
            raise bad_request(f"content part type {kind!r:.30} is not supported; use text, input_audio or audio_url "
                              "(a text part needs a string 'text')", where)
    return parts


def messages(body: dict) -> tuple[list[dict], list[AudioItem]]:
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise bad_request("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    out, audio = [], []
    for i, message in enumerate(given):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.30}",
                              f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), f"messages[{i}].content", audio)})
    return out, audio


def parse_chat(body: bytes, served_name: str) -> ChatRequest:
    """The request from the body's bytes (run in the worker pool: a 25 MB body takes a while to parse)."""
    try:
        return chat_request(json.loads(body), served_name)
    except (UnicodeDecodeError, ValueError):
        raise bad_request("the request body is not valid JSON", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("the request body nests too deeply") from None


def chat_request(body: object, served_name: str) -> ChatRequest:
    """The checked request. An unknown model name is a 404 (OpenAI's model_not_found), every other problem a 400."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise bad_request("model is required: the served model's name (GET /v1/models lists it)", "model")
    if body["model"] != served_name:
        raise APIError(404, f"The model {body['model']!r:.80} does not exist; this server serves {served_name!r}",
                       "model", "model_not_found")
    check_fields(body)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "continuous_usage_stats"}:
        raise bad_request("stream_options must be {\"include_usage\": true|false}", "stream_options")
    stream = _bool(body, "stream")
    if stream_options and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    conversation, audio = messages(body)
    options = dict(sampling_options(body), max_new_tokens=max_tokens(body))
    return ChatRequest(body["model"], conversation, audio, options, stop_strings(body), stream,
                       _bool(stream_options, "include_usage"))


TRANSCRIPTION_FIELDS = {"file", "model", "language", "response_format", "temperature", "prompt"}


def transcription_request(fields: dict[str, str], file: bytes | None, served_name: str) -> ChatRequest:
    """OpenAI's multipart transcription form -> a raw-prompt request: the audio, then the ASR prompt, with the
    language tag `<|en|>` appended when `language` is given (the format of Qwen2-Audio's ASR evaluation)."""
    unknown = set(fields) - TRANSCRIPTION_FIELDS
    if unknown:
        raise bad_request(f"unrecognized form field: {sorted(unknown)[0]!r:.60}", sorted(unknown)[0])
    if file is None:
        raise bad_request("file is required: the audio file to transcribe, sent as a multipart upload", "file")
    if fields.get("model") != served_name:
        raise APIError(404, f"The model {fields.get('model')!r:.80} does not exist; this server serves "
                       f"{served_name!r}", "model", "model_not_found")
    language = fields.get("language") or ""
    if language and not (language.isascii() and language.isalpha() and language.islower() and len(language) <= 3):
        raise bad_request(f"language must be an ISO-639-1 code like 'en', got {language!r:.20}", "language")
    if fields.get("prompt"):
        raise bad_request("prompt is not supported: the ASR prompt is fixed (send language to name the language)",
                          "prompt")
    if fields.get("response_format", "json") not in ("json", "text"):
        raise bad_request("response_format must be json or text", "response_format")
    try:
        temperature = float(fields.get("temperature", "0"))
    except ValueError:
        temperature = math.nan
    options = sampling_options({"temperature": temperature}) | {"max_new_tokens": None}
    text = base_prompt(ASR_PROMPT + (f" <|{language}|>" if language else ""))
    return ChatRequest(served_name, [], [AudioItem("file", data=file)], options, raw_prompt=text,
                       response_format=fields.get("response_format", "json"))
