"""Shared fixtures: tiny random-initialised models of every registered family, a tiny tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 100
INIT = 0.2  # larger than the usual 0.02, so a tiny model's logits are not all near zero


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Undo a test's ``torch.set_num_threads``: the ClientApp sets a node's ``threads`` for its own
    process (a fresh one per message), and run in-process by a test it would otherwise leave every
    later test on one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str, n_blocks: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_blocks,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            initializer_range=INIT,
        )
        return LlamaForCausalLM(config).eval()
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_blocks,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=INIT,
        )
        return MistralForCausalLM(config).eval()
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_blocks,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=INIT,
        )
        return Qwen2ForCausalLM(config).eval()
    if family == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n_blocks, n_head=4, n_positions=256, initializer_range=INIT)
        ).eval()
    if family == "opt":
        config = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=n_blocks,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
            init_std=INIT,
        )
        return OPTForCausalLM(config).eval()
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def make_tokenizer(tmp_path):
    """A real byte-level BPE tokenizer, built offline from a tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for symbol in [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]:  # printable ASCII, space, newline
        vocab[symbol] = len(vocab)
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    return fast


@pytest.fixture
def tokenizer(tmp_path):
    return make_tokenizer(tmp_path)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tiny_bundle(root, base, shape, tokenizer_dir=None):
    """The emulator bundle of ``base`` (a tiny llama) cut to ``shape`` (a SandwichShape), written to
    ``root``: what `offsite cloud prepare` writes, without distillation. Returns the Bundle."""
    from offsite.emulator.sandwich import build_emulator
    from offsite.protocol.bundle import write_bundle

    n = base.config.num_hidden_layers
    emulator, layout = build_emulator(base, shape)
    manifest = {
        "family": "llama",
        "shape": {"a": shape.a, "k": shape.k, "b": shape.b, "n_blocks": n},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(n),
        "kept_middle": shape.kept_middle(n),
    }
    return write_bundle(root, emulator, make_tokenizer(tokenizer_dir or root.parent), manifest)
