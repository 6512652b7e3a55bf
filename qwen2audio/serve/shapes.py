"""OpenAI's response bodies, field for field (the `openai` client parses them into its own types)."""

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id: str, model: str, created: int, delta: dict | None, finish: str | None = None,
          include_usage: bool = False, usage_now: dict | None = None) -> dict:
    """A stream chunk. With include_usage every chunk has "usage": null except the last, which has no choices."""
    body = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
    if include_usage:
        body["usage"] = usage_now
    return body


def sse(body: dict) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def model_list(name: str, context: int, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "qwen2audio",
                                        "max_model_len": context}]}


def transcription(text: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"text": text, "usage": {"type": "tokens", "input_tokens": prompt_tokens,
                                    "output_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}}
