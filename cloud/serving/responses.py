"""OpenAI response bodies and stream chunks for the generations of one request, as OpenAI and
vLLM shape them (no web framework here: dicts in, dicts out).

Completions' ``logprobs`` are ``{tokens, token_logprobs, top_logprobs, text_offset}``: with
``echo`` the prompt's tokens come first (the first one's log-probability is null), then the
completion's, the end-of-sequence token included when the generation stopped on it (its text is
not in ``text``); ``top_logprobs`` maps each position's most likely tokens' text, and the chosen
token's, to their log-probabilities. Chat's are ``{content: [{token, logprob, bytes,
top_logprobs: [...]}]}``. ``finish_reason`` is ``stop`` or ``length``.
"""

from __future__ import annotations

import time
import uuid

from .generation import Generation, Piece
from .logprobs import TokenLogprob
from .service import Prepared


class TokenTexts:
    """Each token id's text (special tokens included), cached: what ``tokens`` lists."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode(
                [token], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return text


def completion_logprobs(
    texts: TokenTexts, tokens: list[int], scored: list[TokenLogprob | None], offset: int = 0
) -> dict:
    """The completions ``logprobs`` object of ``tokens`` (their entries in ``scored``, None for a
    token without one), whose text starts at character ``offset`` of the choice's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, scored):
        text = texts(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        if entry is None:
            out["top_logprobs"].append(None)
        else:
            top = {texts(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(texts: TokenTexts, scored: list[TokenLogprob], k: int) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    return {
        "content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top[:k]]} for e in scored],
        "refusal": None,
    }


class Reply:
    """The answer to one request: its non-streamed body, or its stream's chunks."""

    def __init__(self, prepared: Prepared, generations: list[Generation], texts: TokenTexts) -> None:
        self.prepared, self.generations, self.texts = prepared, generations, texts
        self.chat = prepared.chat
        self.ident = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if self.chat else "text_completion"
        self._started = [False] * len(
            generations
        )  # a choice's first chunk is out (chat: its role; completions: its echo)

    def _prompt_text(self, index: int) -> str:
        prompt = index // self.prepared.n
        if self.prepared.prompt_texts is not None:
            return self.prepared.prompt_texts[prompt]
        return self.texts.tokenizer.decode(
            self.prepared.prompts[prompt], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _echo(self, index: int) -> tuple[str, dict | None]:
        """The prompt's text and, when asked for, its tokens' logprobs object."""
        request = self.generations[index].request
        text = self._prompt_text(index)
        if self.prepared.logprobs is None:
            return text, None
        return text, completion_logprobs(
            self.texts, request.prompt, request.prompt_logprobs or [None] * len(request.prompt)
        )

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prepared.prompts)
        completion = sum(g.completion_tokens for g in self.generations)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.prepared.model}

    # ------------------------------------------------------------ whole

    def body(self) -> dict:
        """The non-streamed body, once every generation has finished."""
        return self._head(self.kind) | {
            "choices": [self._choice(i, g) for i, g in enumerate(self.generations)],
            "usage": self.usage(),
        }

    def _choice(self, index: int, generation: Generation) -> dict:
        scored = generation.request.token_logprobs
        if self.chat:
            logprobs = (
                chat_logprobs(self.texts, scored, self.prepared.logprobs)
                if self.prepared.logprobs is not None
                else None
            )
            return {
                "index": index,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": logprobs,
                "finish_reason": generation.finish_reason,
            }
        text, logprobs = self._echo(index) if self.prepared.echo else ("", None)
        if self.prepared.logprobs is not None:
            tokens = [e.token for e in scored]
            generated = completion_logprobs(self.texts, tokens, scored, offset=len(text))
            logprobs = generated if logprobs is None else {key: logprobs[key] + generated[key] for key in logprobs}
        return {
            "index": index,
            "text": text + generation.text,
            "logprobs": logprobs,
            "finish_reason": generation.finish_reason,
        }

    # ------------------------------------------------------------ streamed

    def opening(self) -> list[dict]:
        """Chunks before any token: chat's role, one per choice."""
        if not self.chat:
            return []
        self._started = [True] * len(self.generations)
        return [
            self._head(self.kind + ".chunk")
            | {
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ]
            }
            for i in range(len(self.generations))
        ]

    def chunks(self, index: int, piece: Piece) -> list[dict]:
        """The chunks of one piece of choice ``index`` (its echo first, its end last)."""
        out = []
        if not self._started[index]:  # completions with echo: the prompt, once its tokens are scored
            self._started[index] = True
            if self.prepared.echo:
                text, logprobs = self._echo(index)
                out.append(self._completion_chunk(index, text, logprobs, None))
        if piece.text or piece.logprobs:
            out.append(self._chunk(index, piece.text, piece.logprobs, None, piece.offset))
        if piece.final:
            out.append(
                self._chunk(index, None, [], self.generations[index].finish_reason, piece.offset + len(piece.text))
            )
        return out

    def _chunk(self, index: int, text: str | None, scored: list[TokenLogprob], finish: str | None, offset: int) -> dict:
        wants = self.prepared.logprobs is not None and bool(scored)
        if self.chat:
            delta = {} if text is None else {"content": text}
            logprobs = chat_logprobs(self.texts, scored, self.prepared.logprobs) if wants else None
            return self._head(self.kind + ".chunk") | {
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            }
        offset += len(self._prompt_text(index)) if self.prepared.echo and wants else 0
        logprobs = completion_logprobs(self.texts, [e.token for e in scored], scored, offset) if wants else None
        return self._completion_chunk(index, text or "", logprobs, finish)

    def _completion_chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return self._head(self.kind) | {
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        }

    def closing(self) -> list[dict]:
        """The usage chunk, when the request asked for it."""
        return (
            [self._head(self.kind + (".chunk" if self.chat else "")) | {"choices": [], "usage": self.usage()}]
            if self.prepared.include_usage
            else []
        )
