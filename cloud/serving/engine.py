"""The batched decoder: many jobs' requests in one forward pass over one shared base model.

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

:class:`Scheduler` owns the model and the cache in one thread and runs continuous batching:
each iteration admits waiting requests (their prompts are prefilled together), then decodes one
token for every active row; finished and cancelled rows leave at once and new ones join while
others decode.

Supported: the llama family of :mod:`offsite.emulator.arch` (llama, mistral, qwen2, qwen3).
A sliding-window model is served within its window (the context limit is capped there).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from offsite.emulator.arch import UnsupportedModelError, blocks_of, get_path, spec_for
from torch import nn

from .registry import ServedJob

log = logging.getLogger(__name__)

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
        return _Rows(self.slots[index], None, self.positions[index], self.mask[index], self.cos[index], self.sin[index], self.kv_len)


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
        from transformers.activations import ACT2FN

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
                raise UnsupportedModelError(f"block {index} has parameters this server cannot run: {sorted(unknown)[:3]}")
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
        x = x + self._linear(out.transpose(1, 2).reshape(r, t, self.n_heads * self.head_dim), p, "self_attn.o_proj", lora)
        h = _rms_norm(x, p["post_attention_layernorm.weight"], self.eps)
        gate = self._linear(h, p, "mlp.gate_proj", lora)
        up = self._linear(h, p, "mlp.up_proj", lora)
        return x + self._linear(self.act(gate) * up, p, "mlp.down_proj", lora)

    # ------------------------------------------------------------ per-job groups

    def _lora_for(self, layer: int, jobs: list[ServedJob], local: list[int], group_jobs: list[ServedJob | None]) -> dict:
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
                a_stack = torch.stack([F.pad(job.lora[layer][stem][0], (0, 0, 0, rank - job.lora[layer][stem][0].shape[0])) for job in owners])
                b_stack = torch.stack([F.pad(job.lora[layer][stem][1], (0, rank - job.lora[layer][stem][1].shape[1])) for job in owners])
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
                groups.append((None if len(base_rows) == len(jobs) else torch.tensor(base_rows), self.blocks[layer], lora))
            plan[layer] = groups
        return plan

    def release_lora_stacks(self) -> None:
        self._lora_stacks.clear()

    # ------------------------------------------------------------ forward

    def forward(self, jobs: list[ServedJob | None], tokens: list[list[int]], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Run new ``tokens`` (one list per row, at positions ``starts[r]..``) through the model,
        writing their keys and values into the rows' cache ``slots``; return each row's
        next-token logits (float32) after its last new token."""
        n_rows = len(tokens)
        width = max(len(row) for row in tokens)
        lengths = torch.tensor([len(row) for row in tokens])
        ids = torch.zeros(n_rows, width, dtype=torch.long)
        for r, row in enumerate(tokens):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        start = torch.tensor(starts)
        positions = start[:, None] + torch.arange(width)[None, :]
        kv_len = int(positions.max()) + 1
        self.cache.reserve(kv_len)
        mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        slot_t = torch.tensor(slots)
        span = slice(slots[0], slots[-1] + 1) if slots == list(range(slots[0], slots[0] + n_rows)) else None
        x = F.embedding(ids, self.embed)
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
                out.index_copy_(0, index, self._block(x.index_select(0, index), params, lora, layer, rows.subset(index)))
            x = out
        last = x[torch.arange(n_rows), lengths - 1]
        logits = F.linear(_rms_norm(last, self.norm_weight, self.eps), self.head_weight, self.head_bias)
        return logits.float()


