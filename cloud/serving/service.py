"""Requests as the APIs see them: what HTTP and gRPC share.

:class:`ServingService` holds the base model once (through :class:`.engine.LlamaStack`), the
registered jobs and the scheduler. It turns an OpenAI-style request body into a prompt and
sampling parameters (refusing bad ones with :class:`ServingError`, which carries the HTTP status
and the OpenAI error body), and hands back a :class:`Generation`: the request's text as it is
decoded, with stop sequences applied and the request cancelled when its client goes away.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import queue
import reprlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from offsite.cloud.presets import check_gain

from . import registry
from .engine import (
    LlamaStack,
    QueueFull,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerClosed,
)
from .registry import BASE_MODEL, RegistryError, ServedJob

log = logging.getLogger(__name__)

MAX_STOP = 4
MAX_UPLOAD_BYTES = 4 << 30
UPLOAD_CHUNK = 1 << 20
# A prompt longer than (context limit x the longest token's characters x this) cannot fit, whatever
# its tokens: refused before it is tokenised. The factor covers normalisers that compose characters
# (NFC/NFKC join at most a few code points into one).
PROMPT_CHARS_SLACK = 4
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3
UNSUPPORTED = {  # OpenAI parameters this server does not implement: refused unless left at their default
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
}  # fmt: skip


class ServingError(Exception):
    """A refused request: HTTP status and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client of a generation went away; the request was cancelled."""


@dataclass(frozen=True)
class ServeConfig:
    """What ``offsite cloud serve`` was asked for."""

    registry: Path
    base_name: str = "base"
    max_batch: int = 32
    max_context: int | None = 2048
    default_max_tokens: int = 256
    max_queue: int = 256
    prefill_tokens: int = 2048
    api_keys: frozenset[str] = frozenset()
    admin_token: str | None = None
    request_timeout: float = 600.0  # a generation that makes no progress for this long fails
    max_connections: int = 256  # open HTTP connections (one thread each) and concurrent gRPC calls, each
    idle_timeout: float = 60.0  # seconds a connection may wait for its client (idle keep-alive, a stalled body)

    def __post_init__(self) -> None:
        if min(self.max_batch, self.default_max_tokens, self.max_queue, self.prefill_tokens, self.max_connections) < 1:
            raise ValueError("max_batch, default_max_tokens, max_queue, prefill_tokens and max_connections must be >= 1")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


@dataclass
class Prepared:
    """A validated request, ready to run."""

    model: str
    job: ServedJob | None
    prompt: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def brief(value) -> str:
    """``repr(value)`` cut short (an error message echoes what was sent, never megabytes of it)."""
    return _REPR.repr(value)


def _number(body: dict, key: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ServingError(400, f"'{key}' must be a number, got {brief(value)}", param=key, code="invalid_type")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ServingError(400, f"'{key}' must be in {bound}, got {brief(value)}", param=key, code="invalid_value")
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServingError(400, f"'{key}' must be an integer, got {brief(value)}", param=key, code="invalid_type")
    if value < low:
        raise ServingError(400, f"'{key}' must be >= {low}, got {brief(value)}", param=key, code="invalid_value")
    return value


class ServingService:
    """The base model, the registered jobs, the scheduler, and the requests' validation."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stack = LlamaStack(model, config.max_context, slots=config.max_batch)
        self.scheduler = Scheduler(self.stack, self._eos_ids(), max_queue=config.max_queue, prefill_tokens=config.prefill_tokens)
        self.created = int(time.time())
        self.max_prompt_chars = self.context_length * _longest_token(tokenizer) * PROMPT_CHARS_SLACK
        self._jobs: dict[str, ServedJob] = {}
        self._lock = threading.Lock()  # guards _jobs
        self._admin = threading.Lock()  # one registration at a time
        for name in registry.names(config.registry):
            try:
                self._jobs[name] = registry.load(config.registry, name, model)
            except (RegistryError, ValueError, OSError) as error:
                log.error("not serving %s: %s", name, error)
        log.info("serving %d job(s) on %s: %s", len(self._jobs), config.base_name, ", ".join(sorted(self._jobs)) or "-")

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else list(value or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def context_length(self) -> int:
        return self.stack.context_length

    def close(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------ models

    def jobs(self) -> dict[str, ServedJob]:
        with self._lock:
            return dict(self._jobs)

    def model_info(self, name: str, job: ServedJob | None) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": int(job.meta.get("created", self.created)) if job else self.created,
            "owned_by": "offsite",
            "kind": "base" if job is None else job.mode,
            "adapter_blocks": [] if job is None else job.adapter_blocks,
            "base": self.config.base_name,
            "context_length": self.context_length,
        }

    def models(self) -> list[dict]:
        return [self.model_info(BASE_MODEL, None)] + [self.model_info(name, job) for name, job in sorted(self.jobs().items())]

    def resolve(self, name) -> ServedJob | None:
        if name is None or name == "":
            raise ServingError(400, "'model' is required: a job's name or 'base'", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise ServingError(400, f"'model' must be a string, got {brief(name)}", param="model", code="invalid_type")
        if name == BASE_MODEL:
            return None
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise ServingError(404, f"The model {brief(name)} does not exist (see /v1/models)", param="model", code="model_not_found")
        return job

    # ------------------------------------------------------------ auth

    def check_api_key(self, authorization: str | None) -> None:
        if not self.config.api_keys:
            return
        key = _bearer(authorization)
        if key is None or not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.config.api_keys):
            raise ServingError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')", type="authentication_error", code="invalid_api_key")

    def check_admin(self, authorization: str | None) -> None:
        if not self.config.admin_token:
            raise ServingError(403, "the admin API is off: start the server with --admin-token-file or OFFSITE_ADMIN_TOKEN", type="permission_error", code="admin_disabled")
        token = _bearer(authorization)
        if token is None or not hmac.compare_digest(token.encode(), self.config.admin_token.encode()):
            raise ServingError(401, "Incorrect or missing admin token (send 'Authorization: Bearer TOKEN')", type="authentication_error", code="invalid_admin_token")

    # ------------------------------------------------------------ admin

    def check_registration(self, name, replace: bool = False, plugin_gain=None) -> float | None:
        """What a registration can be refused for before its adapter is read: the name, the gain,
        and a name taken without ``replace``. Returns the gain (None: the source's own)."""
        try:
            registry.check_name(name)
        except RegistryError as error:
            raise ServingError(400, str(error), param="name", code="invalid_value") from None
        if plugin_gain is not None:
            try:
                plugin_gain = check_gain(plugin_gain)
            except ValueError as error:
                raise ServingError(400, str(error), param="plugin_gain", code="invalid_value") from None
        if name in self.jobs() and not replace:
            raise ServingError(409, f"job {name!r} is already registered (unregister it first, or send replace: true)", param="name", code="model_exists")
        return plugin_gain

    def register(self, name: str, source: Path | str, replace: bool = False, plugin_gain: float | None = None) -> dict:
        """Copy a finished job's (or an adapter file's) adapter into the registry and serve it
        (at ``plugin_gain`` when given, else at the source's own gain)."""
        plugin_gain = self.check_registration(name, replace, plugin_gain)
        with self._admin:
            self.check_registration(name, replace)  # again: another registration may have taken the name
            source = Path(source)
            if not source.exists():
                raise ServingError(400, f"{source}: no such job directory or adapter file on the server", param="path", code="invalid_value")
            try:
                registry.add(self.config.registry, name, source, base=self.model, replace=replace, plugin_gain=plugin_gain)
                job = registry.load(self.config.registry, name, self.model)
            except (RegistryError, ValueError) as error:
                raise ServingError(400, str(error), param="path", code="invalid_adapter") from None
            with self._lock:
                self._jobs[name] = job
        log.info("registered %s (%s, blocks %s)", name, job.mode, job.adapter_blocks)
        return self.model_info(name, job)

    def register_upload(self, name: str, read: Callable[[int], bytes], length: int, replace: bool = False,
                        plugin_gain: float | None = None) -> dict:
        """Register an adapter file of ``length`` bytes read from ``read`` (an upload): the name,
        gain and size are checked before a byte is read, and the bytes go to disk as they come."""
        plugin_gain = self.check_registration(name, replace, plugin_gain)
        if length > MAX_UPLOAD_BYTES:
            raise ServingError(413, f"the adapter is {length} bytes; the limit is {MAX_UPLOAD_BYTES}", code="too_large")
        Path(self.config.registry).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.config.registry, prefix=".upload-", suffix=".safetensors", delete=False) as handle:
            try:
                left = length
                while left:
                    chunk = read(min(left, UPLOAD_CHUNK))
                    if not chunk:
                        raise ServingError(400, f"the body ended after {length - left} of {length} bytes", code="incomplete_body")
                    handle.write(chunk)
                    left -= len(chunk)
            except BaseException:
                handle.close()
                os.unlink(handle.name)
                raise
        try:
            return self.register(name, handle.name, replace=replace, plugin_gain=plugin_gain)
        finally:
            os.unlink(handle.name)

    def unregister(self, name: str) -> dict:
        with self._admin:
            with self._lock:
                job = self._jobs.pop(name, None)
            if job is None:
                raise ServingError(404, f"job {name!r} is not registered", param="name", code="model_not_found")
            try:
                registry.remove(self.config.registry, name)
            except RegistryError as error:
                log.warning("unregistered %s, but: %s", name, error)
        log.info("unregistered %s (requests already running finish on it)", name)
        return {"id": name, "object": "model", "deleted": True}

    # ------------------------------------------------------------ requests

    def prepare_completion(self, body) -> Prepared:
        """A ``/v1/completions`` body: ``prompt`` is a string (or a list of token ids)."""
        body = self._check_body(body)
        job = self.resolve(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, "prompt", add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            self._check_length(len(prompt), "prompt")
            vocab = self.stack.embed.shape[0]
            if any(not 0 <= t < vocab for t in prompt):
                raise ServingError(400, f"'prompt' holds token ids outside 0..{vocab - 1}", param="prompt", code="invalid_value")
            ids = list(prompt)
        else:
            raise ServingError(400, "'prompt' must be one string or one list of token ids (batches of prompts are not supported)", param="prompt", code="invalid_type")
        return self._prepared(body, job, ids, "prompt", "max_tokens")

    def prepare_chat(self, body) -> Prepared:
        """A ``/v1/chat/completions`` body, rendered with the tokenizer's chat template."""
        body = self._check_body(body)
        job = self.resolve(body.get("model"))
        messages = self._messages(body.get("messages"))
        ids = self.render_chat(messages)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return self._prepared(body, job, ids, "messages", key)

    def render_chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            raise ServingError(400, "the base model's tokenizer has no chat template: use /v1/completions", param="messages", code="no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, TypeError, ValueError, KeyError) as error:  # e.g. the template's raise_exception
            raise ServingError(400, f"the chat template refused these messages: {error}", param="messages", code="invalid_value") from None
        return self._tokenize(text, "messages", add_special_tokens=False)

    def _tokenize(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """``text``'s token ids; a text that cannot fit the context is refused before it is tokenised."""
        if len(text) > self.max_prompt_chars:
            raise ServingError(
                400, f"This model's maximum context length is {self.context_length} tokens; the prompt is {len(text)} "
                f"characters, more than that many tokens can hold", param=param, code="context_length_exceeded",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ServingError(400, f"the {param} is not valid Unicode ({error.reason} at character {error.start})", param=param, code="invalid_value") from None
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def _check_length(self, tokens: int, param: str) -> None:
        if tokens >= self.context_length:
            raise ServingError(
                400, f"This model's maximum context length is {self.context_length} tokens; the prompt is {tokens} tokens",
                param=param, code="context_length_exceeded",
            )

    @staticmethod
    def _messages(messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise ServingError(400, "'messages' must be a non-empty list of {role, content}", param="messages", code="invalid_type")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ServingError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "developer", "user", "assistant"):
                raise ServingError(400, f"messages[{i}].role must be system, developer, user or assistant, got {brief(role)}", param=f"messages[{i}].role", code="invalid_value")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                    raise ServingError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content", code="invalid_value")
                content = "".join(part["text"] for part in content)
            if not isinstance(content, str):
                raise ServingError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content", code="invalid_type")
            out.append({"role": "system" if role == "developer" else role, "content": content})
        return out

    @staticmethod
    def _check_body(body) -> dict:
        if not isinstance(body, dict):
            raise ServingError(400, "the request body must be a JSON object", code="invalid_json")
        for key, defaults in UNSUPPORTED.items():
            if key in body and body[key] not in defaults:
                raise ServingError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
        return body

    def _prepared(self, body: dict, job: ServedJob | None, ids: list[int], prompt_key: str, max_key: str) -> Prepared:
        limit = self.context_length
        if not ids:
            raise ServingError(400, "the prompt is empty", param=prompt_key, code="invalid_value")
        self._check_length(len(ids), prompt_key)
        n = _integer(body, "n", 1)
        if n not in (None, 1):
            raise ServingError(400, f"'n' must be 1 (one completion per request), got {n}", param="n", code="invalid_value")
        max_tokens = _integer(body, max_key, 1)
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, limit - len(ids))
        elif len(ids) + max_tokens > limit:
            raise ServingError(
                400, f"This model's maximum context length is {limit} tokens; you asked for {len(ids) + max_tokens} "
                f"({len(ids)} in the prompt, {max_tokens} for the completion)", param=max_key, code="context_length_exceeded",
            )
        temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
        top_p = _number(body, "top_p", 0.0, 1.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
            raise ServingError(400, f"'seed' must be an integer in [0, 2^63), got {brief(seed)}", param="seed", code="invalid_value")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop if stop is not None else [])
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise ServingError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop", code="invalid_value")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ServingError(400, f"'stream' must be true or false, got {brief(stream)}", param="stream", code="invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ServingError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return Prepared(body["model"], job, ids, params, stop, stream, bool(options.get("include_usage")))

    def start(self, prepared: Prepared) -> Generation:
        request = Request(prepared.job, prepared.prompt, prepared.params)
        try:
            self.scheduler.submit(request)
        except QueueFull as error:
            raise ServingError(429, str(error), type="server_error", code="queue_full") from None
        except SchedulerClosed as error:
            raise ServingError(503, str(error), type="server_error", code="shutting_down") from None
        except ValueError as error:
            raise ServingError(400, str(error), code="context_length_exceeded") from None
        return Generation(request, self.tokenizer, prepared.stop, self.config.request_timeout)


def _longest_token(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary entry)."""
    try:
        return max(16, max(len(token) for token in tokenizer.get_vocab()))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 256


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Generation:
    """One request's text as it is decoded: incremental detokenisation (a piece that ends inside
    a UTF-8 character waits for the rest), stop sequences (cut, and the request cancelled), and
    cancellation when the client is gone."""

    def __init__(self, request: Request, tokenizer, stop: list[str], timeout: float = 600.0) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.stop = stop
        self.timeout = timeout
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens}

    def cancel(self) -> None:
        self.request.cancel()

    def pieces(self, alive: Callable[[], bool] | None = None, poll: float = 0.25) -> Iterator[tuple[str, list[int]]]:
        """Yield (new text, new token ids) as tokens arrive; :attr:`finish_reason` is set at the end.

        ``alive`` is asked every ``poll`` seconds; False cancels the request and raises
        :class:`ClientGone`.
        """
        hold = max((len(s) for s in self.stop), default=1) - 1
        emitted = 0
        pending_ids: list[int] = []
        last_event = checked = time.monotonic()
        while True:
            try:
                kind, value = self.request.events.get(timeout=poll)
            except queue.Empty:
                kind = None
            now = time.monotonic()
            if alive is not None and now - checked >= poll:
                checked = now
                if not alive():
                    self.cancel()
                    raise ClientGone("the client went away")
            if kind is None:
                if now - last_event > self.timeout:
                    self.cancel()
                    raise ServingError(504, f"no progress for {self.timeout:g} s", type="server_error", code="timeout")
                continue
            last_event = now
            if kind == "error":
                self.finish_reason = "error"
                raise ServingError(500, value, type="server_error", code="generation_failed")
            if kind == "done":
                self.finish_reason = "stop" if value == "cancelled" else value
                tail = self.text[emitted:]
                if tail or pending_ids:
                    yield tail, pending_ids
                return
            self.token_ids.append(value)
            pending_ids.append(value)
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if self.stop:
                start = max(0, emitted - hold)
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    self.finish_reason = "stop"
                    self.cancel()
                    yield self.text[emitted:], pending_ids
                    return
            safe = len(self.text.rstrip("\ufffd")) - hold
            if safe > emitted:
                yield self.text[emitted:safe], pending_ids
                emitted, pending_ids = safe, []
