"""A checked request -> model inputs and GenerationOptions, with every limit enforced before the model runs.

`prepare` runs in the server's worker pool, never on the event loop: decoding a clip can take up to the audio
policy's deadline (a download) or a second of CPU (a long MP3).
"""

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ..audio import AudioPolicy, load_audio
from ..errors import AudioError, InputError
from ..generate import GenerationOptions
from ..pipeline import Qwen2Audio
from ..chat_template import apply_chat_template
from .errors import APIError, bad_request, from_library
from .schema import ChatRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""
    context: int  # prompt + reply tokens: the cache row length
    policy: AudioPolicy  # what audio may be read: AudioPolicy.strict() with the server's choices
    long_audio: str = "truncate"  # clips over 30 s: "truncate" or "chunk", as the processor takes it
    defaults: tuple[tuple[str, object], ...] = ()  # the server's GenerationOptions overrides (command line)


def decode_clips(request: ChatRequest, policy: AudioPolicy) -> list[np.ndarray]:
    """Each audio item -> float32 mono 16 kHz, under the strict policy; an AudioError names the item."""
    clips = []
    for item in request.audio:
        try:
            clips.append(load_audio(item.data if item.data is not None else item.url, policy=policy))
        except AudioError as error:  # security: its message names the problem, never the bytes or a server path
            raise from_library(error, item.param) from None
    return clips


def prompt_text(request: ChatRequest) -> str:
    if request.raw_prompt is not None:
        return request.raw_prompt
    try:
        return apply_chat_template(request.messages, add_generation_prompt=True)
    except InputError as error:
        raise from_library(error, "messages") from None


def options_for(pipe: Qwen2Audio, request: ChatRequest, prompt_tokens: int, limits: Limits) -> GenerationOptions:
    """The request's options over the server's defaults over generation_config.json; an explicit max_tokens beyond
    the context is a 400, an absent one is cut to the room left."""
    room = limits.context - prompt_tokens
    asked = request.options.get("max_new_tokens")
    if room < 1 or (asked is not None and asked > room):
        asking = f" and max_tokens is {asked}" if asked else ""
        raise bad_request(f"the prompt holds {prompt_tokens} tokens (audio included){asking}, but this server's "
                          f"context is {limits.context} tokens; send less audio or text, or a smaller max_tokens",
                          "max_tokens" if room >= 1 else "messages", "context_length_exceeded")
    overrides = dict(limits.defaults) | {k: v for k, v in request.options.items() if v is not None}
    try:
        options = pipe.options(**overrides)
        return options if asked is not None else options.replace(max_new_tokens=min(options.max_new_tokens, room))
    except InputError as error:
        raise from_library(error) from None


@dataclass
class Prepared:
    inputs: dict[str, Tensor]  # input_ids (1, T), and input_features, feature_attention_mask with audio
    options: GenerationOptions

    @property
    def prompt_tokens(self) -> int:
        return self.inputs["input_ids"].shape[1]


def prepare(pipe: Qwen2Audio, request: ChatRequest, limits: Limits) -> Prepared:
    """Decode the audio, render the prompt, build the inputs, check them against the limits (blocking: worker pool)."""
    clips = decode_clips(request, limits.policy)
    try:
        inputs = pipe.processor(prompt_text(request), audio=clips or None, long_audio=limits.long_audio)
    except (AudioError, InputError) as error:
        raise from_library(error, "messages") from None
    return Prepared(inputs, options_for(pipe, request, inputs["input_ids"].shape[1], limits))


def server_busy(active: int, limit: int) -> APIError:
    return APIError(429, f"the server is full ({active} requests generating or waiting, at most {limit}); retry "
                    "in a moment", None, "server_full")
