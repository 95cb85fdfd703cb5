"""Pathway identification (Appendix D): the association matrix, top genes, and the enrichment test."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import false_discovery_control, hypergeom

from modeling_scpalm.tasks.pathways import code_gene_association, enrichment, read_gmt, top_genes

from .conftest import data_file


def test_association_matrix_matches_a_hand_computation():
    codes = np.array([[0, 0, 1, 1], [2, 2, 2, 0], [1, 1, 1, 1]])  # 3 cells, N = 4 tokens, K = 3 codes
    expression = np.array([[1.0, 0.0, 2.0], [0.0, 4.0, 2.0], [3.0, 0.0, 0.0]])
    raw = np.zeros((3, 3))
    raw[0] += 0.5 * expression[0] + 0.25 * expression[1]  # code 0: half of cell 0, a quarter of cell 1
    raw[1] += 0.5 * expression[0] + 1.0 * expression[2]
    raw[2] += 0.75 * expression[1]
    expected = raw / raw.sum(0)
    np.testing.assert_allclose(code_gene_association(codes, sp.csr_matrix(expression), 3), expected)
    np.testing.assert_allclose(code_gene_association(codes, expression, 3).sum(0), 1.0)


def test_top_genes_are_strongest_first_and_skip_unused_codes():
    association = np.array([[0.1, 0.7, 0.2], [0.0, 0.0, 0.0]])
    assert top_genes(association, ["A", "B", "C"], num_genes=2) == [["B", "C"], []]


def test_enrichment_p_values_are_scipys_hypergeometric_then_bh():
    universe = [f"G{i}" for i in range(100)]
    gene_sets = {"S1": {f"G{i}" for i in range(10)}, "S2": {f"G{i}" for i in range(5, 25)}, "OTHER": {"X1", "X2"}}
    rows = enrichment([["G0", "G1", "G2", "G30"], ["G6"]], gene_sets, universe)
    raw = {  # (code, set): P(overlap >= k) drawing len(drawn) of 100 genes, the set's size marked
        (0, "S1"): hypergeom.sf(2, 100, 10, 4),
        (0, "S2"): 1.0,
        (1, "S1"): hypergeom.sf(0, 100, 10, 1),
        (1, "S2"): hypergeom.sf(0, 100, 20, 1),
    }
    adjusted = dict(zip(raw, false_discovery_control(list(raw.values()), method="bh")))
    assert {(code, name) for code, name, *_ in rows} == {(0, "S1"), (1, "S1"), (1, "S2")}  # OTHER: too small
    for code, name, _overlap, p_value, adjusted_p_value in rows:
        assert p_value == pytest.approx(raw[code, name]) and adjusted_p_value == pytest.approx(adjusted[code, name])
    assert rows[0][:3] == (0, "S1", ["G0", "G1", "G2"])


def test_a_planted_pathway_is_recovered():
    rng = np.random.default_rng(0)
    genes = [f"GENE{i}" for i in range(300)]
    planted = set(genes[40:52])
    expression = rng.poisson(1.0, size=(400, 300)).astype(float)
    active = rng.random(400) < 0.3
    expression[np.ix_(active, np.arange(40, 52))] += rng.poisson(20.0, size=(active.sum(), 12))
    # Cells running the pathway put most tokens on code 3; the others spread over codes 0-2 and 4-7.
    codes = rng.choice([0, 1, 2, 4, 5, 6, 7], size=(400, 16))
    codes[active, :12] = 3
    association = code_gene_association(codes, expression, 8)
    decoys = {f"DECOY{i}": set(rng.choice(genes, 12, replace=False)) for i in range(50)}
    rows = enrichment(top_genes(association, genes, 10), {"PLANTED": planted, **decoys}, genes)
    code, name, overlap, _, adjusted_p_value = rows[0]
    assert (code, name) == (3, "PLANTED") and len(overlap) == 10 and adjusted_p_value < 1e-10


def test_reactome_gmt_reads():
    gene_sets = read_gmt(data_file("gene_sets/c2.cp.reactome.v2023.1.Hs.symbols.gmt.gz"))
    assert len(gene_sets) == 1654 and all(gene == gene.upper() for genes in gene_sets.values() for gene in genes)


def test_identify_pathways_runs_appendix_d_on_a_model_and_cells(pbmc3k, pbmc3k_processor):
    import torch

    from modeling_scpalm import ScPaLMConfig, ScPaLMModel
    from modeling_scpalm.tasks.pathways import identify_pathways

    torch.manual_seed(0)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes)).eval()
    cells = pbmc3k[:150].copy()
    reactome = data_file("gene_sets/c2.cp.reactome.v2023.1.Hs.symbols.gmt.gz")
    table = identify_pathways(model, pbmc3k_processor, cells, reactome, num_genes=5, batch_size=64)
    # The same, step by step: the model's codes, the association, top genes, enrichment.
    with torch.no_grad():
        codes = model(**pbmc3k_processor(cells)).pathway_codes.numpy()
    association = code_gene_association(codes, cells.X, model.config.codebook_size)
    rows = enrichment(top_genes(association, cells.var_names, 5), read_gmt(reactome), cells.var_names)
    assert len(table) == len(rows) > 0
    assert list(table.columns) == ["code", "top_genes", "gene_set", "overlap", "p_value", "adjusted_p_value"]
    for (_, row), (code, name, overlap, p_value, adjusted) in zip(table.iterrows(), rows):
        assert (row.code, row.gene_set, row.overlap) == (code, name, ", ".join(overlap))
        assert row.adjusted_p_value == pytest.approx(adjusted) and row.p_value == pytest.approx(p_value)


def test_bad_codes_name_the_problem():
    with pytest.raises(ValueError, match="must lie in"):
        code_gene_association(np.array([[0, 5]]), np.ones((1, 3)), 4)
    with pytest.raises(ValueError, match="cells of `expression`"):
        code_gene_association(np.array([[0, 1]]), np.ones((2, 3)), 4)
