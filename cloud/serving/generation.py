"""One request's text as it is decoded, for the APIs: incremental detokenisation (a piece that ends
inside a UTF-8 character waits for the rest), stop sequences (cut, and the request cancelled),
a timeout without progress, and cancellation when the client is gone.

A :class:`Generation` turns the scheduler's events into :class:`Piece`\\ s. It is read either
blocking (:meth:`Generation.pieces`, the gRPC servicer's threads) or from an event loop
(:func:`follow`, several generations of one HTTP request at once, woken by the scheduler).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from .engine import Request
from .logprobs import TokenLogprob
from .openai_types import ServingError

FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
}  # the scheduler's -> OpenAI's (the spec's values only)


class ClientGone(Exception):
    """The client of a generation went away; the request was cancelled."""


@dataclass
class Piece:
    """New text, the token ids it came from and their log-probabilities (when asked for; the last
    piece carries the end-of-sequence token's too). ``final``: the generation has ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: bool = False
    offset: int = 0  # where ``text`` starts in the generation's text


class Generation:
    """The decoded text of one :class:`.engine.Request`; ``on_end`` is called once when it ends,
    however it ends."""

    def __init__(
        self,
        request: Request,
        tokenizer,
        stop: list[str],
        timeout: float = 600.0,
        on_end: Callable[[Generation], None] | None = None,
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.stop = stop
        self.timeout = timeout
        self.on_end = on_end
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.finished = False
        self.failed = False
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._emitted = 0  # characters of text handed out
        self._pending = 0  # token ids not yet handed out: token_ids[-_pending:]
        self._logprobs_out = 0  # entries of request.token_logprobs handed out
        self._last_event = time.monotonic()

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def cancel(self) -> None:
        self.request.cancel()

    def _end(self, reason: str | None, failed: bool = False) -> None:
        if self.finished:
            return
        self.finished, self.failed = True, failed
        self.finish_reason = FINISH_REASONS.get(reason) if reason else None
        if self.on_end is not None:
            self.on_end(self)

    def _piece(self, end: int, logprobs_upto: int, final: bool = False) -> Piece:
        """The text up to character ``end`` not handed out yet, its pending token ids, and the
        log-probabilities up to entry ``logprobs_upto`` (when the request asked for them)."""
        ids = self.token_ids[len(self.token_ids) - self._pending :] if self._pending else []
        logprobs = self.request.token_logprobs[self._logprobs_out : logprobs_upto]
        piece = Piece(self.text[self._emitted : end], ids, logprobs, final, self._emitted)
        self._emitted, self._pending = max(self._emitted, end), 0
        self._logprobs_out = max(self._logprobs_out, logprobs_upto)
        return piece

    def feed(self, kind: str, value) -> Piece | None:
        """One scheduler event; the piece it completes (None: nothing to hand out yet)."""
        self._last_event = time.monotonic()
        if kind == "error":
            self._end(None, failed=True)
            raise ServingError(500, value, type="server_error", code="generation_failed")
        if kind == "done":
            self._end(value)
            return self._piece(
                len(self.text), len(self.request.token_logprobs), final=True
            )  # with the end-of-sequence token's
        self.token_ids.append(value)
        self._pending += 1
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if self.stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.cancel()
                self._end("stop")
                return self._piece(len(self.text), len(self.token_ids), final=True)
        safe = len(self.text.rstrip("\ufffd")) - self._hold
        return self._piece(safe, len(self.token_ids)) if safe > self._emitted else None

    def poll(self) -> list[Piece]:
        """The pieces of every event that has arrived (without waiting)."""
        pieces = []
        while not self.finished:
            try:
                kind, value = self.request.events.get_nowait()
            except queue.Empty:
                break
            piece = self.feed(kind, value)
            if piece is not None:
                pieces.append(piece)
        return pieces

    def check_progress(self) -> None:
        """ServingError (504) when no event came for ``timeout`` seconds; the request is cancelled."""
        if not self.finished and time.monotonic() - self._last_event > self.timeout:
            self.cancel()
            self._end(None, failed=True)
            raise ServingError(504, f"no progress for {self.timeout:g} s", type="server_error", code="timeout")

    def gone(self) -> None:
        """The client went away: cancel, and end this generation."""
        self.cancel()
        self._end(None, failed=True)

    def pieces(self, alive: Callable[[], bool] | None = None, poll: float = 0.25) -> Iterator[Piece]:
        """Yield pieces as tokens arrive, blocking; the last one is ``final``. ``alive`` is asked
        every ``poll`` seconds; False cancels the request and raises :class:`ClientGone`."""
        checked = time.monotonic()
        while not self.finished:
            try:
                kind, value = self.request.events.get(timeout=poll)
            except queue.Empty:
                kind = None
            if alive is not None and time.monotonic() - checked >= poll:
                checked = time.monotonic()
                if not alive():
                    self.gone()
                    raise ClientGone("the client went away")
            if kind is None:
                self.check_progress()
                continue
            piece = self.feed(kind, value)
            if piece is not None:
                yield piece


class LoopWaker:
    """Wakes an event loop's waiting requests from the scheduler's thread, with one call into the
    loop per burst of events (a decode step hands out a token to every row at once) instead of
    one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._marked: list[asyncio.Event] = []
        self._scheduled = False

    def listener(self, wake: asyncio.Event) -> Callable[[], None]:
        """What a request calls after each of its events (from the scheduler's thread)."""

        def notify() -> None:
            with self._lock:
                self._marked.append(wake)
                if self._scheduled:
                    return
                self._scheduled = True
            self._loop.call_soon_threadsafe(self._fire)

        return notify

    def _fire(self) -> None:
        with self._lock:
            marked, self._marked, self._scheduled = self._marked, [], False
        for wake in marked:
            wake.set()


async def follow(
    generations: list[Generation],
    wake: asyncio.Event,
    alive: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.25,
) -> AsyncIterator[tuple[int, Piece]]:
    """``(index, piece)`` of several generations as their tokens arrive, from an event loop that
    ``wake`` is set on (by the requests' listener) whenever the scheduler has put an event.
    ``alive`` is awaited every ``poll`` seconds while nothing arrives; False cancels them all
    and raises :class:`ClientGone`. The generations are cancelled however this ends."""
    checked = time.monotonic()
    try:
        while not all(g.finished for g in generations):
            progressed = False
            for index, generation in enumerate(generations):
                for piece in generation.poll():
                    progressed = True
                    yield index, piece
            if progressed or all(g.finished for g in generations):
                continue
            wake.clear()
            if any(not g.finished and not g.request.events.empty() for g in generations):
                continue
            try:
                await asyncio.wait_for(wake.wait(), poll)
            except asyncio.TimeoutError:
                pass
            if alive is not None and time.monotonic() - checked >= poll:
                checked = time.monotonic()
                if not await alive():
                    for generation in generations:
                        generation.gone()
                    raise ClientGone("the client went away")
            for generation in generations:
                generation.check_progress()
    finally:
        for generation in generations:
            if not generation.finished:
                generation.gone()
            generation.cancel()  # a no-op once finished; frees the slot otherwise
