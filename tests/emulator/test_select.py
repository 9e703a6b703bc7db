"""Middle blocks chosen by CKA (emulator/select.py): the similarity, the cut into runs, the choice."""

import pytest
import torch

from offsite.cloud import prepare
from offsite.cloud.prepare import CKA_ROWS, EmulatorConfig, prepare_bundle, recipe_key
from offsite.emulator import corpus
from offsite.emulator.corpus import MODEL_SAMPLES, sample_corpus, token_blocks
from offsite.emulator.distill import DistillConfig
from offsite.emulator.sandwich import SandwichShape
from offsite.emulator.select import cka_kept_middle, influence, linear_cka, middle_representations
from offsite.protocol.bundle import read_bundle
from tests.conftest import VOCAB, tiny_model


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA the textbook way: HSIC of the n x n Gram matrices, centred by H = I - 11^T/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((kx * ky).sum() / ((kx * kx).sum().sqrt() * (ky * ky).sum().sqrt()))


def test_linear_cka_equals_the_gram_matrix_form_and_its_invariances():
    torch.manual_seed(0)
    x, noise = torch.randn(64, 12), torch.randn(64, 12)
    y = x @ torch.randn(12, 12) + 0.5 * noise
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x, 3.0 * (x.double() @ rotation) + 7.0) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= linear_cka(x, noise) < 0.5 < linear_cka(x, y) < 1.0


def test_cka_keeps_the_blocks_that_change_the_representation():
    """A middle of six blocks of which two (original 3 and 6) are made to transform the hidden
    state (the others are zeroed to the identity): keeping two, CKA keeps exactly those two, where
    the uniform choice keeps 2 and 7."""
    model = tiny_model("llama", n_blocks=10)
    blocks = model.model.layers
    with torch.no_grad():
        for i in (2, 4, 5, 7):  # the residual branch's outputs zeroed: the block passes its input on
            blocks[i].self_attn.o_proj.weight.zero_()
            blocks[i].mlp.down_proj.weight.zero_()
        for i in (3, 6):
            blocks[i].mlp.down_proj.weight.mul_(400.0)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    shape = SandwichShape(2, 2, 2)
    reps = middle_representations(model, ids, 2, 2)
    assert len(reps) == 7 and reps[0].shape == (4 * 31, 32)  # each row's first position left out
    scores = influence(reps)
    assert [round(s, 6) for s in scores[:1] + scores[2:4] + scores[5:]] == [0.0] * 4  # the identity blocks
    assert min(scores[1], scores[4]) > 0.05
    assert cka_kept_middle(model, ids, shape) == [3, 6]
    assert shape.kept_middle(10) == [2, 7]


def test_with_no_top_adapter_the_last_block_is_read_before_the_final_norm():
    """b = 0: the middle ends at the model's last block, whose output the model returns after its
    final norm; the choice reads the block's own output, so an identity last block scores 0."""
    model = tiny_model("llama", n_blocks=6)
    blocks = model.model.layers
    with torch.no_grad():
        for i in (3, 5):
            blocks[i].self_attn.o_proj.weight.zero_()
            blocks[i].mlp.down_proj.weight.zero_()
        model.model.norm.weight.copy_(torch.linspace(0.1, 5.0, 32))  # a norm that changes the representation
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    scores = influence(middle_representations(model, ids, 2, 0))
    assert len(scores) == 4 and scores[1] == pytest.approx(0.0, abs=1e-6) and scores[3] == pytest.approx(0.0, abs=1e-6)
    assert cka_kept_middle(model, ids, SandwichShape(2, 2, 0)) == [2, 4]


def test_a_cka_recipe_is_its_own_bundle_and_names_its_blocks(tmp_path, tokenizer):
    """prepare_bundle with select='cka': the manifest's kept blocks are the CKA choice, the bundle
    reads back, and the recipe's cache key differs from the uniform one's."""
    model = tiny_model("llama", n_blocks=10)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(" ".join(f"word{i % 37} thing{i % 11}" for i in range(3000)))
    distill = DistillConfig(steps=0, seq_len=32)
    uniform = EmulatorConfig(SandwichShape(2, 3, 2), distill, corpus=str(text_file))
    cka = EmulatorConfig(SandwichShape(2, 3, 2), distill, corpus=str(text_file), select="cka")
    assert recipe_key("f", uniform, "t") != recipe_key("f", cka, "t")
    bundle = read_bundle(
        prepare_bundle(model, tokenizer, cka, tmp_path / "b", cache=tmp_path / "c", progress=False).root
    )
    blocks = token_blocks(tokenizer, text_file.read_text(), 32)[0]
    ids = blocks[torch.linspace(0, len(blocks) - 1, CKA_ROWS).long()]
    kept = cka_kept_middle(model, ids, SandwichShape(2, 3, 2))
    assert bundle.manifest["kept_middle"] == kept and bundle.manifest["layout"] == [0, 1, *kept, 8, 9]
    with pytest.raises(ValueError, match="select must be one of"):
        EmulatorConfig(SandwichShape(2, 3, 2), distill, select="random")


def test_the_model_samples_corpus_is_sampled_once_and_cached(tmp_path, tokenizer, monkeypatch):
    """``--corpus model-samples``: the model's own text, the same for the same seed, written to the
    cache once; a second recipe on the same model reads the cached text and samples nothing."""
    model = tiny_model("llama", n_blocks=6)
    first = sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, progress=False)
    assert first == sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, progress=False)
    assert first != sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, seed=1, progress=False)
    tokenizer.pad_token = None  # as GPT-2's: padded with end-of-text while sampling, then put back
    assert first == sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, progress=False)
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    tokenizer.pad_token = "<pad>"
    monkeypatch.setattr(corpus, "TOPICS", corpus.TOPICS[:4])
    config = EmulatorConfig(
        SandwichShape(2, 2, 2), DistillConfig(steps=0, seq_len=16), corpus=MODEL_SAMPLES, select="cka"
    )
    bundle = prepare_bundle(model, tokenizer, config, tmp_path / "b", cache=tmp_path / "c", progress=False)
    (kept_file,) = (tmp_path / "c" / "corpora").iterdir()
    assert len(kept_file.read_text()) > 16 * 4
    monkeypatch.setattr(prepare, "sample_corpus", lambda *a, **k: pytest.fail("sampled again"))
    again = prepare_bundle(model, tokenizer, config, tmp_path / "b2", cache=tmp_path / "c", progress=False)
    assert again.digest == bundle.digest
