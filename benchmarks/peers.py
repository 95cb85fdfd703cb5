"""The peers of the downstream benchmark, each run as its users run it, on the same cells as scPaLM.

Cell representations: PCA of the log-normalised values (all genes, as the paper: 256 components; also 50) and scVI
(scvi-tools, on its usual 2,000 highly variable genes of the raw counts; batch-aware when given a batch column),
Harmony's correction of a PCA (harmonypy), and an MLP autoencoder trained for a given time. Imputation: MAGIC
(magic-impute) and a kNN-smoothing baseline (each hidden value predicted by the mean of the cell's nearest neighbours
in PCA space), both fitted on the masked cells alone. scVI, Harmony and MAGIC are the `peers` extra; without it their
rows say how to get them.
"""

import time

import numpy as np
import scipy.sparse as sp

PEERS_EXTRA = "pip install 'scpalm[peers]'"


class PeerUnavailable(RuntimeError):
    """A peer's package is not installed; the report shows the message instead of numbers."""


def log_normalize(counts, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p of counts scaled to `target_sum` per cell (scanpy's normalize_total + log1p), the processor's transform."""
    import anndata as ad
    import scanpy as sc

    cells = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(cells, target_sum=target_sum)
    sc.pp.log1p(cells)
    return cells.X


def pca(log_normalized, num_components: int, seed: int = 0) -> np.ndarray:
    """The first principal components of the log-normalised values (no scaling, no gene selection)."""
    import scanpy as sc

    num_components = min(num_components, min(log_normalized.shape) - 1)
    return sc.pp.pca(sp.csr_matrix(log_normalized), n_comps=num_components, random_state=seed)


def scvi_latent(
    counts_adata, max_epochs: int, seed: int = 0, num_top_genes: int = 2000, batch_key: str | None = None
) -> np.ndarray:
    """scVI's latent means (10 dimensions) of the cells, trained on their highly variable genes' raw counts; with
    `batch_key`, conditioned on the batches (`obs[batch_key]`) and the genes chosen within each."""
    try:
        import scvi
    except ImportError as error:
        raise PeerUnavailable(f"scvi-tools is not installed ({PEERS_EXTRA})") from error
    import scanpy as sc

    adata = counts_adata.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if adata.n_vars > num_top_genes:
        try:
            sc.pp.highly_variable_genes(
                adata, n_top_genes=num_top_genes, flavor="seurat_v3", subset=True, batch_key=batch_key
            )
        except ValueError:  # the loess fit can be singular on a few hundred cells: smooth over all of them
            sc.pp.highly_variable_genes(
                adata, n_top_genes=num_top_genes, flavor="seurat_v3", subset=True, span=1.0, batch_key=batch_key
            )
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    model.train(
        max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False
    )
    return model.get_latent_representation()


def mlp_autoencoder(
    log_normalized,
    seconds: float,
    seed: int = 0,
    num_top_genes: int = 2000,
    batch_size: int = 64,
    max_steps: int | None = None,
) -> np.ndarray:
    """The 64-dimensional bottleneck of an MLP autoencoder (genes -> 256 -> 64 -> 256 -> genes, MSE, AdamW at 1e-3)
    on the log-normalised values of the most variable genes, trained for `seconds` of wall-clock time (at least one
    step): the simplest learned embedding at a given budget."""
    import anndata as ad
    import scanpy as sc
    import torch
    from torch import nn

    cells = ad.AnnData(sp.csr_matrix(log_normalized, dtype=np.float32))
    if cells.n_vars > num_top_genes:
        sc.pp.highly_variable_genes(cells, n_top_genes=num_top_genes)
        cells = cells[:, cells.var["highly_variable"].to_numpy()]
    values = torch.from_numpy(np.asarray(cells.X.todense(), dtype=np.float32))
    torch.manual_seed(seed)
    genes = values.shape[1]
    encoder = nn.Sequential(nn.Linear(genes, 256), nn.ReLU(), nn.Linear(256, 64))
    decoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, genes))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    started, step = time.perf_counter(), 0
    while step == 0 or (time.perf_counter() - started < seconds and (max_steps is None or step < max_steps)):
        batch = values[torch.randint(values.shape[0], (batch_size,), generator=generator)]
        loss = nn.functional.mse_loss(decoder(encoder(batch)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    with torch.no_grad():
        return encoder(values).numpy()


def harmony(representation: np.ndarray, batches, seed: int = 0) -> np.ndarray:
    """Harmony's correction (harmonypy, default settings) of a representation, usually a PCA, for the batches."""
    try:
        import harmonypy
    except ImportError as error:
        raise PeerUnavailable(f"harmonypy is not installed ({PEERS_EXTRA})") from error
    import pandas as pd

    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    result = harmonypy.run_harmony(
        np.asarray(representation, dtype=np.float64), meta, ["batch"], random_state=seed, verbose=False
    )
    corrected = np.asarray(result.Z_corr)
    return corrected.T if corrected.shape[0] != len(meta) else corrected


def magic_imputation(masked_cells: sp.csr_matrix, rows: np.ndarray, columns: np.ndarray, seed: int = 0) -> np.ndarray:
    """MAGIC's smoothed values (default settings) at the hidden entries, from the masked log-normalised cells."""
    try:
        import magic
    except ImportError as error:
        raise PeerUnavailable(f"magic-impute is not installed ({PEERS_EXTRA})") from error

    n_pca = min(100, min(masked_cells.shape) - 1)
    operator = magic.MAGIC(n_pca=n_pca, random_state=seed, verbose=0)
    smoothed = operator.fit_transform(sp.csr_matrix(masked_cells), genes="all_genes")
    return np.asarray(smoothed)[rows, columns]


def knn_imputation(
    masked_cells: sp.csr_matrix,
    rows: np.ndarray,
    columns: np.ndarray,
    num_neighbors: int = 15,
    num_components: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Each hidden value as the mean of that gene over the cell's `num_neighbors` nearest cells (PCA space)."""
    from sklearn.neighbors import NearestNeighbors

    embedding = pca(masked_cells, num_components, seed)
    num_neighbors = min(num_neighbors, masked_cells.shape[0] - 1)
    # The first neighbour of a cell is itself, whose value was hidden: left out.
    _, neighbors = NearestNeighbors(n_neighbors=num_neighbors + 1).fit(embedding).kneighbors(embedding)
    neighbors = neighbors[:, 1:]
    cells = sp.csc_matrix(masked_cells)
    predicted = np.empty(len(rows), dtype=np.float64)
    for gene in np.unique(columns):
        at_gene = np.flatnonzero(columns == gene)
        values = cells[:, gene].toarray().ravel()
        predicted[at_gene] = values[neighbors[rows[at_gene]]].mean(axis=1)
    return predicted
