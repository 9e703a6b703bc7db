"""The scheduler: many jobs' requests in one forward pass over one shared base model.

:class:`Scheduler` owns the model (:class:`.stack.LlamaStack`) and its KV cache in one thread and
runs continuous batching: each iteration admits waiting requests (their prompts are prefilled
together), then decodes one token for every active row; finished and cancelled rows leave at once
and new ones join while others decode.

A request may ask for log-probabilities (:mod:`.logprobs`): of its prompt's tokens, from the
final hidden states of the same batched prefill that starts it, and of each sampled token, from
the logits it was sampled from; both with the job's adapter applied exactly as in generation.
``max_tokens == 0`` scores the prompt and samples nothing.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .logprobs import NonFiniteScores, TokenLogprob, prompt_logprobs, score_tokens
from .registry import BASE_MODEL, ServedJob
from .stack import SUPPORTED_MODEL_TYPES, KVCache, LlamaStack

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "LlamaStack",
    "QueueFull",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SchedulerClosed",
]

log = logging.getLogger(__name__)

NON_FINITE = "the model produced non-finite scores for this request (a broken adapter?)"


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full."""


class SchedulerClosed(RuntimeError):
    """The scheduler has stopped."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes: ``temperature == 0`` is greedy. ``logprobs``: score each sampled
    token with this many top alternatives (None: do not score); ``prompt_logprobs``: the same for
    the prompt's tokens."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


class Request:
    """One generation: the scheduler puts ``("token", id)`` events on :attr:`events`, then one
    ``("done", finish_reason)`` or ``("error", message)``; ``listener`` (if any) is called after
    each event, from the scheduler's thread (e.g. to wake an event loop).

    With log-probabilities asked for, :attr:`prompt_logprobs` is set before the first event and
    :attr:`token_logprobs` gets one entry per sampled token before its event, the end-of-sequence
    token included (it has no event of its own: a request that stops on it has one more entry
    than tokens)."""

    def __init__(
        self,
        job: ServedJob | None,
        prompt: list[int],
        params: SamplingParams,
        listener: Callable[[], None] | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        self.job = job
        self.prompt = list(prompt)
        self.params = params
        self.listener = listener
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.token_logprobs: list[TokenLogprob] = []
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def emit(self, kind: str, value) -> None:
        self.events.put((kind, value))
        if self.listener is not None:
            try:
                self.listener()
            except RuntimeError:  # the listener's event loop has closed: its client is gone
                pass

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Row:
    request: Request
    slot: int = -1
    pos: int = 0  # tokens in the cache
    last: int = -1  # the sampled token not yet in the cache
    generated: int = 0
    generator: torch.Generator | None = None
    ended: bool = False  # its request has had its last event


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    max_rows: int = 0
    max_jobs_in_step: int = 0  # most distinct models (jobs or base) decoded in one forward pass
    histogram: dict = field(default_factory=dict)  # rows per decode step -> count


class Scheduler:
    """Continuous batching over :class:`LlamaStack` in one thread (the only one touching it)."""

    def __init__(self, stack: LlamaStack, eos_ids: set[int], max_queue: int = 256, prefill_tokens: int = 2048) -> None:
        self.stack = stack
        self.eos_ids = set(eos_ids)
        self.max_batch = stack.slots
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.stats = SchedulerStats()
        self._pending: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="offsite-serve-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the other threads' side

    def submit(self, request: Request) -> None:
        self.submit_many([request])

    def submit_many(self, requests: list[Request]) -> None:
        """Queue all of ``requests`` or none of them."""
        limit = self.stack.context_length
        for request in requests:
            if len(request.prompt) >= limit:
                raise ValueError(f"the prompt is {len(request.prompt)} tokens; the context limit is {limit}")
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests are waiting and this one adds {len(requests)} "
                    f"(the limit is {self.max_queue}); retry later"
                )
            self._pending.extend(requests)
            self._cond.notify()

    def load(self) -> dict:
        """Rows decoding and requests waiting (a row that has had its last event is not counted,
        though it leaves ``_rows`` only at the end of its step)."""
        with self._cond:
            return {"active": sum(not row.ended for row in self._rows), "waiting": len(self._pending)}

    def load_by_model(self) -> dict[str, tuple[int, int]]:
        """Per model (a job's name, or ``base``): (rows decoding, requests waiting)."""
        with self._cond:
            active = collections.Counter(_model(row.request) for row in self._rows if not row.ended)
            waiting = collections.Counter(_model(request) for request in self._pending)
        return {model: (active[model], waiting[model]) for model in active.keys() | waiting.keys()}

    def snapshot(self) -> SchedulerStats:
        """A copy of the counters, taken consistently with the scheduler's thread."""
        with self._cond:
            return replace(self.stats, histogram=dict(self.stats.histogram))

    @property
    def running(self) -> bool:
        """The scheduler's thread runs (it may be closing)."""
        return self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """The scheduler's thread runs and takes requests."""
        return self._thread.is_alive() and not self._closing

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._closing:
                        self.stack.release_lora_stacks()
                        self._cond.wait()
                    if self._closing:
                        break
                    new = self._admit()
                try:
                    self._step(new)
                except (
                    Exception
                ):  # a bug outside any one row's forward or sampling: fail what is in flight, keep serving
                    log.exception("decode step failed")
                    for row in self._rows + [r for r in new if r not in self._rows]:
                        if not row.ended:
                            self._fail(row, "generation failed (the server logged the cause)")
                    self._rows = []
        with self._cond:
            for request in list(self._pending) + [row.request for row in self._rows]:
                request.emit("error", "the server is shutting down")
            self._pending.clear()
            self._rows = []

    def _admit(self) -> list[_Row]:
        new: list[_Row] = []
        width = 0
        while self._pending and len(self._rows) + len(new) < self.max_batch:
            request = self._pending[0]
            if request.cancelled:
                self._pending.popleft()
                request.emit("done", "cancelled")
                continue
            wider = max(width, len(request.prompt))
            if new and wider * (len(new) + 1) > self.prefill_tokens:
                break
            self._pending.popleft()
            width = wider
            generator = None
            if request.params.temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(request.params.seed if request.params.seed is not None else torch.seed())
            new.append(_Row(request, generator=generator))
        return new

    def _finish(self, row: _Row, reason: str) -> None:
        row.ended = True  # before the event: whoever sees it sees the row ended
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        row.slot = -1
        row.request.emit("done", reason)

    def _fail(self, row: _Row, message: str) -> None:
        """End one row with an error; the other rows go on."""
        row.ended = True
        self.stats.errors += 1
        if row.slot >= 0:
            self.stack.cache.clear(row.slot)
        row.slot = -1
        row.request.emit("error", message)

    def _forward(
        self, rows: list[_Row], tokens: list[list[int]], starts: list[int]
    ) -> tuple[list[_Row], list[torch.Tensor]]:
        """The rows' final hidden states (one ``(T_r, D)`` per row), batched; when the batch fails,
        each row runs alone, and only a row that fails alone is failed. Returns the rows that ran
        and their states."""
        try:
            states = self.stack.forward_states(
                [row.request.job for row in rows], tokens, starts, [row.slot for row in rows]
            )
            return rows, [states[r, : len(row_tokens)] for r, row_tokens in enumerate(tokens)]
        except Exception:
            if len(rows) == 1:
                log.exception("the forward pass of one request failed")
                self._fail(rows[0], "generation failed for this request (the server logged the cause)")
                return [], []
            log.warning("a forward pass over %d rows failed; running them one at a time", len(rows))
        ran, states = [], []
        for row, row_tokens, start in zip(rows, tokens, starts):
            alone, out = self._forward([row], [row_tokens], [start])
            ran += alone
            states += out
        return ran, states

    def _compact(self) -> None:
        """Keep the active rows in slots ``0..R-1`` (moving rows from the end into freed slots)."""
        self._rows = [row for row in self._rows if row.slot >= 0]
        count = len(self._rows)
        holes = sorted(set(range(count)) - {row.slot for row in self._rows})
        for row in self._rows:
            if row.slot >= count:
                hole = holes.pop(0)
                self.stack.cache.move(row.slot, hole, row.pos)
                row.slot = hole
        self._rows.sort(key=lambda row: row.slot)

    def _step(self, new: list[_Row]) -> None:
        for row in self._rows:
            if row.request.cancelled:
                self._finish(row, "cancelled")
        self._compact()
        if new:
            self._prefill(new)
        if not self._rows:
            return
        rows = self._rows
        started = time.perf_counter()
        ran, states = self._forward(rows, [[row.last] for row in rows], [row.pos for row in rows])
        for row in ran:
            row.pos += 1
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.steps += 1
        self.stats.decode_tokens += len(ran)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.max_jobs_in_step = max(self.stats.max_jobs_in_step, len({id(row.request.job) for row in rows}))
        with self._cond:
            self.stats.histogram[len(rows)] = self.stats.histogram.get(len(rows), 0) + 1
        self._accept(ran, self.stack.logits(torch.stack([s[-1] for s in states])) if ran else None)
        self._compact()

    def _prefill(self, new: list[_Row]) -> None:
        """Admit ``new`` rows: prefill their prompts together, score the prompts that asked for
        it, and sample their first tokens."""
        first = len(self._rows)
        for offset, row in enumerate(new):
            row.slot = first + offset
        self._rows.extend(new)
        started = time.perf_counter()
        ran, states = self._forward(new, [row.request.prompt for row in new], [0] * len(new))
        for row in ran:
            row.pos = len(row.request.prompt)
        self.stats.prefill_tokens += sum(row.pos for row in ran)
        kept, last = [], []
        for row, row_states in zip(ran, states):
            if row.request.params.prompt_logprobs is None or self._score_prompt(row, row_states):
                kept.append(row)
                last.append(row_states[-1])
        self.stats.prefill_seconds += time.perf_counter() - started
        self._accept(kept, self.stack.logits(torch.stack(last)) if kept else None)
        self._compact()

    def _score_prompt(self, row: _Row, states: torch.Tensor) -> bool:
        """Set the row's prompt log-probabilities; a row whose scores are not finite fails alone."""
        try:
            row.request.prompt_logprobs = prompt_logprobs(
                self.stack.logits, states, row.request.prompt, row.request.params.prompt_logprobs
            )
        except NonFiniteScores:
            self._fail(row, NON_FINITE)
            return False
        except (RuntimeError, ValueError):
            log.exception("scoring a prompt failed")
            self._fail(row, "scoring the prompt failed for this request (the server logged the cause)")
            return False
        return True

    def _accept(self, rows: list[_Row], logits: torch.Tensor | None) -> None:
        """Sample each row's next token, hand it out, and finish the rows that are done. A row
        whose scores are not finite (a broken adapter) or whose sampling fails is failed alone."""
        if not rows:
            return
        finite = torch.isfinite(logits).all(-1).tolist()
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            params = row.request.params
            if not finite[i]:
                log.warning(
                    "request on %s: the model's scores are not finite; failing it",
                    row.request.job.name if row.request.job else "base",
                )
                self._fail(row, NON_FINITE)
                continue
            if params.max_tokens == 0:  # the prompt scored, nothing to sample
                self._finish(row, "length")
                continue
            try:
                token = greedy[i] if params.temperature == 0 else _sample(logits[i], params, row.generator)
                scored = (
                    score_tokens(logits[i : i + 1], torch.tensor([token]), params.logprobs)[0]
                    if params.logprobs is not None
                    else None
                )
            except (RuntimeError, ValueError):
                log.exception("sampling failed")
                self._fail(row, "sampling failed for this request (the server logged the cause)")
                continue
            self._hand_out(row, token, scored)

    def _hand_out(self, row: _Row, token: int, scored: TokenLogprob | None) -> None:
        request, params = row.request, row.request.params
        row.generated += 1
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if request.cancelled:
            self._finish(row, "cancelled")
            return
        if scored is not None:
            request.token_logprobs.append(scored)
        if token in self.eos_ids:
            self._finish(row, "stop")
            return
        request.emit("token", token)
        row.last = token
        if row.generated >= params.max_tokens or row.pos + 1 >= self.stack.context_length:
            self._finish(row, "length")


def _model(request: Request) -> str:
    return BASE_MODEL if request.job is None else request.job.name


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token from finite ``logits`` at ``params.temperature`` (> 0) and ``top_p``.

    In float64, and shifted so that the most likely token scores 0 before dividing: every scaled
    score is <= 0 and the best one is exactly 0, so ``exp`` neither overflows nor sums to 0 at any
    temperature > 0, down to the smallest float (1e-300 is argmax, as it should be). The draw is
    by the inverse of the cumulative distribution (one uniform number, a binary search: O(V)
    with a small constant, where ``torch.multinomial`` cost 30x more on a 49k vocabulary); a token
    of probability 0 has an empty interval and is never drawn."""
    scores = logits.to(torch.float64)
    weights = torch.exp((scores - scores.max()) / params.temperature)  # (V,), the best one exactly 1
    order = None
    if params.top_p < 1:
        probs = weights / weights.sum()
        weights, order = probs.sort(descending=True)
        weights = weights * (weights.cumsum(-1) - weights < params.top_p)  # always keeps the most likely token
    cumulative = weights.cumsum(-1)
    point = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]  # in [0, total)
    index = min(int(torch.searchsorted(cumulative, point, right=True)), len(cumulative) - 1)
    return index if order is None else int(order[index])
