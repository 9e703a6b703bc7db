"""Requests as the APIs see them: what HTTP and gRPC share, free of any web framework.

:class:`ServingService` holds the base model once (through :class:`.stack.LlamaStack`), the
registered jobs, the scheduler and the metrics. It turns an OpenAI request body (validated by
:mod:`.openai_types`) into prompts and sampling parameters, refusing bad ones with
:class:`ServingError` (which carries the HTTP status and the OpenAI error body), and starts one
:class:`.generation.Generation` per choice (``prompts x n``).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from offsite.cloud.presets import check_gain

from . import registry
from .engine import QueueFull, Request, SamplingParams, Scheduler, SchedulerClosed
from .generation import Generation
from .limits import PROMPT_CHARS_SLACK, check_length, check_logprob_budget, longest_token, sampling_params
from .metrics import ServingMetrics
from .openai_types import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, ServingError, brief, validate
from .registry import BASE_MODEL, RegistryError, ServedJob
from .stack import LlamaStack
from .uploads import MAX_UPLOAD_BYTES, Upload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What ``offsite cloud serve`` was asked for."""

    registry: Path
    base_name: str = "base"
    max_batch: int = 32
    max_context: int | None = 2048
    default_max_tokens: int = 256
    # requests waiting for a slot (a request of n choices counts n); also the most choices one request may ask for
    max_queue: int = 256
    prefill_tokens: int = 2048
    api_keys: frozenset[str] = frozenset()
    admin_token: str | None = None
    request_timeout: float = 600.0  # a generation that makes no progress for this long fails
    max_connections: int = 256  # open HTTP connections and concurrent gRPC calls, each
    idle_timeout: float = (
        60.0  # seconds a connection may wait for its client (idle keep-alive, a stalled request or body)
    )
    shutdown_timeout: float = 30.0  # on stop, seconds running requests get to finish
    # log-probabilities one request may ask for (tokens scored x (alternatives + 1), every choice): each
    # costs a few dozen bytes of memory and of the answer; lm-eval with 256 full 2048-token contexts needs 2^20
    max_logprob_entries: int = 1 << 20

    def __post_init__(self) -> None:
        if min(self.max_batch, self.default_max_tokens, self.max_queue, self.prefill_tokens, self.max_connections) < 1:
            raise ValueError(
                "max_batch, default_max_tokens, max_queue, prefill_tokens and max_connections must be >= 1"
            )
        if not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


@dataclass
class Prepared:
    """A validated request, ready to run: ``len(prompts) x n`` choices (choice ``i`` is prompt
    ``i // n``). ``logprobs``: alternatives per token in the reply (None: no log-probabilities)."""

    model: str
    job: ServedJob | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    chat: bool = False
    prompt_texts: list[str] | None = None  # the prompts as sent (strings), for echo


