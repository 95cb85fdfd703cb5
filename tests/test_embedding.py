"""Algorithm 1: permutation invariance, sparse == dense, unmeasured genes ignored."""

import copy

import numpy as np
import pytest
import torch

from modeling_scpalm import ScPaLMConfig, ScPaLMModel
from modeling_scpalm.embedding_scpalm import ScPaLMEmbeddings

from .conftest import random_cells, sparse_inputs


def dense_reference(embeddings: ScPaLMEmbeddings, expression, measured) -> torch.Tensor:
    """The dense path in float64: the reference every sparse computation is held to."""
    expression = torch.as_tensor(expression)
    return copy.deepcopy(embeddings).double().forward_dense(expression.double(), measured).float()


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    model = ScPaLMModel(tiny_config).eval()
    # Away from initialisation, so that no symmetry of fresh weights hides a bug.
    with torch.no_grad():
        for parameter in model.embeddings.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def test_sparse_path_equals_dense_path(model, tiny_config):
    dense = random_cells(6, tiny_config.num_genes, seed=1)
    measured = torch.rand(tiny_config.num_genes, generator=torch.Generator().manual_seed(2)) > 0.2
    inputs = sparse_inputs(dense)
    with torch.no_grad():
        sparse_tokens = model.embeddings(**inputs, measured_gene_mask=measured)
        dense_tokens = dense_reference(model.embeddings, dense, measured)
    torch.testing.assert_close(sparse_tokens, dense_tokens, atol=1e-5, rtol=1e-4)


def test_sparse_path_equals_dense_path_with_a_panel_per_cell(model, tiny_config):
    dense = random_cells(5, tiny_config.num_genes, seed=3)
    generator = torch.Generator().manual_seed(4)
    measured = torch.rand(5, tiny_config.num_genes, generator=generator) > 0.3
    measured[1] = measured[0]  # two cells share a panel
    measured |= torch.from_numpy(dense > 0)
    with torch.no_grad():
        sparse_tokens = model.embeddings(**sparse_inputs(dense), measured_gene_mask=measured)
        dense_tokens = dense_reference(model.embeddings, dense, measured)
    torch.testing.assert_close(sparse_tokens, dense_tokens, atol=1e-5, rtol=1e-4)


