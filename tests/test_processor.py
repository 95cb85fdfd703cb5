"""The processor: gene matching, normalisation, sparse padding, save/load, and clear errors on bad input."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from modeling_scpalm import ScPaLMProcessor
from modeling_scpalm.processing_scpalm import gene_key

VOCABULARY = ["CD3E", "CD14", "MS4A1", "NKG7", "LYZ"]
ENSEMBL = ["ENSG00000198851", "ENSG00000170458", "ENSG00000156738", "ENSG00000105374", "ENSG00000090382"]


@pytest.fixture
def processor():
    return ScPaLMProcessor(gene_names=VOCABULARY, gene_ids=ENSEMBL)


def test_gene_key_ignores_case_and_ensembl_version():
    assert gene_key("ENSG00000198851.12") == gene_key("ensg00000198851") == "ENSG00000198851"
    assert gene_key("Cd3e") == "CD3E"


def test_genes_match_by_symbol_or_versioned_ensembl_id(processor):
    match = processor.match_genes(["lyz", "ENSG00000170458.14", "UNKNOWN1", "NKG7"])
    assert match.vocabulary_index.tolist() == [4, 1, -1, 3]
    assert match.num_matched_input_genes == 3 and match.unmatched_examples == ["UNKNOWN1"]
    # An input Ensembl ID wins over a symbol that says otherwise.
    assert processor.match_genes(["CD3E"], gene_ids=["ENSG00000090382.3"]).vocabulary_index.tolist() == [4]
    assert "matched 3 of 4 input genes to 3 of 5 vocabulary genes" in str(match)


def test_counts_are_library_size_normalised_and_log1p(processor):
    counts = np.array([[1, 0, 3, 0, 6], [0, 2, 0, 2, 0]], dtype=np.int64)
    cells, measured = processor.transform(counts, VOCABULARY)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(cells.toarray(), expected, rtol=1e-6)
    assert measured.all()


def test_library_size_counts_every_input_gene_and_duplicates_are_summed(processor):
    names = ["CD3E", "CD3E", "NOT_IN_VOCAB", "LYZ"]
    counts = np.array([[1, 2, 5, 2]])
    cells, measured = processor.transform(counts, names)
    expected = np.zeros((1, 5))
    expected[0, 0] = np.log1p(3 / 10 * 1e4)
    expected[0, 4] = np.log1p(2 / 10 * 1e4)
    np.testing.assert_allclose(cells.toarray(), expected, rtol=1e-6)
    assert measured.tolist() == [True, False, False, False, True]


def test_normalised_input_passes_through(processor):
    values = np.array([[0.5, 0.0, 1.25, 0.0, 2.0]], dtype=np.float32)
    cells, _ = processor.transform(values, VOCABULARY, is_normalized=True)
    np.testing.assert_allclose(cells.toarray(), values, rtol=1e-6)


def test_matches_scanpy_normalisation(pbmc3k, pbmc3k_processor):
    import scanpy as sc

    adata = pbmc3k[:50].copy()
    cells, measured = pbmc3k_processor.transform(adata.X, list(adata.var_names))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    order = [pbmc3k_processor.gene_names.index(name) for name in adata.var_names]
    np.testing.assert_allclose(cells[:, order].toarray(), adata.X.toarray(), rtol=1e-5, atol=1e-6)
    assert measured.all()


def test_padding_keeps_every_nonzero_gene(pbmc3k, pbmc3k_processor):
    inputs = pbmc3k_processor(pbmc3k[:20])
    cells, _ = pbmc3k_processor.transform(pbmc3k[:20].X, list(pbmc3k.var_names))
    assert inputs["gene_ids"].shape == inputs["gene_values"].shape == inputs["attention_mask"].shape
    assert inputs["gene_ids"].shape[1] == np.diff(cells.indptr).max()
    dense = torch.zeros(20, pbmc3k_processor.num_genes)
    dense.scatter_add_(1, inputs["gene_ids"], inputs["gene_values"] * inputs["attention_mask"])
    np.testing.assert_allclose(dense.numpy(), cells.toarray(), rtol=1e-6)
    assert inputs["measured_gene_mask"].shape == (pbmc3k_processor.num_genes,)
    rounded = pbmc3k_processor.pad(cells, pad_to_multiple_of=128)
    assert rounded["gene_ids"].shape[1] == -(-np.diff(cells.indptr).max() // 128) * 128
    assert rounded["attention_mask"].sum() == inputs["attention_mask"].sum()


def test_vocabulary_from_several_panels(pbmc3k):
    top_genes = np.argsort(-np.asarray(pbmc3k.X.sum(0)).ravel())[:160]
    first, second = pbmc3k[:, top_genes[:100]], pbmc3k[:, top_genes[50:]]
    processor = ScPaLMProcessor.from_anndata([first, second])
    assert processor.num_genes == 160
    inputs = processor(second)
    measured = inputs["measured_gene_mask"].numpy()
    assert measured.sum() == 110
    assert set(np.asarray(processor.gene_names)[measured]) == set(second.var_names)


def test_save_and_load(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    loaded = ScPaLMProcessor.from_pretrained(tmp_path)
    assert loaded.gene_names == VOCABULARY and loaded.gene_ids == ENSEMBL and loaded.target_sum == 1e4
    from transformers import AutoFeatureExtractor

    assert isinstance(AutoFeatureExtractor.from_pretrained(tmp_path), ScPaLMProcessor)


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        (np.array([[1.0, np.nan, 0, 0, 1]]), ValueError, "NaN"),
        (np.array([[1.0, np.inf, 0, 0, 1]]), ValueError, "infinite"),
        (np.array([[1, -2, 0, 0, 1]]), ValueError, "negative"),
        (np.array([[1.5, 2, 0, 0, 1]]), ValueError, "is_normalized=True"),
        (np.array([["a", "b", "c", "d", "e"]], dtype=object), TypeError, "real numbers"),
        (np.array([[1, 2, 0, 0, 1], [0, 0, 0, 0, 0]]), ValueError, "no counts"),
    ],
)
def test_bad_values_raise_clear_errors(processor, values, error, message):
    with pytest.raises(error, match=message):
        processor(values, gene_names=VOCABULARY)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[3.0, 1.0, 0, 0, 12.0]]), "whole number"),  # raw counts
        (np.array([[0.5, 1.0, 0, 0, 11.5]]), "above log1p"),  # beyond what a cell normalised to 10,000 can hold
    ],
)
def test_normalised_input_that_cannot_be_log1p_of_counts_is_refused(processor, values, message):
    with pytest.raises(ValueError, match=message):
        processor(values, gene_names=VOCABULARY, is_normalized=True)


def test_no_matching_gene_raises(processor):
    with pytest.raises(ValueError, match="None of the 2 input genes"):
        processor(np.array([[1, 2]]), gene_names=["FOO", "BAR"])


def test_a_cell_without_vocabulary_genes_raises(processor):
    with pytest.raises(ValueError, match="express none of the model's vocabulary genes"):
        processor(sp.csr_matrix(np.array([[1, 0], [0, 3]])), gene_names=["CD3E", "FOO"])


def test_mismatched_gene_names_raise(processor):
    with pytest.raises(ValueError, match="5 genes .* but 3 gene names"):
        processor(np.ones((2, 5)), gene_names=VOCABULARY[:3])


def test_zero_cells_raise_clear_errors_in_the_processor_and_the_model(processor):
    from modeling_scpalm import ScPaLMConfig, ScPaLMModel

    with pytest.raises(ValueError, match="no cells"):
        processor(np.zeros((0, 5)), gene_names=VOCABULARY)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=5, num_pathway_tokens=4, codebook_size=8))
    empty = torch.zeros((0, 1), dtype=torch.long)
    with pytest.raises(ValueError, match="no cells"):
        model(gene_ids=empty, gene_values=empty.float())


def test_an_input_covering_little_of_the_vocabulary_is_warned_about(pbmc3k, pbmc3k_processor):
    narrow = pbmc3k[:20, :763].copy()  # 5.6% of the 13,714 vocabulary genes
    with pytest.warns(UserWarning, match=r"covers 5\.6% of the model's vocabulary"):
        ScPaLMProcessor.from_dict(pbmc3k_processor.to_dict())(narrow)
