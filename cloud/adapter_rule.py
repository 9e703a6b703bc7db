"""What a federated job's global adapter is, how it travels and how the owners' replies combine:
whole adapter blocks, or LoRA inside them in one of three aggregations (``lora_aggregation``).

==========  ======================  ==========================  ===================================
rule        global (sent down)      reply (sent up)             combine
==========  ======================  ==========================  ===================================
blocks      whole blocks            whole blocks                the job's aggregator (FedAvg, ...)
frozen-a    B factors (A: seed)     B factors                   FedAvg of B: exact, A is shared
stack       whole blocks (merged)   A and B factors, rank r     W + sum_i p_i (alpha/r) B_i A_i
factors     A and B factors         A and B factors             FedAvg of A and of B: not exact
==========  ======================  ==========================  ===================================

``stack`` merges into the global blocks between rounds rather than sending the stacked factors
down: the stack grows by ``n r`` per round and per client count, and for a 576x1536 projection
passes the size of the dense matrix at ``n r >= 418`` (52 clients at rank 8). ``frozen-a`` keeps
both directions small and is the one that composes with secure aggregation and DP, which only
ever yield sums. Checkpoints of LoRA rules hold factors (frozen-a's with its A), which the plug-in,
the finish step, ``offsite cloud export`` and the serving registry merge like any LoRA update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offsite.emulator.lora import attach_lora, lora_is_transposed, lora_state_dict
from offsite.emulator.sandwich import adapter_state_dict
from offsite.protocol.bundle import Bundle, load_emulator

from .aggregate import Update, aggregate, lora_stack
from .fed_job import BLOCKS, FedJobConfig


@dataclass
class AdapterRule:
    """One job's rule (see the module's table); :meth:`for_job` builds it from the job's bundle."""

    config: FedJobConfig
    blocks: dict[str, torch.Tensor]  # the bundle's adapter blocks, as shipped
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA: the job's initial A and B
    transposed: bool = False

    @classmethod
    def for_job(cls, config: FedJobConfig, bundle: Bundle) -> AdapterRule:
        emulator = load_emulator(bundle)
        blocks = adapter_state_dict(emulator, bundle.layout, bundle.adapter_blocks)
        if config.tuning.mode != "lora":
            return cls(config, blocks)
        tuning = config.tuning
        trained = tuning.blocks_to_train(bundle.adapter_blocks, bundle.shape["a"])
        seed = tuning.seed if tuning.lora.init_seed is None else tuning.lora.init_seed
        attach_lora(emulator, bundle.layout, trained, tuning.lora, seed=seed)  # what every owner attaches
        return cls(config, blocks, lora_state_dict(emulator, bundle.layout), lora_is_transposed(emulator))

    @property
    def name(self) -> str:
        return self.config.lora_aggregation if self.config.tuning.mode == "lora" else "blocks"

    @property
    def kind(self) -> dict:
        """The ``mode`` and ``lora_alpha`` of this rule's checkpoints."""
        if self.name in ("blocks", "stack"):
            return dict(BLOCKS)
        return {"mode": "lora", "lora_alpha": self.config.tuning.lora.alpha, "lora_aggregation": self.name}

    @property
    def reply_kind(self) -> dict:
        """The ``mode`` and ``lora_alpha`` of one owner's reply (kept with ``record_updates``)."""
        return dict(BLOCKS) if self.name == "blocks" else {"mode": "lora", "lora_alpha": self.config.tuning.lora.alpha}

    def initial(self) -> dict[str, torch.Tensor]:
        """Round 0's global adapter, as it is sent down."""
        if self.name in ("blocks", "stack"):
            return dict(self.blocks)
        return self._wire(self.factors)

    def reply_like(self, global_adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What every reply must look like (keys, shapes, dtypes)."""
        return self.factors if self.name == "stack" else global_adapter

    def combine(self, global_adapter: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        """The next global adapter from the round's ``(reply, weight)`` pairs."""
        if self.name == "stack":
            return lora_stack(global_adapter, updates, self.config.tuning.lora.alpha, self.transposed)
        return aggregate(self.config.aggregator, updates, self.config.trim_fraction)

    def checkpoint(self, global_adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the global adapter, with frozen-a's A (so it plugs in by itself)."""
        if self.name == "frozen-a":
            return {**{k: v for k, v in self.factors.items() if k.endswith(".lora_A")}, **global_adapter}
        return global_adapter

    def from_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global adapter to resume from, out of :meth:`checkpoint`'s tensors."""
        return self._wire(tensors) if self.name == "frozen-a" else tensors

    def _wire(self, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """frozen-a sends B only: every owner draws the same A from the job's seed."""
        if self.name != "frozen-a":
            return dict(factors)
        return {key: tensor for key, tensor in factors.items() if key.endswith(".lora_B")}