def test_shared_first_layer_has_one_value_row_and_keeps_sparse_equal_to_dense(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.share_value_projection = True
    torch.manual_seed(0)
    shared = ScPaLMModel(config).eval()
    assert shared.embeddings.value_projection.shape == (1, config.hidden_size)
    assert shared.embeddings.value_scale.shape == (1, config.hidden_size)
    dense = random_cells(4, config.num_genes, seed=6)
    measured = torch.ones(config.num_genes, dtype=torch.bool)
    with torch.no_grad():
        shared.embeddings.value_projection.add_(0.3 * torch.randn_like(shared.embeddings.value_projection))
        sparse_tokens = shared.embeddings(**sparse_inputs(dense), measured_gene_mask=measured)
        dense_tokens = dense_reference(shared.embeddings, dense, measured)
    torch.testing.assert_close(sparse_tokens, dense_tokens, atol=1e-5, rtol=1e-4)


def test_sparse_path_gradients_equal_dense_path_gradients(tiny_config):
    torch.manual_seed(0)
    embeddings = ScPaLMEmbeddings(tiny_config)
    ScPaLMModel(tiny_config)._init_weights(embeddings)
    embeddings = embeddings.double().eval()
    dense = random_cells(4, tiny_config.num_genes, seed=5)
    measured = torch.ones(tiny_config.num_genes, dtype=torch.bool)
    weights = torch.randn(4, tiny_config.num_pathway_tokens, tiny_config.hidden_size, dtype=torch.float64)
    inputs = sparse_inputs(dense)
    inputs["gene_values"] = inputs["gene_values"].double()

    (embeddings(**inputs, measured_gene_mask=measured) * weights).sum().backward()
    sparse_grads = {name: p.grad.clone() for name, p in embeddings.named_parameters()}
    embeddings.zero_grad()
    (embeddings.forward_dense(torch.from_numpy(dense).double(), measured) * weights).sum().backward()
    for name, parameter in embeddings.named_parameters():
        torch.testing.assert_close(sparse_grads[name], parameter.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_are_the_same_bits_from_run_to_run_on_two_threads(model):
    """A seeded run must train to the same weights, so that a resumed run can be checked against an unbroken one.
    Indexing a pool by each cell's panel accumulated its gradient in thread order (1e-9 apart from run to run)."""
    inputs = sparse_inputs(random_cells(64, model.config.num_genes, seed=3))
    measured = torch.ones(model.config.num_genes, dtype=torch.bool)
    weights = torch.randn(64, model.config.num_pathway_tokens, model.config.hidden_size)
    embeddings, threads = model.embeddings.train(), torch.get_num_threads()
    grads = []
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            embeddings.zero_grad()
            (embeddings(**inputs, measured_gene_mask=measured) * weights).sum().backward()
            grads.append({name: p.grad.clone() for name, p in embeddings.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    for later in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.equal(later[name], grad), name


def test_a_cell_expressing_its_whole_panel_matches_the_dense_path(model, tiny_config):
    """Every weight of the panel's softmax falls on expressed genes: nothing is left to subtract or cancel."""
    dense = np.full((2, tiny_config.num_genes), 1.5, dtype=np.float32)
    dense[1, :5] = 0
    measured = torch.ones(tiny_config.num_genes, dtype=torch.bool)
    with torch.no_grad():
        sparse_tokens = model.embeddings(**sparse_inputs(dense), measured_gene_mask=measured)
        dense_tokens = dense_reference(model.embeddings, dense, measured)
    torch.testing.assert_close(sparse_tokens, dense_tokens, atol=1e-5, rtol=1e-4)


def test_gene_order_does_not_change_the_cell_embedding(model, tiny_config):
    dense = random_cells(4, tiny_config.num_genes, seed=6)
    with torch.no_grad():
        ordered = model(**sparse_inputs(dense)).cell_embedding
        shuffled = model(**sparse_inputs(dense, shuffle_seed=7)).cell_embedding
    torch.testing.assert_close(ordered, shuffled, atol=1e-5, rtol=1e-4)


def test_an_unmeasured_gene_changes_nothing(model, tiny_config):
    dense = random_cells(3, tiny_config.num_genes, seed=8)
    measured = torch.ones(tiny_config.num_genes, dtype=torch.bool)
    unmeasured_gene = 17
    measured[unmeasured_gene] = False
    with_value, without_value = dense.copy(), dense.copy()
    with_value[:, unmeasured_gene] = 3.0
    without_value[:, unmeasured_gene] = 0.0
    with torch.no_grad():
        a = model(**sparse_inputs(with_value), measured_gene_mask=measured).cell_embedding
        b = model(**sparse_inputs(without_value), measured_gene_mask=measured).cell_embedding
        tokens = model.embeddings(**sparse_inputs(without_value), measured_gene_mask=measured)
        tokens_everything_measured = model.embeddings(
            **sparse_inputs(without_value), measured_gene_mask=torch.ones_like(measured)
        )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # ...whereas the same gene, measured at zero, is part of the zero pool.
    assert (tokens - tokens_everything_measured).abs().max() > 1e-5


def test_sparse_path_equals_dense_path_on_real_cells(pbmc3k, pbmc3k_processor):
    config_kwargs = {"num_genes": pbmc3k_processor.num_genes}
    torch.manual_seed(0)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", **config_kwargs)).eval()
    inputs = pbmc3k_processor(pbmc3k[:8])
    cells, _ = pbmc3k_processor.transform(pbmc3k[:8].X, list(pbmc3k.var_names))
    with torch.no_grad():
        sparse_tokens = model.embeddings(
            inputs["gene_ids"], inputs["gene_values"], inputs["attention_mask"], inputs["measured_gene_mask"]
        )
        dense_tokens = dense_reference(model.embeddings, cells.toarray(), inputs["measured_gene_mask"])
    torch.testing.assert_close(sparse_tokens, dense_tokens, atol=1e-4, rtol=1e-3)


def test_shuffled_gene_columns_give_the_same_embedding(pbmc3k, pbmc3k_processor):
    """Permuting an AnnData's genes (names travel with their columns) changes nothing downstream of the processor."""
    torch.manual_seed(0)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes)).eval()
    cells = pbmc3k[:16]
    shuffled = cells[:, np.random.default_rng(0).permutation(cells.n_vars)]
    with torch.no_grad():
        original = model(**pbmc3k_processor(cells)).cell_embedding
        permuted = model(**pbmc3k_processor(shuffled)).cell_embedding
    torch.testing.assert_close(original, permuted, atol=1e-5, rtol=1e-4)


@pytest.fixture
def inference_cells(tiny_config):
    """A fresh embedding in eval mode, four random cells and an all-measured mask: the inference cache's tests."""
    torch.manual_seed(0)
    embeddings = ScPaLMModel(tiny_config).eval().embeddings
    inputs = sparse_inputs(random_cells(4, tiny_config.num_genes, seed=5))
    return embeddings, inputs, torch.ones(tiny_config.num_genes, dtype=torch.bool)


def test_inference_reuses_the_vocabulary_until_a_weight_changes(inference_cells):
    embeddings, inputs, measured = inference_cells
    with torch.no_grad():
        first = embeddings(**inputs, measured_gene_mask=measured)
        cached = embeddings._vocabulary_cache[1]
        torch.testing.assert_close(embeddings(**inputs, measured_gene_mask=measured), first, rtol=0, atol=0)
        assert embeddings._vocabulary_cache[1] is cached
        embeddings.gene_embeddings.add_(0.5)  # as an optimizer step does, in place
        after_update = embeddings(**inputs, measured_gene_mask=measured)
        embeddings.load_state_dict({name: 0.9 * tensor for name, tensor in embeddings.state_dict().items()})
        after_load = embeddings(**inputs, measured_gene_mask=measured)
    with torch.enable_grad():  # never cached: the training path
        uncached_after_load = embeddings(**inputs, measured_gene_mask=measured)
        embeddings.load_state_dict({name: tensor / 0.9 for name, tensor in embeddings.state_dict().items()})
        uncached_after_update = embeddings(**inputs, measured_gene_mask=measured)
    assert not torch.allclose(after_update, first)
    torch.testing.assert_close(after_load, uncached_after_load.detach())
    torch.testing.assert_close(after_update, uncached_after_update.detach(), atol=1e-5, rtol=1e-4)


def test_a_vocabulary_cached_under_autocast_does_not_serve_a_call_outside_it(inference_cells):
    """Autocast makes the cached tables bfloat16; reused by a float32 call, they failed in its matrix products."""
    embeddings, inputs, measured = inference_cells
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings(**inputs, measured_gene_mask=measured)
        after_autocast = embeddings(**inputs, measured_gene_mask=measured)
        embeddings._vocabulary_cache = None
        plain = embeddings(**inputs, measured_gene_mask=measured)
    torch.testing.assert_close(after_autocast, plain, rtol=0, atol=0)


def test_inference_reuses_panel_normalisers_only_for_the_same_panels(inference_cells, tiny_config):
    """The cached vocabulary keeps the last panels' softmax normalisers: another mask, or the same mask tensor
    changed in place, must get its own."""
    embeddings, inputs, measured = inference_cells
    with torch.no_grad():
        all_measured = embeddings(**inputs, measured_gene_mask=measured)
        measured[: tiny_config.num_genes // 2] = False
        half_measured = embeddings(**inputs, measured_gene_mask=measured)
        per_cell = embeddings(**inputs, measured_gene_mask=torch.stack([measured, ~measured] * 2))
    with torch.enable_grad():  # never cached
        uncached_half = embeddings(**inputs, measured_gene_mask=measured).detach()
        uncached_per_cell = embeddings(**inputs, measured_gene_mask=torch.stack([measured, ~measured] * 2)).detach()
    assert not torch.allclose(half_measured, all_measured)
    torch.testing.assert_close(half_measured, uncached_half)
    torch.testing.assert_close(per_cell, uncached_per_cell)


def test_each_token_pools_the_genes_its_own_way_from_initialisation(pbmc3k, pbmc3k_processor):
    """The N tokens must differ in how they vary across cells, not be N copies of one pool (dot-product logits of
    small fresh weights gave uniform attention and a mean cosine of 0.9999 between slots, which training kept)."""
    torch.manual_seed(0)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes)).eval()
    with torch.no_grad():
        tokens = model.embeddings(**pbmc3k_processor(pbmc3k[:128]))
    variation = tokens - tokens.mean(0)  # (cells, N, hidden): each slot's cell-to-cell variation
    cosine = torch.nn.functional.cosine_similarity(variation[:, :, None], variation[:, None, :], dim=-1).mean(0)
    slots = cosine.shape[0]
    assert (cosine.sum() - cosine.diagonal().sum()) / (slots * slots - slots) < 0.5
