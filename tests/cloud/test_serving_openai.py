"""``offsite cloud serve`` through the official ``openai`` client, on loopback: models, chat and
completions (streamed too, each stream ending in ``data: [DONE]``), usage, stop, seed, ``n``,
batches of prompts, log-probabilities (prompt tokens with ``echo``, ``max_tokens: 0``, the requests
lm-eval's ``local-completions`` sends), the errors (404, 400, 401), vLLM's adapter loading, and
concurrent streams over four jobs."""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch

from offsite.cloud.serving import server
from offsite.cloud.serving.service import ServeConfig, ServingService
from tests.cloud.serving_setup import (
    EOS,
    chat_tokenizer,
    fill_registry,
    finished_job_dir,
    four_jobs,
    greedy,
    perturbed_blocks,
    tiny_base,
)

KEY, ADMIN = "sk-offsite-test", "admin-secret"
ATOL = 1e-5


@dataclass
class Served:
    servers: server.Servers
    client: openai.OpenAI
    tokenizer: object
    base: torch.nn.Module
    models: dict
    tmp: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("openai")
    base = tiny_base()
    jobs = four_jobs(base)
    fill_registry(tmp / "registry", base, jobs, tmp / "sources")
    config = ServeConfig(
        registry=tmp / "registry",
        base_name="tiny-llama",
        max_batch=16,
        max_context=128,
        default_max_tokens=16,
        api_keys=frozenset({KEY}),
        admin_token=ADMIN,
        max_logprob_entries=1 << 16,
    )
    servers = server.start(ServingService(base, chat_tokenizer(), config), "127.0.0.1", 0, None)
    client = openai.OpenAI(base_url=servers.http_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield Served(
        servers,
        client,
        servers.service.tokenizer,
        base,
        {job.name: job.plugged(base) for job in jobs} | {"base": base},
        tmp,
    )
    client.close()
    servers.stop()
    torch.set_num_threads(threads)


def expected(served: Served, model: str, ids: list[int], max_tokens: int) -> str:
    return served.tokenizer.decode(greedy(served.models[model], ids, max_tokens, eos=EOS), skip_special_tokens=True)


def reference(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]), (T, V), the model run alone."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def raw_stream(create, **kwargs) -> tuple[list[dict], bool]:
    """A streamed request's events through the client's streaming response, and whether the stream
    ended with ``data: [DONE]`` (the client's own iterator hides it)."""
    events, done = [], False
    with create(stream=True, **kwargs) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                    break
                events.append(json.loads(line[len("data: ") :]))
    return events, done


# ---------------------------------------------------------------- models, chat, completions


def test_models_list_the_base_and_the_jobs_with_root_and_parent(served):
    models = {m.id: m for m in served.client.models.list()}
    assert set(models) == {"base", "alpha", "beta", "gamma", "delta"}
    assert models["base"].model_extra["parent"] is None and models["base"].model_extra["root"] == "tiny-llama"
    assert all(models[name].model_extra["parent"] == "base" for name in ("alpha", "gamma"))
    assert served.client.models.retrieve("gamma").model_extra["adapter_blocks"] == [0, 1, 6, 7]


