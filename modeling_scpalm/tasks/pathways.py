"""Pathway identification (section 4.5, Appendix D): which genes each pathway code stands for, and which known
pathways those genes over-represent.

The code-by-gene association matrix adds each cell's raw expression to the rows of the codes its pathway tokens
activate, weighted by each code's share of the cell's N tokens; each gene's column is then normalised to sum to one
(the gene's relative prevalence across codes). A code's top genes are tested for over-representation in gene sets
(Reactome GMT files) by the hypergeometric test against the genes the data measured, with Benjamini-Hochberg
correction over all (code, gene set) tests.
"""

import gzip
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def code_gene_association(codes: np.ndarray, expression, num_codes: int) -> np.ndarray:
    """
    Args:
        codes: `(cells, N)` code index of each pathway token (`ScPaLMModel(...).pathway_codes`).
        expression: `(cells, genes)` raw expression of the same cells (dense or scipy sparse).
        num_codes: K, the codebook size.

    Returns:
        `(K, genes)`: row k sums the expression of the cells that activate code k, weighted by the share of the
        cell's tokens on k; each column normalised to sum to 1 (columns of never-expressed genes stay 0).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != expression.shape[0]:
        raise ValueError(
            f"`codes` must be (cells, N) for the {expression.shape[0]} cells of `expression`, got {codes.shape}."
        )
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"code indices must lie in [0, {num_codes}); got {codes.min()}..{codes.max()}.")
    cells, tokens = codes.shape
    # (cells, K) share of each cell's tokens on each code; duplicates are summed by the sparse constructor.
    shares = sp.csr_matrix(
        (np.full(codes.size, 1.0 / tokens), (np.repeat(np.arange(cells), tokens), codes.ravel())),
        shape=(cells, num_codes),
    )
    association = np.asarray((shares.T @ sp.csr_matrix(expression, dtype=np.float64)).todense())
    totals = association.sum(axis=0, keepdims=True)
    return np.divide(association, totals, out=np.zeros_like(association), where=totals > 0)


def top_genes(association: np.ndarray, gene_names, num_genes: int = 10) -> list[list[str]]:
    """Each code's `num_genes` genes of highest association, strongest first (codes no cell uses get none)."""
    gene_names = np.asarray(gene_names)
    order = np.argsort(-association, axis=1, kind="stable")[:, :num_genes]
    return [[str(g) for g in gene_names[row][association[code, row] > 0]] for code, row in enumerate(order)]


def read_gmt(path: str | Path) -> dict[str, set[str]]:
    """Gene sets from a GMT file (plain or gzipped): name -> upper-case gene symbols."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    gene_sets = {}
    with opener(path, "rt") as handle:
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > 2:
                gene_sets[fields[0]] = {gene.upper() for gene in fields[2:] if gene}
    if not gene_sets:
        raise ValueError(f"{path} holds no gene sets (expected GMT: name, description, genes, tab-separated).")
    return gene_sets


def enrichment(code_genes: list[list[str]], gene_sets: dict[str, set[str]], universe, min_set_size: int = 5):
    """
    Over-representation of each code's genes in each gene set (hypergeometric, one-sided), BH-adjusted over all tests.

    Returns:
        rows `(code, gene_set, overlap_genes, p_value, adjusted_p_value)`, by adjusted p-value; only pairs that share
        at least one gene are listed (the others have p = 1 and still count in the correction).
    """
    from scipy.stats import false_discovery_control, hypergeom

    universe = {str(gene).upper() for gene in universe}
    sets = {name: genes & universe for name, genes in gene_sets.items()}
    sets = {name: genes for name, genes in sets.items() if len(genes) >= min_set_size}
    rows, p_values = [], []
    for code, genes in enumerate(code_genes):
        drawn = {gene.upper() for gene in genes} & universe
        if not drawn:
            continue
        for name, members in sets.items():
            overlap = drawn & members
            p_value = hypergeom.sf(len(overlap) - 1, len(universe), len(members), len(drawn)) if overlap else 1.0
            p_values.append(p_value)
            if overlap:
                rows.append([code, name, sorted(overlap), float(p_value), len(p_values) - 1])
    if not p_values:
        return []
    adjusted = false_discovery_control(np.asarray(p_values), method="bh")
    for row in rows:
        row[4] = float(adjusted[row[4]])
    return sorted((tuple(row) for row in rows), key=lambda row: (row[4], row[3]))


def identify_pathways(
    model,
    processor,
    adata,
    gene_sets,
    num_genes: int = 10,
    layer: str | None = None,
    is_normalized: bool = False,
    batch_size: int | None = None,
):
    """
    The whole of Appendix D on a model and an AnnData: each cell's pathway codes, the code-by-gene association
    (from the expression in `X` or `layers[layer]`), each code's `num_genes` top genes, and their over-representation
    in `gene_sets` (a dict, or a GMT path such as Reactome's) against the genes of `adata`.

    Returns:
        a `pandas.DataFrame` with one row per (code, gene set) sharing genes, by adjusted p-value: `code`,
        `top_genes` (the code's), `gene_set`, `overlap`, `p_value`, `adjusted_p_value` (Benjamini-Hochberg).
    """
    import pandas as pd

    from ..inference import embed_anndata

    if isinstance(gene_sets, (str, Path)):
        gene_sets = read_gmt(gene_sets)
    codes = embed_anndata(
        model, processor, adata, batch_size, is_normalized, layer, progress=False, representation="pathway_codes"
    )
    expression = adata.layers[layer] if layer else adata.X
    association = code_gene_association(codes, expression, model.config.codebook_size)
    code_genes = top_genes(association, adata.var_names, num_genes)
    rows = enrichment(code_genes, gene_sets, universe=adata.var_names)
    columns = ["code", "top_genes", "gene_set", "overlap", "p_value", "adjusted_p_value"]
    return pd.DataFrame(
        [
            (code, ", ".join(code_genes[code]), name, ", ".join(overlap), p, adjusted)
            for code, name, overlap, p, adjusted in rows
        ],
        columns=columns,
    )
