"""The OpenAI request bodies this server takes, as pydantic models (strict: ``"4"`` is not an
integer, ``true`` is not a number), shared by the HTTP API, the gRPC API (whose requests become
these bodies) and the OpenAPI schema at ``/docs``.

Every way a body can be wrong is a :class:`ServingError` (400) in OpenAI's error shape, naming the
parameter (``messages[0].role``) and never echoing more than a few characters of what was sent:
:func:`parse_json` for the bytes, :func:`validate` for the fields.
"""

from __future__ import annotations

import json
import reprlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .logprobs import MAX_TOP_LOGPROBS

MAX_JSON_DEPTH = 32  # an OpenAI request nests about 5 levels (messages -> content parts)
# Arrays and objects in a body, counted as brackets before parsing (Python's parser takes seconds to
# build a million small lists): a batch of MAX_PROMPTS token-id prompts needs 4097.
MAX_JSON_CONTAINERS = 1 << 17
MAX_STOP = 4
MAX_N = 128
MAX_PROMPTS = 4096  # prompts in one request, checked before they are (a refused batch costs no scan of its items)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3
_COMMON_UNSUPPORTED = {
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
}
UNSUPPORTED = {  # OpenAI parameters this server does not implement: refused unless left at their default
    "completion": _COMMON_UNSUPPORTED | {"best_of": (None, 1), "suffix": (None, "")},
    "chat": _COMMON_UNSUPPORTED | {
        "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}), "echo": (None, False),
    },
}  # fmt: skip


