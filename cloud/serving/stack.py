"""The base model run functionally, with per-row adapters and a per-slot KV cache.

:class:`LlamaStack` runs the base model's own structure (embeddings -> blocks -> final norm ->
head) as a functional forward over the block weights, with a per-slot KV cache
(:class:`KVCache`): slot ``s`` holds one request's keys and values at positions ``0..len-1``;
a batch is a set of slots, each at its own position, and a boolean mask keeps every query to its
own row's past. At each block:

- a block that no job in the batch adapts runs once over the whole batch (the shared middle);
- a block that some jobs replace (whole-block adapters) runs per group: the rows of each such
  job are gathered, run through that job's copy of the block, and scattered back; the other
  rows run through the base block;
- LoRA jobs run through the base block, and the low-rank deltas are added with gathered
  matmuls: ``y[rows] += scale_r * (x_r A_r^T) B_r^T`` with each row's factors gathered from a
  stack of the jobs in the batch (``torch.bmm``), never by merging weights into the block.

Supported: the llama family of :mod:`offsite.emulator.arch` (llama, mistral, qwen2, qwen3).
A sliding-window model is served within its window (the context limit is capped there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from offsite.emulator.arch import UnsupportedModelError, blocks_of, get_path, spec_for

from .registry import ServedJob

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_BLOCK_PARAMS = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",
}  # fmt: skip


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, step for step (statistics in float32, weight applied in the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------- the KV cache


class KVCache:
    """Keys and values per layer as ``(slots, kv_heads, capacity, head_dim)``; the capacity grows
    (doubling, in steps of 64 positions, up to ``limit``) and never shrinks, so memory is flat once
    the longest request seen has fitted."""

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, limit: int) -> None:
        self.shape = (slots, kv_heads, head_dim)
        self.n_layers, self.dtype, self.limit = n_layers, dtype, limit
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        if length > self.limit:
            raise ValueError(f"KV cache: {length} positions exceed the context limit {self.limit}")
        new = min(self.limit, max(length, 2 * self.capacity, 64))
        new = min(self.limit, -(-new // 64) * 64)
        slots, heads, dim = self.shape
        for store in (self.k, self.v):
            for layer in range(self.n_layers):
                grown = torch.zeros(slots, heads, new, dim, dtype=self.dtype)
                if store and self.capacity:
                    grown[:, :, : self.capacity] = store[layer]
                if len(store) > layer:
                    store[layer] = grown
                else:
                    store.append(grown)
        self.capacity = new

    def clear(self, slot: int) -> None:
        """Zero a slot: a failed row may have left non-finite keys or values there, and a later row
        in that slot would read them at its masked positions (0 x NaN is NaN)."""
        for store in (self.k, self.v):
            for layer in store:
                layer[slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for layer in store:
                layer[dst, :, :length] = layer[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class _Rows:
    """The rows of one forward pass (or a group of them): cache slots, positions, mask, rotary."""

    slots: torch.Tensor  # (R,) cache slot of each row
    span: slice | None  # the same slots as a slice when they are consecutive (cache reads are views)
    positions: torch.Tensor  # (R, T) position of each new token
    mask: torch.Tensor  # (R, 1, T, kv_len) True where a query may attend
    cos: torch.Tensor
    sin: torch.Tensor
    kv_len: int

    def subset(self, index: torch.Tensor) -> _Rows:
        return _Rows(
            self.slots[index],
            None,
            self.positions[index],
            self.mask[index],
            self.cos[index],
            self.sin[index],
            self.kv_len,
        )


# ---------------------------------------------------------------- the model


class LlamaStack:
    """A llama-family base model as block weights, run functionally with per-row adapters."""

    def __init__(self, model: nn.Module, max_context: int | None = None, slots: int = 32) -> None:
        config = model.config
        spec = spec_for(model)
        if spec.family != "llama" or config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"serving supports the llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"this base model's model_type is {config.model_type!r}"
            )
        self.model = model
        self.config = config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.embed = model.get_input_embeddings().weight
        self.dtype = self.embed.dtype
        self.norm_weight = get_path(model, spec.final_norm).weight
        head = get_path(model, spec.head)
        self.head_weight, self.head_bias = head.weight, getattr(head, "bias", None)
        self.rotary = get_path(model, spec.backbone).rotary_emb
        self.blocks = [dict(block.state_dict()) for block in blocks_of(model)]
        for index, params in enumerate(self.blocks):
            unknown = set(params) - _BLOCK_PARAMS
            if unknown:
                raise UnsupportedModelError(
                    f"block {index} has parameters this server cannot run: {sorted(unknown)[:3]}"
                )
        self.qk_norm = "self_attn.q_norm.weight" in self.blocks[0]
        limit = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        sliding = "sliding_attention" in layer_types if layer_types is not None else window is not None
        if sliding and window:
            limit = min(limit, int(window))
        self.context_length = min(limit, max_context) if max_context else limit
        self.cache = KVCache(len(self.blocks), slots, self.n_kv, self.head_dim, self.dtype, self.context_length)
        self._lora_stacks: dict[tuple[int, str], tuple[tuple[int, ...], tuple]] = {}

    @property
    def slots(self) -> int:
        return self.cache.shape[0]

    # ------------------------------------------------------------ one block

    def _linear(self, x: torch.Tensor, p: dict, stem: str, lora: dict | None) -> torch.Tensor:
        y = F.linear(x, p[stem + ".weight"], p.get(stem + ".bias"))
        if lora and stem in lora:
            rows, a, b, scale = lora[stem]
            xs = x if rows is None else x.index_select(0, rows)
            if a.dim() == 2:  # every LoRA row belongs to one job
                delta = (xs @ a.T) @ b.T * scale
            else:
                delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * scale
            if rows is None:
                y = y + delta
            else:
                y = y.index_add(0, rows, delta)
        return y

    def _block(self, x: torch.Tensor, p: dict, lora: dict | None, layer: int, rows: _Rows) -> torch.Tensor:
        r, t, _ = x.shape
        h = _rms_norm(x, p["input_layernorm.weight"], self.eps)
        q = self._linear(h, p, "self_attn.q_proj", lora).view(r, t, self.n_heads, self.head_dim)
        k = self._linear(h, p, "self_attn.k_proj", lora).view(r, t, self.n_kv, self.head_dim)
        v = self._linear(h, p, "self_attn.v_proj", lora).view(r, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q = _rms_norm(q, p["self_attn.q_norm.weight"], self.eps)
            k = _rms_norm(k, p["self_attn.k_norm.weight"], self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rows.cos.unsqueeze(1), rows.sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        where = (rows.slots[:, None], slice(None), rows.positions)
        cache_k[where] = k.transpose(1, 2)
        cache_v[where] = v.transpose(1, 2)
        if rows.span is not None:
            keys, values = cache_k[rows.span, :, : rows.kv_len], cache_v[rows.span, :, : rows.kv_len]
        else:
            keys, values = cache_k[rows.slots, :, : rows.kv_len], cache_v[rows.slots, :, : rows.kv_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=rows.mask, enable_gqa=self.n_kv != self.n_heads)
        x = x + self._linear(
            out.transpose(1, 2).reshape(r, t, self.n_heads * self.head_dim), p, "self_attn.o_proj", lora
        )
        h = _rms_norm(x, p["post_attention_layernorm.weight"], self.eps)
        gate = self._linear(h, p, "mlp.gate_proj", lora)
        up = self._linear(h, p, "mlp.up_proj", lora)
        return x + self._linear(self.act(gate) * up, p, "mlp.down_proj", lora)

    # ------------------------------------------------------------ per-job groups

    def _lora_for(
        self, layer: int, jobs: list[ServedJob], local: list[int], group_jobs: list[ServedJob | None]
    ) -> dict:
        """Each LoRA target of ``layer``: (rows within the group, A, B, scale), gathered per row."""
        lora: dict = {}
        stems = sorted({stem for job in jobs for stem in job.lora[layer]})
        for stem in stems:
            owners = [job for job in jobs if stem in job.lora[layer]]
            rows = [i for i in local if group_jobs[i] in owners]
            if not rows:
                continue
            rows_t = None if len(rows) == len(group_jobs) else torch.tensor(rows)
            if len(owners) == 1:
                a, b, scale = owners[0].lora[layer][stem]
                lora[stem] = (rows_t, a, b, scale)
                continue
            key = tuple(id(job) for job in owners)
            cached = self._lora_stacks.get((layer, stem))
            if cached is None or cached[0] != key:
                rank = max(job.lora[layer][stem][0].shape[0] for job in owners)
                a_stack = torch.stack(
                    [
                        F.pad(job.lora[layer][stem][0], (0, 0, 0, rank - job.lora[layer][stem][0].shape[0]))
                        for job in owners
                    ]
                )
                b_stack = torch.stack(
                    [F.pad(job.lora[layer][stem][1], (0, rank - job.lora[layer][stem][1].shape[1])) for job in owners]
                )
                scales = torch.tensor([job.lora[layer][stem][2] for job in owners], dtype=self.dtype)
                cached = (key, (a_stack, b_stack, scales, owners))
                self._lora_stacks[(layer, stem)] = cached
            a_stack, b_stack, scales, owners = cached[1]
            which = torch.tensor([owners.index(group_jobs[i]) for i in rows])
            lora[stem] = (rows_t, a_stack[which], b_stack[which], scales[which].view(-1, 1, 1))
        return lora

    def _plan(self, jobs: list[ServedJob | None]) -> dict[int, list[tuple[torch.Tensor | None, dict, dict | None]]]:
        """For every block some row's job adapts: the groups (rows, weights, LoRA) that run it."""
        distinct = list(dict.fromkeys(job for job in jobs if job is not None))
        layers = sorted({i for job in distinct for i in (job.blocks if job.mode == "blocks" else job.lora)})
        plan = {}
        for layer in layers:
            replaced = [job for job in distinct if layer in job.blocks]
            base_rows = [i for i, job in enumerate(jobs) if job is None or layer not in job.blocks]
            groups = []
            for job in replaced:
                rows = [i for i, j in enumerate(jobs) if j is job]
                groups.append((None if len(rows) == len(jobs) else torch.tensor(rows), job.blocks[layer], None))
            if base_rows:
                base_jobs = [jobs[i] for i in base_rows]
                lora_jobs = [job for job in distinct if job.mode == "lora" and layer in job.lora]
                lora = self._lora_for(layer, lora_jobs, list(range(len(base_rows))), base_jobs) if lora_jobs else None
                groups.append(
                    (None if len(base_rows) == len(jobs) else torch.tensor(base_rows), self.blocks[layer], lora)
                )
            plan[layer] = groups
        return plan

    def release_lora_stacks(self) -> None:
        self._lora_stacks.clear()

    # ------------------------------------------------------------ forward

    def forward_states(
        self, jobs: list[ServedJob | None], tokens: list[list[int]], starts: list[int], slots: list[int]
    ) -> torch.Tensor:
        """Run new ``tokens`` (one list per row, at positions ``starts[r]..``) through the blocks,
        writing their keys and values into the rows' cache ``slots``; return the final-normed
        hidden states ``(R, T, D)`` (T: the longest row; a shorter row's tail is padding)."""
        n_rows = len(tokens)
        width = max(len(row) for row in tokens)
        ids = torch.zeros(n_rows, width, dtype=torch.long)
        for r, row in enumerate(tokens):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        start = torch.tensor(starts)
        positions = start[:, None] + torch.arange(width)[None, :]  # (R, T)
        kv_len = int(positions.max()) + 1
        self.cache.reserve(kv_len)
        mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (R, 1, T, kv_len)
        slot_t = torch.tensor(slots)
        span = slice(slots[0], slots[-1] + 1) if slots == list(range(slots[0], slots[0] + n_rows)) else None
        x = F.embedding(ids, self.embed)  # (R, T, D)
        cos, sin = self.rotary(x, positions)
        rows = _Rows(slot_t, span, positions, mask, cos, sin, kv_len)
        plan = self._plan(jobs)
        for layer, weights in enumerate(self.blocks):
            groups = plan.get(layer)
            if groups is None:
                x = self._block(x, weights, None, layer, rows)
                continue
            if len(groups) == 1 and groups[0][0] is None:
                x = self._block(x, groups[0][1], groups[0][2], layer, rows)
                continue
            out = torch.empty_like(x)
            for index, params, lora in groups:
                out.index_copy_(
                    0, index, self._block(x.index_select(0, index), params, lora, layer, rows.subset(index))
                )
            x = out
        return _rms_norm(x, self.norm_weight, self.eps)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The head over final-normed states ``(..., D)``: next-token logits ``(..., V)`` in float32."""
        return F.linear(states, self.head_weight, self.head_bias).float()

    def forward(
        self, jobs: list[ServedJob | None], tokens: list[list[int]], starts: list[int], slots: list[int]
    ) -> torch.Tensor:
        """:meth:`forward_states`, then each row's next-token logits ``(R, V)`` (float32) after its
        last new token."""
        states = self.forward_states(jobs, tokens, starts, slots)
        lengths = torch.tensor([len(row) for row in tokens])
        return self.logits(states[torch.arange(len(tokens)), lengths - 1])
