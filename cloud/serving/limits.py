"""The size checks of a request, before any work: context length, completion length, the
log-probabilities it asks for, and the longest prompt (in characters) worth tokenising."""

from __future__ import annotations

from .engine import SamplingParams
from .openai_types import ServingError

# A prompt longer than (context limit x the longest token's characters x this) cannot fit, whatever
# its tokens: refused before it is tokenised. The factor covers normalisers that compose characters
# (NFC/NFKC join at most a few code points into one).
PROMPT_CHARS_SLACK = 4


def longest_token(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary entry)."""
    try:
        return max(16, max(len(token) for token in tokenizer.get_vocab()))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 256


def check_length(tokens: int, param: str, context_length: int) -> None:
    """Refuse a prompt of ``tokens`` tokens that leaves no room in a ``context_length`` context."""
    if tokens >= context_length:
        raise ServingError(
            400,
            f"This model's maximum context length is {context_length} tokens; the prompt is {tokens} tokens",
            param=param,
            code="context_length_exceeded",
        )


def sampling_params(
    request,
    prompts: list[list[int]],
    max_key: str,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    context_length: int,
    default_max_tokens: int,
) -> SamplingParams:
    """``request``'s sampling parameters; ``max_tokens`` (None: the default, capped by what the
    context leaves) must fit beside the longest prompt."""
    limit, longest = context_length, max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, limit - longest)
    elif longest + max_tokens > limit:
        raise ServingError(
            400,
            f"This model's maximum context length is {limit} tokens; you asked for {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion)",
            param=max_key,
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def check_logprob_budget(tokens: int, alternatives: int | None, param: str, limit: int) -> None:
    """Refuse a request whose log-probabilities (``tokens`` scored, ``alternatives`` each) are
    more than ``limit``, before any work."""
    if alternatives is not None and tokens * (alternatives + 1) > limit:
        raise ServingError(
            400,
            f"this request asks for {tokens * (alternatives + 1)} log-probabilities (tokens x (alternatives + 1) "
            f"over every choice); the limit is {limit}: ask for fewer tokens, choices or alternatives",
            param=param,
            code="invalid_value",
        )
