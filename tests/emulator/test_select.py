"""Middle blocks chosen by CKA (emulator/select.py): the similarity, the cut into runs, the choice."""

import itertools

import pytest
import torch

from offsite.cloud import prepare
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle, recipe_key
from offsite.emulator import corpus
from offsite.emulator.corpus import MODEL_SAMPLES, sample_corpus
from offsite.emulator.distill import DistillConfig
from offsite.emulator.sandwich import SandwichShape
from offsite.emulator.select import cka_kept_middle, linear_cka, middle_representations, segment
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


def _brute_force(dissimilarity, k):
    m = len(dissimilarity) - 1
    best = None
    for cuts in itertools.combinations(range(1, m), k - 1):
        edges = (0, *cuts, m)
        runs = list(zip(edges, edges[1:]))
        cost = sum(dissimilarity[s][e] for s, e in runs)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, runs)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_segment_finds_the_cheapest_cut_into_runs(seed):
    generator = torch.Generator().manual_seed(seed)
    m = 9
    d = torch.rand(m + 1, m + 1, generator=generator).tolist()
    for k in (1, 3, 5, 9):
        runs = segment(d, k)
        assert len(runs) == k and runs[0][0] == 0 and runs[-1][1] == m
        assert all(e1 == s2 for (_, e1), (s2, _) in zip(runs, runs[1:]))
        cost, expected = _brute_force(d, k)
        assert sum(d[s][e] for s, e in runs) == pytest.approx(cost)
    with pytest.raises(ValueError, match="cannot cut"):
        segment(d, m + 1)


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
    assert len(reps) == 7 and reps[0].shape == (4 * 32, 32)
    assert linear_cka(reps[0], reps[1]) == pytest.approx(1.0, abs=1e-6)  # block 2 is the identity
    assert cka_kept_middle(model, ids, shape) == [3, 6]
    assert shape.kept_middle(10) == [2, 7]


def test_a_cka_recipe_is_its_own_bundle_and_names_its_blocks(tmp_path, tokenizer):
    """prepare_bundle with select='cka': the manifest's kept blocks are the CKA choice, the bundle
    reads back, and the recipe's cache key differs from the uniform one's."""
    model = tiny_model("llama", n_blocks=10)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 37} thing{i % 11}" for i in range(3000)))
    distill = DistillConfig(steps=0, seq_len=32)
    uniform = EmulatorConfig(SandwichShape(2, 3, 2), distill, corpus=str(corpus))
    cka = EmulatorConfig(SandwichShape(2, 3, 2), distill, corpus=str(corpus), select="cka")
    assert recipe_key("f", uniform, "t") != recipe_key("f", cka, "t")
    bundle = read_bundle(
        prepare_bundle(model, tokenizer, cka, tmp_path / "b", cache=tmp_path / "c", progress=False).root
    )
    kept = bundle.manifest["kept_middle"]
    assert len(kept) == 3 and kept == sorted(set(kept)) and all(2 <= i < 8 for i in kept)
    assert bundle.manifest["layout"] == [0, 1, *kept, 8, 9]
    with pytest.raises(ValueError, match="select must be one of"):
        EmulatorConfig(SandwichShape(2, 3, 2), distill, select="random")


def test_the_model_samples_corpus_is_sampled_once_and_cached(tmp_path, tokenizer, monkeypatch):
    """``--corpus model-samples``: the model's own text, the same for the same seed, written to the
    cache once; a second recipe on the same model reads the cached text and samples nothing."""
    model = tiny_model("llama", n_blocks=6)
    first = sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, progress=False)
    assert first == sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, progress=False)
    assert first != sample_corpus(model, tokenizer, new_tokens=24, batch_size=50, seed=1, progress=False)
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