# ---------------------------------------------------------------- requests and the scheduler


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full."""


class SchedulerClosed(RuntimeError):
    """The scheduler has stopped."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes: ``temperature == 0`` is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Request:
    """One generation: the scheduler puts ``("token", id)`` events on :attr:`events`, then one
    ``("done", finish_reason)`` or ``("error", message)``."""

    def __init__(self, job: ServedJob | None, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        self.job = job
        self.prompt = list(prompt)
        self.params = params
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()

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
        limit = self.stack.context_length
        if len(request.prompt) >= limit:
            raise ValueError(f"the prompt is {len(request.prompt)} tokens; the context limit is {limit}")
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue}); retry later")
            self._pending.append(request)
            self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            return {"active": len(self._rows), "waiting": len(self._pending)}

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
                except Exception:  # a bug outside any one row's forward or sampling: fail what is in flight, keep serving
                    log.exception("decode step failed")
                    for row in self._rows + [r for r in new if r not in self._rows]:
                        if not row.ended:
                            self._fail(row, "generation failed (the server logged the cause)")
                    self._rows = []
        with self._cond:
            for request in list(self._pending) + [row.request for row in self._rows]:
                request.events.put(("error", "the server is shutting down"))
            self._pending.clear()
            self._rows = []

    def _admit(self) -> list[_Row]:
        new: list[_Row] = []
        width = 0
        while self._pending and len(self._rows) + len(new) < self.max_batch:
            request = self._pending[0]
            if request.cancelled:
                self._pending.popleft()
                request.events.put(("done", "cancelled"))
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
        row.request.events.put(("done", reason))
        row.ended = True
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        row.slot = -1

    def _fail(self, row: _Row, message: str) -> None:
        """End one row with an error; the other rows go on."""
        row.request.events.put(("error", message))
        row.ended = True
        self.stats.errors += 1
        if row.slot >= 0:
            self.stack.cache.clear(row.slot)
        row.slot = -1

    def _forward(self, rows: list[_Row], tokens: list[list[int]], starts: list[int]) -> tuple[list[_Row], torch.Tensor | None]:
        """The rows' next-token logits, batched; when the batch fails, each row runs alone, and
        only a row that fails alone is failed. Returns the rows that ran and their logits."""
        try:
            return rows, self.stack.forward([row.request.job for row in rows], tokens, starts, [row.slot for row in rows])
        except Exception:
            if len(rows) == 1:
                log.exception("the forward pass of one request failed")
                self._fail(rows[0], "generation failed for this request (the server logged the cause)")
                return [], None
            log.warning("a forward pass over %d rows failed; running them one at a time", len(rows))
        ran, logits = [], []
        for row, row_tokens, start in zip(rows, tokens, starts):
            alone, out = self._forward([row], [row_tokens], [start])
            ran += alone
            if out is not None:
                logits.append(out)
        return ran, torch.cat(logits) if logits else None

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
            first = len(self._rows)
            for offset, row in enumerate(new):
                row.slot = first + offset
            self._rows.extend(new)
            started = time.perf_counter()
            ran, logits = self._forward(new, [row.request.prompt for row in new], [0] * len(new))
            for row in ran:
                row.pos = len(row.request.prompt)
            self.stats.prefill_tokens += sum(row.pos for row in ran)
            self.stats.prefill_seconds += time.perf_counter() - started
            self._accept(ran, logits)
            self._compact()
        if not self._rows:
            return
        rows = self._rows
        started = time.perf_counter()
        ran, logits = self._forward(rows, [[row.last] for row in rows], [row.pos for row in rows])
        for row in ran:
            row.pos += 1
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.steps += 1
        self.stats.decode_tokens += len(ran)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.max_jobs_in_step = max(self.stats.max_jobs_in_step, len({id(row.request.job) for row in rows}))
        self.stats.histogram[len(rows)] = self.stats.histogram.get(len(rows), 0) + 1
        self._accept(ran, logits)
        self._compact()

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
                log.warning("request on %s: the model's scores are not finite; failing it", row.request.job.name if row.request.job else "base")
                self._fail(row, "the model produced non-finite scores for this request (a broken adapter?)")
                continue
            try:
                token = greedy[i] if params.temperature == 0 else _sample(logits[i], params, row.generator)
            except (RuntimeError, ValueError):
                log.exception("sampling failed")
                self._fail(row, "sampling failed for this request (the server logged the cause)")
                continue
            row.generated += 1
            if row.request.cancelled:
                self._finish(row, "cancelled")
            elif token in self.eos_ids:
                self._finish(row, "stop")
            else:
                row.request.events.put(("token", token))
                row.last = token
                if row.generated >= params.max_tokens or row.pos + 1 >= self.stack.context_length:
                    self._finish(row, "length")


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token from finite ``logits`` at ``params.temperature`` (> 0) and ``top_p``.

    In float64, and shifted so that the most likely token scores 0 before dividing: every scaled
    score is <= 0 and the best one is exactly 0, so ``exp`` neither overflows nor sums to 0 at any
    temperature > 0, down to the smallest float (1e-300 is argmax, as it should be)."""
    scores = logits.to(torch.float64)
    weights = torch.exp((scores - scores.max()) / params.temperature)
    probs = weights / weights.sum()  # the sum is >= 1: the best token's weight is exp(0)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the most likely token
        return int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
