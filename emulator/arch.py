"""Architecture registry: where the blocks, the final norm and the head of each family live.

One ordered list of :class:`ArchSpec`; the first spec whose ``model_types`` contains the
model's ``config.model_type`` wins. Every other module asks this registry instead of
branching on model classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths (dotted, from the ``*ForCausalLM`` module) of one model family."""

    family: str
    model_types: tuple[str, ...]
    backbone: str  # the module that returns final-normed hidden states (no head)
    blocks: str  # nn.ModuleList of decoder blocks
    final_norm: str
    head: str
    embeddings: tuple[str, ...]  # token (and position) embeddings
    num_layers_key: str  # config attribute holding the block count
    lora_targets: tuple[str, ...]  # default LoRA target module names inside a block


REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        backbone="model",
        blocks="model.layers",
        final_norm="model.norm",
        head="lm_head",
        embeddings=("model.embed_tokens",),
        num_layers_key="num_hidden_layers",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        backbone="transformer",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.wte", "transformer.wpe"),
        num_layers_key="n_layer",
        lora_targets=("c_attn", "c_proj", "c_fc"),
    ),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        backbone="model",
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        num_layers_key="num_hidden_layers",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    ),
)


class UnsupportedModelError(ValueError):
    pass


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for spec in REGISTRY for t in spec.model_types)
    raise UnsupportedModelError(f"model_type {model_type!r} is not in the registry (known: {', '.join(known)})")


def spec_for(model: nn.Module) -> ArchSpec:
    return spec_for_model_type(model.config.model_type)


def get_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return get_path(model, spec_for(model).blocks)