class ServingError(Exception):
    """A refused request: HTTP status and the OpenAI error body's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def brief(value) -> str:
    """``repr(value)`` cut short (an error message echoes what was sent, never megabytes of it)."""
    return _REPR.repr(value)


# ---------------------------------------------------------------- fields


def _stop(value: Any) -> list[str]:
    stop = [value] if isinstance(value, str) else ([] if value is None else value)
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise PydanticCustomError(
            "invalid_value", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them"
        )
    return stop


def _prompts(value: Any) -> list[str] | list[list[int]]:
    """One prompt or a batch: a string, a list of strings, a list of token ids, a list of those."""

    def token_ids(item) -> bool:
        return isinstance(item, list) and bool(item) and all(type(t) is int for t in item)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if isinstance(value[0], (str, list)):  # a batch
            if len(value) > MAX_PROMPTS:
                raise PydanticCustomError(
                    "invalid_value", f"'prompt' holds {len(value)} prompts; at most {MAX_PROMPTS} go in one request"
                )
            if all(isinstance(item, str) for item in value) or all(token_ids(item) for item in value):
                return value
        elif token_ids(value):
            return [value]
    raise PydanticCustomError(
        "invalid_type",
        "'prompt' must be a string, a list of strings, a non-empty list of token ids, or a list of such lists",
    )


def _content(value: Any) -> str:
    if isinstance(value, list):  # [{"type": "text", "text": ...}]
        if not all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in value
        ):
            raise PydanticCustomError("invalid_value", "only text parts are supported")
        return "".join(part["text"] for part in value)
    if not isinstance(value, str):
        raise PydanticCustomError("invalid_type", "must be a string or a list of text parts")
    return value


_STRING_OR_LIST = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        {"type": "null"},
    ]
}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
        },
    ]
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat share."""

    model: str = Field(description="a registered job's name, or 'base' for the bare base model")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt (sampled; each gets seed + i)")
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: Annotated[Any, WithJsonSchema(_STRING_OR_LIST)] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str]:
        return _stop(value)

    @field_validator("temperature", "top_p", "n", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists"
    )
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool = Field(False, description="return the prompt before the completion (and its tokens' logprobs)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probability of each token and its N most likely alternatives"
    )

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str] | list[list[int]]:
        return _prompts(value)

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)]

    @field_validator("content", mode="plain")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        return _content(value)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages are rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="log-probability of each completion token")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the N most likely alternatives"
    )

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_list(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise PydanticCustomError("invalid_type", "'messages' must be a non-empty list of {role, content}")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs")
        return self

    @property
    def completion_limit(self) -> tuple[str, int | None]:
        """The completion's length limit and the parameter that set it."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class LoadLoraAdapterRequest(_Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's): register ``lora_path`` as ``lora_name``."""

    lora_name: str
    lora_path: str = Field(description="a finished job directory or an adapter file on the server")
    load_inplace: bool = Field(False, description="replace a job of the same name")
    plugin_gain: float | None = Field(None, description="serve at this plug-in gain (default: the source's own)")


class UnloadLoraAdapterRequest(_Strict):
    """``POST /v1/unload_lora_adapter`` (vLLM's)."""

    lora_name: str


class RegisterRequest(_Strict):
    """``POST /admin/models``."""

    name: Any = None
    path: str = Field(min_length=1, description="a finished job directory or an adapter file on the server")
    replace: bool = False
    plugin_gain: Any = None  # checked by the registration, in its own words


# ---------------------------------------------------------------- validation

_CROSS_FIELD = {  # a model_validator's ValueError names its parameter; what it means
    "max_tokens": "'max_tokens' must be >= 1 (0 only with echo: true, to score the prompt)",
    "top_logprobs": "'top_logprobs' needs logprobs: true",
}


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _error(detail: dict) -> ServingError:
    param, kind = _param(detail["loc"]), detail["type"]
    if kind == "missing":
        return ServingError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    if kind == "value_error" and detail.get("ctx", {}).get("error") is not None:
        name = str(detail["ctx"]["error"])
        return ServingError(400, _CROSS_FIELD.get(name, f"'{name}' is invalid"), param=name, code="invalid_value")
    code = (
        "invalid_type"
        if kind.endswith("_type") or kind in ("invalid_type", "model_attributes_type")
        else "invalid_value"
    )
    message = detail["msg"] if detail["msg"].startswith("'") else f"Invalid '{param}': {detail['msg']}"
    if "input" in detail and kind not in ("invalid_type", "invalid_value"):
        message += f" (got {brief(detail['input'])})"
    return ServingError(400, message, param=param, code=code)


def validate(model: type[BaseModel], body: Any, unsupported: dict | None = None) -> Any:
    """``body`` (parsed JSON) as ``model``, or the ServingError that says what is wrong with it."""
    if not isinstance(body, dict):
        raise ServingError(400, "the request body must be a JSON object", code="invalid_json")
    for key, defaults in (unsupported or {}).items():
        if key in body and body[key] not in defaults:
            raise ServingError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _error(error.errors(include_url=False)[0]) from None


def parse_json(raw: bytes) -> dict:
    """A request body: one JSON object, at most :data:`MAX_JSON_DEPTH` levels deep. Every way it
    can be wrong is a ServingError (400) that says how, in words of its own."""
    containers = raw.count(b"[") + raw.count(b"{")  # an upper bound: brackets inside strings count too
    if containers > MAX_JSON_CONTAINERS:
        raise ServingError(
            400, f"the body holds more than {MAX_JSON_CONTAINERS} arrays and objects", code="invalid_json"
        )
    try:
        body = json.loads(raw) if raw else None
    except json.JSONDecodeError as error:
        raise ServingError(
            400,
            f"the body is not valid JSON ({error.msg}: line {error.lineno} column {error.colno})",
            code="invalid_json",
        ) from None
    except UnicodeDecodeError:
        raise ServingError(400, "the body is not valid JSON (not UTF-8 text)", code="invalid_json") from None
    except RecursionError:
        raise ServingError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError:  # an integer literal past Python's 4300-digit limit
        raise ServingError(400, "the body holds a number too long to read", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServingError(400, "the body must be a JSON object", code="invalid_json")
    level, depth = [body], 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise ServingError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        depth += 1
    return body
