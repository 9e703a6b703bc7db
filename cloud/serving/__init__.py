"""Serving plugged-in models to downstream users (``offsite cloud serve``; docs/serving.md).

One process holds the base model once and the adapters of many finished jobs side by side:

- :mod:`.registry`: the adapters on disk (``REGISTRY/<job>/adapter.safetensors`` + ``meta.json``)
  and their validation against the base model;
- :mod:`.stack`: a functional forward over the base model's blocks with a per-slot KV cache,
  where the shared middle blocks run once over the whole batch and each job's adapter blocks run
  on its own rows (whole blocks: gathered rows; LoRA: gathered ``bmm``);
- :mod:`.engine`: the scheduler thread that admits requests while others decode (continuous
  batching), and :mod:`.logprobs`, the log-probabilities it scores from the same passes;
- :mod:`.openai_types` (the request bodies, pydantic), :mod:`.service` (validation, tokenisation,
  chat templates, API keys, the admin operations; its size checks in :mod:`.limits`, adapter uploads
  in :mod:`.uploads`), :mod:`.generation` (incremental text, stop
  sequences, cancellation), :mod:`.responses` (OpenAI's response shapes), :mod:`.metrics`;
- the front ends: :mod:`.http_api` (FastAPI, OpenAI-compatible) on :mod:`.http_server` (uvicorn),
  :mod:`.grpc_api` (``protocol/serving.proto`` and the gRPC health service), started together by
  :mod:`.server`;
- :mod:`.client`: what ``offsite query`` uses.

Supported base models: the llama family of :mod:`offsite.emulator.arch` (model types llama,
mistral, qwen2, qwen3). GPT-2 and OPT bases are refused with an error that says so.
"""
