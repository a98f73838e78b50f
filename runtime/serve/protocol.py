"""OpenAI request bodies in, typed parameters out; or an APIError naming the field.

Every field of /v1/completions and /v1/chat/completions is checked here, before anything
reaches the scheduler: its type (a JSON `true` is not an integer), its range, and fields
that OpenAI defines but this server does not implement are accepted only at their
default (n=1, no logprobs, no penalties, ...), so a request is never silently served
with different semantics. Unknown fields are refused, as OpenAI refuses them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class Generation:
    """A validated request: the prompt (text or token ids) or the chat messages, and how
    to generate."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: the endpoint's default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


# Fields OpenAI defines that this server accepts only at their default value.
_DEFAULT_ONLY = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
           "n", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "best_of", "echo", "logprobs", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                         "response_format", "parallel_tool_calls"}


def parse_completion(body: dict, model_id: str, vocab_size: int) -> Generation:
    out = _common(body, COMPLETION_FIELDS, model_id)
    out.prompt = _prompt(body, vocab_size)
    out.max_tokens = _count(body, "max_tokens")
    return out


def parse_chat(body: dict, model_id: str) -> Generation:
    out = _common(body, CHAT_FIELDS, model_id)
    out.messages = _messages(body)
    out.max_tokens = _count(body, "max_completion_tokens")
    if out.max_tokens is None:
        out.max_tokens = _count(body, "max_tokens")
    return out


def _common(body: dict, known: set, model_id: str) -> Generation:
    for name in body:
        if name not in known:
            raise bad(name, f"unrecognized request argument: {name}")
    for name, allowed in _DEFAULT_ONLY.items():
        if name in body and body[name] is not None and not _among(body[name], allowed):
            raise bad(name, f"{name}={json.dumps(body[name])} is not supported by this server "
                            f"(leave it out, or give {json.dumps(allowed[0])})")
    if "user" in body and not isinstance(body["user"], (str, type(None))):
        raise bad("user", "user must be a string")
    model = body.get("model")
    if model is None:
        raise bad("model", "model is required (GET /v1/models lists the model this server runs)")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_kind(model)}")
    if model != model_id:
        raise bad("model", f"the model '{model}' does not exist here; this server runs '{model_id}'",
                  "model_not_found")
    out = Generation(model=model)
    temperature = _number(body, "temperature", 0.0, 2.0)
    out.temperature = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p", "top_p must be greater than 0")
    out.top_p = 1.0 if top_p is None else top_p
    out.seed = _integer(body, "seed")
    out.stop = _stop(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"stream must be true or false, got {_kind(stream)}")
    out.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not out.stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options", 'stream_options must be {"include_usage": true|false}')
        out.include_usage = options.get("include_usage", False)
    return out


def _among(value, allowed) -> bool:
    return any(type(value) is type(a) and value == a for a in allowed) or \
        any(type(a) is int and type(value) is float and value == a for a in allowed)


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise bad(name, f"{name} must be an integer, got {_kind(value)}")
    return value


def _count(body: dict, name: str) -> int | None:
    value = _integer(body, name)
    if value is not None and value < 1:
        raise bad(name, f"{name} must be at least 1, got {value}")
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bad(name, f"{name} must be a number, got {_kind(value)}")
    if not low <= value <= high:
        raise bad(name, f"{name} must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or an array of strings")
    if len(stops) > 4:
        raise bad("stop", f"stop takes at most 4 strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad("stop", "stop strings must not be empty")
    return stops


def _prompt(body: dict, vocab_size: int) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "prompt is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise bad("prompt", f"prompt token ids must be between 0 and {vocab_size - 1}")
        return prompt
    if isinstance(prompt, list) and not prompt:
        raise bad("prompt", "prompt is empty")
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", f"one prompt per request ({len(prompt)} given): send them as separate requests")
    raise bad("prompt", "prompt must be a string or an array of token ids")


_ROLES = ("system", "developer", "user", "assistant")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "messages is required")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(_ROLES)}, got {json.dumps(role)}")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", f"{where}.content parts must be text parts "
                                              '({"type": "text", "text": ...}); this server takes no images')
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string, got {_kind(content)}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not any(m["content"] for m in out):
        raise bad("messages", "every message is empty")
    return out