def test_chat_and_completions_match_the_plugged_in_model(served):
    messages = [{"role": "user", "content": "hi there"}]
    ids = served.tokenizer(
        served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    ).input_ids
    chat = served.client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected(served, "beta", ids, 10)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.prompt_tokens == len(ids)
    completion = served.client.completions.create(model="delta", prompt="the cat sat", max_tokens=12, temperature=0)
    ids = served.tokenizer("the cat sat").input_ids
    assert completion.choices[0].text == expected(served, "delta", ids, 12)
    assert completion.usage.completion_tokens == len(greedy(served.models["delta"], ids, 12, eos=EOS))
    stop = completion.choices[0].text[3:5]
    cut = served.client.completions.create(
        model="delta", prompt="the cat sat", max_tokens=12, temperature=0, stop=[stop]
    )
    assert (
        cut.choices[0].text == completion.choices[0].text[: completion.choices[0].text.index(stop)]
        and cut.choices[0].finish_reason == "stop"
    )
    seeded = [
        served.client.completions.create(model="gamma", prompt="abc", max_tokens=8, temperature=1.0, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_streams_end_with_done_and_equal_the_whole_answer(served):
    body = {"model": "alpha", "prompt": "stream me", "max_tokens": 14, "temperature": 0}
    whole = served.client.completions.create(**body)
    events, done = raw_stream(
        served.client.completions.with_streaming_response.create, **body, stream_options={"include_usage": True}
    )
    assert done and "".join(c["text"] for e in events for c in e["choices"]) == whole.choices[0].text
    assert events[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [
        whole.choices[0].finish_reason
    ]
    chunks = list(
        served.client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "yo"}], max_tokens=9, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (
        text
        == served.client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "yo"}], max_tokens=9, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- n and batches


def test_n_and_a_batch_of_prompts_give_every_choice_in_order(served):
    one = served.client.completions.create(model="beta", prompt="xyz", max_tokens=6, temperature=0.9, seed=40, n=3)
    assert [c.index for c in one.choices] == [0, 1, 2]
    alone = [
        served.client.completions.create(model="beta", prompt="xyz", max_tokens=6, temperature=0.9, seed=40 + j)
        .choices[0]
        .text
        for j in range(3)
    ]
    assert [c.text for c in one.choices] == alone  # choice j samples with seed + j
    prompts = ["ab", "cd e"]
    batch = served.client.completions.create(model="gamma", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for index, choice in enumerate(batch.choices):
        assert choice.text == expected(served, "gamma", served.tokenizer(prompts[index // 2]).input_ids, 5)
    ids = [served.tokenizer(p).input_ids for p in prompts]
    assert batch.usage.prompt_tokens == sum(len(i) for i in ids)
    tokens = served.client.completions.create(model="gamma", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in tokens.choices] == [batch.choices[0].text, batch.choices[2].text]
    chat = served.client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "q"}], max_tokens=4, n=2, temperature=0.5, seed=1
    )
    assert [c.index for c in chat.choices] == [0, 1]


# ---------------------------------------------------------------- log-probabilities


def test_completion_logprobs_score_the_prompt_and_the_tokens(served):
    prompt = served.tokenizer("score this please").input_ids
    scored = served.client.completions.create(
        model="alpha", prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    logprobs = scored.choices[0].logprobs
    ref = reference(served.models["alpha"], prompt)
    assert scored.choices[0].text == served.tokenizer.decode(prompt) and logprobs.token_logprobs[0] is None
    assert "".join(logprobs.tokens) == scored.choices[0].text and logprobs.text_offset[0] == 0
    for t in range(1, len(prompt)):
        assert abs(logprobs.token_logprobs[t] - float(ref[t - 1, prompt[t]])) < ATOL
        top = ref[t - 1].topk(2)
        alternatives = logprobs.top_logprobs[t]  # the 2 most likely tokens' texts, and the chosen one's
        assert set(alternatives) == {served.tokenizer.decode([i]) for i in top.indices.tolist() + [prompt[t]]}
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(alternatives[served.tokenizer.decode([token])] - value) < ATOL
    generated = served.client.completions.create(model="alpha", prompt=prompt, max_tokens=5, logprobs=0, temperature=0)
    logprobs = generated.choices[0].logprobs
    ids = served.tokenizer(generated.choices[0].text).input_ids
    ref = reference(served.models["alpha"], prompt + ids)
    assert len(logprobs.token_logprobs) == len(ids) and "".join(logprobs.tokens) == generated.choices[0].text
    for j, token in enumerate(ids):
        assert abs(logprobs.token_logprobs[j] - float(ref[len(prompt) - 1 + j, token])) < ATOL


def test_the_requests_of_lm_evals_local_completions(served):
    """What lm-eval sends for log-likelihoods: token-id prompts (context + continuation), echo,
    logprobs 1, max_tokens 1, a batch. Its reading (sum of token_logprobs[ctxlen:-1], greedy when
    each equals the best of top_logprobs) gives each continuation's log-likelihood."""
    contexts = [served.tokenizer(c).input_ids for c in ("Question: is it?\nAnswer:", "The colour is")]
    continuations = [served.tokenizer(c).input_ids for c in (" yes", " blue sky")]
    prompts = [c + k for c, k in zip(contexts, continuations)]
    reply = served.client.completions.create(
        model="gamma", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234
    )
    for choice, context, continuation in zip(sorted(reply.choices, key=lambda c: c.index), contexts, continuations):
        ids = context + continuation
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1  # the generated token last
        ref = reference(served.models["gamma"], ids)
        expected_sum = sum(float(ref[t - 1, ids[t]]) for t in range(len(context), len(ids)))
        assert abs(sum(choice.logprobs.token_logprobs[len(context) : -1]) - expected_sum) < 1e-4
        greedy_ref = all(int(ref[t - 1].argmax()) == ids[t] for t in range(len(context), len(ids)))
        greedy_api = all(
            lp == max(top.values())
            for lp, top in zip(
                choice.logprobs.token_logprobs[len(context) : -1], choice.logprobs.top_logprobs[len(context) : -1]
            )
        )
        assert greedy_api == greedy_ref


def test_chat_logprobs_and_top_logprobs(served):
    messages = [{"role": "user", "content": "logprobs?"}]
    reply = served.client.chat.completions.create(
        model="delta", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) >= reply.usage.completion_tokens and all(len(item.top_logprobs) == 3 for item in content)
    assert all(
        item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6) for item in content
    )  # greedy: the best one
    assert all(bytes(item.bytes).decode() == item.token for item in content)
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model="delta", messages=messages, top_logprobs=2)


# ---------------------------------------------------------------- errors


def test_errors_come_as_the_clients_exceptions(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    for bad in ({"temperature": 3}, {"max_tokens": 0}, {"logprobs": 99}, {"n": 0}, {"prompt": [True]}, {"top_p": 0}):
        with pytest.raises(openai.BadRequestError) as caught:
            served.client.completions.create(**({"model": "alpha", "prompt": "x", "max_tokens": 2} | bad))
        assert caught.value.body["param"] == next(iter(bad)), caught.value.body
    with pytest.raises(
        openai.BadRequestError
    ) as caught:  # more log-probabilities than the server's limit, refused before any work
        served.client.completions.create(model="alpha", prompt=[[5] * 100] * 100, echo=True, logprobs=20, max_tokens=20)
    assert caught.value.body["param"] == "logprobs" and "the limit is 65536" in caught.value.body["message"]
    keyless = openai.OpenAI(base_url=served.servers.http_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.models.list()
    with pytest.raises(openai.AuthenticationError):
        keyless.completions.create(model="alpha", prompt="x", max_tokens=2)
    keyless.close()


# ---------------------------------------------------------------- vLLM's adapter loading


def _post(served: Served, path: str, body: dict, token: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(served.servers.http.host, served.servers.http.port, timeout=60)
    connection.request(
        "POST", path, json.dumps(body), {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def test_load_and_unload_lora_adapter_are_admin_aliases(served):
    job_dir = finished_job_dir(served.tmp / "loaded", perturbed_blocks(served.base, 31))
    assert (
        _post(served, "/v1/load_lora_adapter", {"lora_name": "loaded", "lora_path": str(job_dir)}, KEY)[0] == 401
    )  # an API key is not admin
    status, data = _post(served, "/v1/load_lora_adapter", {"lora_name": "loaded", "lora_path": str(job_dir)}, ADMIN)
    assert status == 200 and b"loaded" in data
    entry = served.client.models.retrieve("loaded")
    assert entry.model_extra["parent"] == "base" and entry.model_extra["kind"] == "blocks"
    assert (
        served.client.completions.create(model="loaded", prompt="x", max_tokens=3, temperature=0).choices[0].text
        is not None
    )
    assert _post(served, "/v1/load_lora_adapter", {"lora_name": "loaded", "lora_path": str(job_dir)}, ADMIN)[0] == 409
    assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "loaded"}, ADMIN)[0] == 200
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("loaded")
    assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "loaded"}, ADMIN)[0] == 404


# ---------------------------------------------------------------- concurrency


def test_concurrent_streaming_clients_over_four_jobs(served):
    """16 clients, each with its own openai client, 5 streamed requests each over the four jobs:
    every stream ends with [DONE] and a spec finish_reason, and nothing fails."""
    problems: list[str] = []
    done_count = [0] * 16

    def client(index: int) -> None:
        own = openai.OpenAI(base_url=served.servers.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        for n in range(5):
            model = ("alpha", "beta", "gamma", "delta")[(index + n) % 4]
            try:
                if n % 2:
                    events, done = raw_stream(
                        own.completions.with_streaming_response.create,
                        model=model,
                        prompt=f"p{index}.{n}",
                        max_tokens=4 + n,
                        temperature=0.8,
                        seed=index,
                    )
                else:
                    events, done = raw_stream(
                        own.chat.completions.with_streaming_response.create,
                        model=model,
                        max_tokens=4 + n,
                        messages=[{"role": "user", "content": f"q{index}.{n}"}],
                    )
            except openai.OpenAIError as error:
                problems.append(f"{model}: {error}")
                continue
            finish = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
            if not done or finish not in (["stop"], ["length"]) or any("error" in e for e in events):
                problems.append(f"{model}: done={done} finish={finish}")
            else:
                done_count[index] += 1
        own.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert problems == [] and done_count == [5] * 16, (problems[:3], done_count)
    assert served.servers.service.scheduler.stats.errors == 0
