"""Log-probabilities from the scheduler's batched passes: a mixed batch over four jobs and the base
scores every prompt token and every sampled token exactly as each job's plugged-in model does
alone (and not as the base does), with the end-of-sequence token scored when a row stops on it."""

from __future__ import annotations

import pytest
import torch

from offsite.cloud.serving.engine import LlamaStack, Request, SamplingParams, Scheduler
from offsite.cloud.serving.registry import served_job
from tests.cloud.serving_setup import four_jobs, greedy, one_thread, outcome, perturbed_blocks, tiny_base  # noqa: F401 (one_thread: a fixture)

ATOL = 1e-5  # float64 weights; the scores are taken in float32, as served


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every position, (T, V), from the model run alone."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def _prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 98, (2 + (7 * i) % 17,), generator=generator).tolist() for i in range(count)]


def _check_entry(entry, token: int, reference: torch.Tensor, k: int) -> None:
    assert entry.token == token
    assert abs(entry.logprob - float(reference[token])) < ATOL
    values, indices = reference.topk(k)
    assert [t for t, _ in entry.top] == indices.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), values, atol=ATOL, rtol=0)


def test_a_mixed_batch_scores_prompts_and_tokens_as_each_plugged_in_model():
    base = tiny_base()
    specs = four_jobs(base)
    jobs = [served_job(s.name, s.tensors, s.meta, base) for s in specs] + [None]
    models = [s.plugged(base) for s in specs] + [base]
    scheduler = Scheduler(LlamaStack(base, slots=16), eos_ids=set())
    try:
        prompts = _prompts(15, seed=1)
        requests = [
            Request(
                jobs[i % 5],
                p,
                SamplingParams(max_tokens=(0, 3, 6)[i % 3], temperature=0, logprobs=3, prompt_logprobs=3),
            )
            for i, p in enumerate(prompts)
        ]
        scheduler.submit_many(requests)  # one prefill: prompts of every length, every job
        for i, request in enumerate(requests):
            tokens, end = outcome(request)
            assert end == "done:length" and len(tokens) == request.params.max_tokens
            assert tokens == greedy(models[i % 5], request.prompt, request.params.max_tokens)
            ids = request.prompt + tokens
            reference = _reference(models[i % 5], ids)
            assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(request.prompt)
            for t in range(1, len(ids)):
                entry = (
                    request.prompt_logprobs[t]
                    if t < len(request.prompt)
                    else request.token_logprobs[t - len(request.prompt)]
                )
                _check_entry(entry, ids[t], reference[t - 1], 3)
            assert len(request.token_logprobs) == len(tokens)
            if jobs[i % 5] is not None:  # the adapter is applied: the base scores the same tokens otherwise
                base_scores = _reference(base, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
                ours = torch.tensor([e.logprob for e in request.prompt_logprobs[1:] + request.token_logprobs])
                assert not torch.allclose(ours, base_scores, atol=1e-3)
        assert scheduler.stats.errors == 0
    finally:
        scheduler.close()


def test_sampled_tokens_are_scored_by_the_model_not_the_temperature():
    base = tiny_base()
    spec = four_jobs(base)[2]  # LoRA
    job, plugged = served_job(spec.name, spec.tensors, spec.meta, base), spec.plugged(base)
    scheduler = Scheduler(LlamaStack(base, slots=4), eos_ids=set())
    try:
        request = Request(job, [5, 9, 14], SamplingParams(max_tokens=8, temperature=1.7, top_p=0.9, seed=3, logprobs=0))
        scheduler.submit(request)
        tokens, end = outcome(request)
        reference = _reference(plugged, request.prompt + tokens)
        for j, entry in enumerate(request.token_logprobs):
            assert entry.top == () and entry.token == tokens[j]
            assert abs(entry.logprob - float(reference[len(request.prompt) - 1 + j, tokens[j]])) < ATOL
    finally:
        scheduler.close()


def test_the_end_of_sequence_token_is_scored_last():
    """A row that stops on end-of-sequence hands out one more log-probability than tokens: the
    end-of-sequence token's (lm-eval drops the last entry as the generated one)."""
    base = tiny_base()
    spec = four_jobs(base)[0]
    job, plugged = served_job(spec.name, spec.tensors, spec.meta, base), spec.plugged(base)
    prompt = [7, 3, 11, 2]
    eos = greedy(plugged, prompt, 3)[2]
    scheduler = Scheduler(LlamaStack(base, slots=2), eos_ids={eos})
    try:
        request = Request(job, prompt, SamplingParams(max_tokens=10, temperature=0, logprobs=2))
        scheduler.submit(request)
        tokens, end = outcome(request)
        assert end == "done:stop" and len(tokens) == 2
        assert len(request.token_logprobs) == 3 and request.token_logprobs[-1].token == eos
        _check_entry(request.token_logprobs[-1], eos, _reference(plugged, prompt + tokens)[-1], 2)
    finally:
        scheduler.close()


def test_a_prompt_whose_scores_overflow_fails_alone():
    base = tiny_base()
    spec = four_jobs(base)[1]
    healthy, plugged = served_job(spec.name, spec.tensors, spec.meta, base), spec.plugged(base)
    huge = {key: value * 1e200 if "mlp" in key else value for key, value in perturbed_blocks(base, 9).items()}
    broken = served_job("overflowing", huge, {"mode": "blocks"}, base)
    scheduler = Scheduler(LlamaStack(base, slots=4), eos_ids=set())
    try:
        good = Request(healthy, [4, 8, 15, 16], SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1))
        bad = Request(broken, [4, 8, 15, 16], SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1))
        scheduler.submit_many([bad, good])
        tokens, end = outcome(bad)
        assert tokens == [] and end.startswith("error:") and "non-finite" in end, end
        tokens, end = outcome(good)
        assert (tokens, end) == ([], "done:length")
        reference = _reference(plugged, good.prompt)
        for t in range(1, 4):
            _check_entry(good.prompt_logprobs[t], good.prompt[t], reference[t - 1], 1)
        assert scheduler.stats.errors == 1
    finally:
        scheduler.close()
