"""The imputation protocol of Table 1: which values are hidden, how they are scored, and a model's prediction."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from modeling_scpalm import ScPaLMConfig, ScPaLMForPathwayReconstruction
from modeling_scpalm.tasks.imputation import imputation_scores, impute_with_model, mask_for_imputation, mean_imputation


def test_a_tenth_of_each_cells_nonzeros_is_hidden_on_real_cells(pbmc3k, pbmc3k_processor):
    cells, _ = pbmc3k_processor.transform(pbmc3k[:300].X, pbmc3k.var_names)
    masked = mask_for_imputation(cells, fraction=0.1, seed=0)
    before, after = np.diff(cells.indptr), np.diff(masked.cells.indptr)
    np.testing.assert_array_equal(before - after, np.maximum(1, np.round(0.1 * before)))
    np.testing.assert_array_equal(np.bincount(masked.rows, minlength=300), before - after)
    assert np.all(np.diff(masked.rows) >= 0)  # sorted by cell, as `impute_with_model` slices them
    np.testing.assert_array_equal(np.asarray(cells[masked.rows, masked.columns]).ravel(), masked.values)
    assert np.all(np.asarray(masked.cells[masked.rows, masked.columns]).ravel() == 0)
    assert (cells - masked.cells).nnz == len(masked.values)  # nothing else changed


def test_values_are_hidden_with_probability_proportional_to_exp_minus_x():
    # Two non-zero genes per cell, one hidden: the low one with probability e^-0.1 / (e^-0.1 + e^-3) = 0.948.
    cells = sp.csr_matrix(np.tile([[0.1, 3.0, 0.0]], (4000, 1)))
    masked = mask_for_imputation(cells, fraction=0.1, seed=1)
    expected = np.exp(-0.1) / (np.exp(-0.1) + np.exp(-3.0))
    assert np.mean(masked.columns == 0) == pytest.approx(expected, abs=0.015)


def test_the_draw_is_seeded():
    cells = sp.random(50, 200, density=0.3, random_state=0, format="csr", dtype=np.float32)
    first, again, other = (mask_for_imputation(cells, seed=seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first.columns, again.columns)
    assert not np.array_equal(first.columns, other.columns)


def test_scores_match_a_hand_computation():
    scores = imputation_scores(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 2.0]))
    assert scores["rmse"] == pytest.approx(np.sqrt((0.25 + 0 + 4) / 3)) and scores["mae"] == pytest.approx(2.5 / 3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="fraction"):
        mask_for_imputation(sp.csr_matrix(np.ones((2, 3))), fraction=1.5)
    with pytest.raises(ValueError, match="fewer than 2 non-zero"):
        mask_for_imputation(sp.csr_matrix(np.array([[1.0, 0.0], [1.0, 2.0]])))
    with pytest.raises(ValueError, match="no cells"):
        mask_for_imputation(sp.csr_matrix(np.zeros((0, 3))))


def test_a_stage_one_model_predicts_every_hidden_value(pbmc3k, pbmc3k_processor):
    cells, measured = pbmc3k_processor.transform(pbmc3k[:40].X, pbmc3k.var_names)
    masked = mask_for_imputation(cells, seed=0)
    torch.manual_seed(0)
    model = ScPaLMForPathwayReconstruction(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes))
    predicted = impute_with_model(model, pbmc3k_processor, masked, measured, batch_size=16)
    assert predicted.shape == masked.values.shape and np.isfinite(predicted).all()
    # A cell's reconstruction does not depend on its batch: every batch's entries land on its own cells (batches hold
    # cells sorted by length, not in input order), with fixed batches as with the default ones (by gene entries).
    for batch_size in (64, None):
        np.testing.assert_allclose(
            impute_with_model(model, pbmc3k_processor, masked, measured, batch_size=batch_size),
            predicted,
            rtol=1e-4,
            atol=1e-5,
            err_msg=str(batch_size),
        )
    # The first cell's predictions are its own reconstruction's entries.
    inputs = pbmc3k_processor.pad(masked.cells[:1])
    with torch.no_grad():
        own = model.eval()(**inputs, measured_gene_mask=torch.from_numpy(measured)).reconstruction[0].numpy()
    first = masked.rows == 0
    np.testing.assert_allclose(predicted[first], own[masked.columns[first]], rtol=1e-5, atol=1e-6)
    floor = mean_imputation(masked)
    assert floor.shape == masked.values.shape and (floor >= 0).all()