class ServingService:
    """The base model, the registered jobs, the scheduler, the metrics, and the requests' validation."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stack = LlamaStack(model, config.max_context, slots=config.max_batch)
        self.scheduler = Scheduler(
            self.stack, self._eos_ids(), max_queue=config.max_queue, prefill_tokens=config.prefill_tokens
        )
        self.created = int(time.time())
        self.max_prompt_chars = self.context_length * longest_token(tokenizer) * PROMPT_CHARS_SLACK
        self._jobs: dict[str, ServedJob] = {}
        self._lock = threading.Lock()  # guards _jobs
        self._admin = threading.Lock()  # one registration at a time
        for name in registry.names(config.registry):
            try:
                self._jobs[name] = registry.load(config.registry, name, model)
            except (RegistryError, ValueError, OSError) as error:
                log.error("not serving %s: %s", name, error)
        self.metrics = ServingMetrics(self.scheduler, lambda: len(self.jobs()), self.stack.cache.nbytes)
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
        """An OpenAI model entry, with vLLM's ``root`` (the base model the weights come from) and
        ``parent`` (the served model a job adapts: ``base``; null for the base itself)."""
        return {
            "id": name,
            "object": "model",
            "created": int(job.meta.get("created", self.created)) if job else self.created,
            "owned_by": "offsite",
            "root": self.config.base_name,
            "parent": None if job is None else BASE_MODEL,
            "kind": "base" if job is None else job.mode,
            "adapter_blocks": [] if job is None else job.adapter_blocks,
            "base": self.config.base_name,
            "context_length": self.context_length,
        }

    def models(self) -> list[dict]:
        return [self.model_info(BASE_MODEL, None)] + [
            self.model_info(name, job) for name, job in sorted(self.jobs().items())
        ]

    def resolve(self, name) -> ServedJob | None:
        if name is None or name == "":
            raise ServingError(
                400, "'model' is required: a job's name or 'base'", param="model", code="missing_required_parameter"
            )
        if not isinstance(name, str):
            raise ServingError(400, f"'model' must be a string, got {brief(name)}", param="model", code="invalid_type")
        if name == BASE_MODEL:
            return None
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise ServingError(
                404, f"The model {brief(name)} does not exist (see /v1/models)", param="model", code="model_not_found"
            )
        return job

    # ------------------------------------------------------------ auth

    def check_api_key(self, authorization: str | None) -> None:
        if not self.config.api_keys:
            return
        key = _bearer(authorization)
        if key is None or not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.config.api_keys):
            raise ServingError(
                401,
                "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                type="authentication_error",
                code="invalid_api_key",
            )

    def check_admin(self, authorization: str | None) -> None:
        if not self.config.admin_token:
            raise ServingError(
                403,
                "the admin API is off: start the server with --admin-token-file or OFFSITE_ADMIN_TOKEN",
                type="permission_error",
                code="admin_disabled",
            )
        token = _bearer(authorization)
        if token is None or not hmac.compare_digest(token.encode(), self.config.admin_token.encode()):
            raise ServingError(
                401,
                "Incorrect or missing admin token (send 'Authorization: Bearer TOKEN')",
                type="authentication_error",
                code="invalid_admin_token",
            )

    def check_metrics_access(self, authorization: str | None) -> None:
        """``/metrics`` names the jobs: as closed as ``/v1`` (an API key, or the admin token)."""
        if not self.config.api_keys:
            return
        token = _bearer(authorization)
        if (
            token is not None
            and self.config.admin_token
            and hmac.compare_digest(token.encode(), self.config.admin_token.encode())
        ):
            return
        self.check_api_key(authorization)

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
            raise ServingError(
                409,
                f"job {name!r} is already registered (unregister it first, or send replace: true)",
                param="name",
                code="model_exists",
            )
        return plugin_gain

    def register(self, name: str, source: Path | str, replace: bool = False, plugin_gain: float | None = None) -> dict:
        """Copy a finished job's (or an adapter file's) adapter into the registry and serve it
        (at ``plugin_gain`` when given, else at the source's own gain)."""
        plugin_gain = self.check_registration(name, replace, plugin_gain)
        with self._admin:
            self.check_registration(name, replace)  # again: another registration may have taken the name
            source = Path(source)
            if not source.exists():
                raise ServingError(
                    400,
                    f"{source}: no such job directory or adapter file on the server",
                    param="path",
                    code="invalid_value",
                )
            try:
                registry.add(
                    self.config.registry, name, source, base=self.model, replace=replace, plugin_gain=plugin_gain
                )
                job = registry.load(self.config.registry, name, self.model)
            except (RegistryError, ValueError) as error:
                raise ServingError(400, str(error), param="path", code="invalid_adapter") from None
            with self._lock:
                self._jobs[name] = job
        log.info("registered %s (%s, blocks %s)", name, job.mode, job.adapter_blocks)
        return self.model_info(name, job)

    def begin_upload(
        self, name: str, length: int | None, replace: bool = False, plugin_gain: float | None = None
    ) -> Upload:
        """An upload of an adapter file of ``length`` bytes (None: not said): the name, gain and
        size are checked before a byte of it is read."""
        plugin_gain = self.check_registration(name, replace, plugin_gain)
        if length is not None and length > MAX_UPLOAD_BYTES:
            raise ServingError(413, f"the adapter is {length} bytes; the limit is {MAX_UPLOAD_BYTES}", code="too_large")
        return Upload(self, name, length, replace, plugin_gain)

    def unregister(self, name: str) -> dict:
        with self._admin:
            with self._lock:
                job = self._jobs.pop(name, None)
            if job is None:
                raise ServingError(404, f"job {brief(name)} is not registered", param="name", code="model_not_found")
            try:
                registry.remove(self.config.registry, name)
            except RegistryError as error:
                log.warning("unregistered %s, but: %s", name, error)
        log.info("unregistered %s (requests already running finish on it)", name)
        return {"id": name, "object": "model", "deleted": True}

    # ------------------------------------------------------------ requests

    def prepare_completion(self, body) -> Prepared:
        """A ``/v1/completions`` body: one prompt or a batch of them (strings or token ids)."""
        request: CompletionRequest = validate(CompletionRequest, body, UNSUPPORTED["completion"])
        job = self.resolve(request.model)
        if len(request.prompt) * request.n > self.config.max_queue:
            raise ServingError(
                400,
                f"this request asks for {len(request.prompt) * request.n} completions (prompts x n); "
                f"the limit is {self.config.max_queue}",
                param="n",
                code="invalid_value",
            )
        texts = request.prompt if isinstance(request.prompt[0], str) else None
        prompts = (
            [self._tokenize(p, "prompt", add_special_tokens=True) for p in texts]
            if texts
            else [self._token_ids(p) for p in request.prompt]
        )
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = sampling_params(
            request,
            prompts,
            "max_tokens",
            request.max_tokens,
            request.logprobs,
            prompt_logprobs,
            self.context_length,
            self.config.default_max_tokens,
        )
        scored = request.n * sum((len(p) if request.echo else 0) + params.max_tokens for p in prompts)
        check_logprob_budget(scored, request.logprobs, "logprobs", self.config.max_logprob_entries)
        return Prepared(
            request.model,
            job,
            prompts,
            params,
            request.n,
            request.stop,
            request.stream,
            request.include_usage,
            request.echo,
            request.logprobs,
            chat=False,
            prompt_texts=texts,
        )

    def prepare_chat(self, body) -> Prepared:
        """A ``/v1/chat/completions`` body, rendered with the tokenizer's chat template."""
        request: ChatCompletionRequest = validate(ChatCompletionRequest, body, UNSUPPORTED["chat"])
        job = self.resolve(request.model)
        if request.n > self.config.max_queue:
            raise ServingError(
                400, f"'n' is {request.n}; the limit is {self.config.max_queue}", param="n", code="invalid_value"
            )
        ids = self.render_chat(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in request.messages]
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        key, limit = request.completion_limit
        params = sampling_params(
            request, [ids], key, limit, logprobs, None, self.context_length, self.config.default_max_tokens
        )
        check_logprob_budget(request.n * params.max_tokens, logprobs, "top_logprobs", self.config.max_logprob_entries)
        return Prepared(
            request.model,
            job,
            [ids],
            params,
            request.n,
            request.stop,
            request.stream,
            request.include_usage,
            False,
            logprobs,
            chat=True,
        )

    def render_chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError  # not a dependency of ours: transformers needs it only for chat templates

        if not getattr(self.tokenizer, "chat_template", None):
            raise ServingError(
                400,
                "the base model's tokenizer has no chat template: use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, TypeError, ValueError, KeyError) as error:  # e.g. the template's raise_exception
            raise ServingError(
                400, f"the chat template refused these messages: {error}", param="messages", code="invalid_value"
            ) from None
        return self._tokenize(text, "messages", add_special_tokens=False)

    def _tokenize(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """``text``'s token ids; a text that cannot fit the context is refused before it is tokenised."""
        if len(text) > self.max_prompt_chars:
            raise ServingError(
                400,
                f"This model's maximum context length is {self.context_length} tokens; the prompt is {len(text)} "
                f"characters, more than that many tokens can hold",
                param=param,
                code="context_length_exceeded",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ServingError(
                400,
                f"the {param} is not valid Unicode ({error.reason} at character {error.start})",
                param=param,
                code="invalid_value",
            ) from None
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        if not ids:
            raise ServingError(400, "the prompt is empty", param=param, code="invalid_value")
        check_length(len(ids), param, self.context_length)
        return ids

    def _token_ids(self, ids: list[int]) -> list[int]:
        check_length(len(ids), "prompt", self.context_length)
        vocab = self.stack.embed.shape[0]
        if any(not 0 <= t < vocab for t in ids):
            raise ServingError(
                400, f"'prompt' holds token ids outside 0..{vocab - 1}", param="prompt", code="invalid_value"
            )
        return list(ids)

    def start(self, prepared: Prepared, listener: Callable[[], None] | None = None) -> list[Generation]:
        """Queue every choice of ``prepared`` (all or none); one Generation each, in choice order.
        Choice ``j`` of a prompt samples with ``seed + j`` when a seed was given."""
        seed = prepared.params.seed
        requests = [
            Request(
                prepared.job, ids, prepared.params.with_seed(None if seed is None else (seed + j) % (1 << 63)), listener
            )
            for ids in prepared.prompts
            for j in range(prepared.n)
        ]
        try:
            self.scheduler.submit_many(requests)
        except QueueFull as error:
            raise ServingError(429, str(error), type="server_error", code="queue_full") from None
        except SchedulerClosed as error:
            raise ServingError(503, str(error), type="server_error", code="shutting_down") from None
        except ValueError as error:
            raise ServingError(400, str(error), code="context_length_exceeded") from None

        def on_end(generation: Generation) -> None:
            self.metrics.observe_generation(prepared.model, generation)

        return [Generation(r, self.tokenizer, prepared.stop, self.config.request_timeout, on_end) for r in requests]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
