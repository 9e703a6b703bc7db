"""Serving plugged-in models to downstream users (``offsite cloud serve``).

One process holds the base model once and the adapters of many finished jobs side by side:

- :mod:`.registry`: the adapters on disk (``REGISTRY/<job>/adapter.safetensors`` + ``meta.json``)
  and their validation against the base model;
- :mod:`.engine`: the batched decoder: a functional forward over the base model's blocks with a
  per-slot KV cache, where the shared middle blocks run once over the whole batch and each job's
  adapter blocks run on its own rows (whole blocks: gathered rows; LoRA: gathered ``bmm``), and the
  scheduler thread that admits requests while others decode;
- :mod:`.service`: requests as the APIs see them (validation, tokenisation, chat templates,
  incremental text with stop sequences, OpenAI-style errors, API keys, the admin operations);
- :mod:`.http_api` (OpenAI-compatible HTTP) and :mod:`.grpc_api` (``protocol/serving.proto``);
- :mod:`.client`: what ``offsite query`` uses.

Supported base models: the llama family of :mod:`offsite.emulator.arch` (model types llama,
mistral, qwen2, qwen3). GPT-2 and OPT bases are refused with an error that says so.
"""
