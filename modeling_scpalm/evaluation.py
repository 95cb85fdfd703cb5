"""Cell embeddings judged the way the field judges them: scib-metrics' `Benchmarker` (the scIB benchmark's bio
conservation and batch correction metrics, and their total, 0.6 bio + 0.4 batch), with the paper's own clustering
score beside it (Leiden at resolution 1.0, ARI and NMI against the labels: `tasks.annotation.cluster_and_score`).

Needs the `evaluate` extra (scib-metrics, which brings JAX) and the `analysis` extra.
"""

import gc
from pathlib import Path

import numpy as np

LEIDEN_COLUMNS = {"ari": "Leiden-1.0 ARI", "nmi": "Leiden-1.0 NMI"}
AGGREGATE_COLUMNS = ("Bio conservation", "Batch correction", "Total")
RESULTS_NAME = "scib_results"  # <output_dir>/scib_results.csv, .md, and scib-metrics' figure (.svg)
EXACT_NEIGHBORS_UP_TO = 50_000  # cells; an exact search of 50,000 x 64 takes seconds on two cores


def evaluate_embeddings(
    adata,
    label_key: str,
    obsm_keys: list[str],
    batch_key: str | None = None,
    unintegrated_key: str | None = None,
    is_normalized: bool = False,
    output_dir: str | Path | None = None,
    n_jobs: int = 1,
    seed: int = 0,
):
    """
    Score each embedding `adata.obsm[key]` against the cell types `adata.obs[label_key]` and, with `batch_key`, the
    mixing of the batches `adata.obs[batch_key]`.

    Args:
        unintegrated_key: the embedding that batch correction is measured against (scIB's principal component
            regression comparison): `X_pca` when `adata.obsm` has it, else a PCA of the log-normalised `adata.X`
            (raw counts, or log-normalised values with `is_normalized`). Only used with `batch_key`.
        output_dir: where to write the table (`scib_results.csv` and `.md`) and scib-metrics' figure.

    Returns:
        A `pandas.DataFrame`, one row per embedding: every metric, the aggregate scores ("Bio conservation", and with
        a batch key "Batch correction" and "Total"), and the Leiden-1.0 ARI and NMI.
    """
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    from .tasks.annotation import cluster_and_score

    _check_keys(adata, label_key, obsm_keys, batch_key)
    # The metrics see the labels, the batches and the embeddings only: a small AnnData of those, as float32.
    columns = [label_key] + ([batch_key] if batch_key and batch_key != label_key else [])
    cells = _embeddings_only(adata, columns, obsm_keys)
    if batch_key is None:
        batch_key = "_one_batch"  # the Benchmarker needs a batch column; without batch metrics nothing reads it
        cells.obs[batch_key] = "all"
        unintegrated_key = obsm_keys[0]  # read by the batch metrics alone
    elif unintegrated_key is None:
        unintegrated_key = "X_pca"
        cells.obsm[unintegrated_key] = (
            np.asarray(adata.obsm["X_pca"], dtype=np.float32)
            if "X_pca" in adata.obsm
            else _pca(adata, is_normalized, seed)
        )
    elif unintegrated_key not in cells.obsm:
        _check_keys(adata, label_key, [unintegrated_key], None)
        cells.obsm[unintegrated_key] = np.asarray(adata.obsm[unintegrated_key], dtype=np.float32)

    benchmarker = Benchmarker(
        cells,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(obsm_keys),
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection() if batch_key != "_one_batch" else None,
        pre_integrated_embedding_obsm_key=unintegrated_key,
        n_jobs=n_jobs,
        progress_bar=False,
    )
    # scib-metrics collects garbage after every metric; with torch and JAX loaded each collection walks millions of
    # objects (tens of seconds on a few hundred cells). Frozen, the objects that exist now are not walked again.
    gc.freeze()
    try:
        # Exact neighbours where they take seconds; beyond, scib-metrics' own approximate search (pynndescent).
        exact = cells.n_obs <= EXACT_NEIGHBORS_UP_TO
        benchmarker.prepare(neighbor_computer=_exact_neighbors(n_jobs) if exact else None)
        benchmarker.benchmark()
    finally:
        gc.unfreeze()
    results = benchmarker.get_results(min_max_scale=False)
    metric_types = results.loc["Metric Type"]
    table = results.drop(index="Metric Type").astype(np.float64)
    for key in obsm_keys:
        leiden = cluster_and_score(cells, key, label_key, seed=seed)
        for name, column in LEIDEN_COLUMNS.items():
            table.loc[key, column] = leiden[name]
    table.index.name = "embedding"
    if output_dir is not None:
        _write(table, metric_types, benchmarker, Path(output_dir))
    return table


def _check_keys(adata, label_key: str, obsm_keys: list[str], batch_key: str | None):
    for key, role in ((label_key, "label"), (batch_key, "batch")):
        if key is not None and key not in adata.obs:
            raise ValueError(
                f"obs has no {role} column {key!r}; it has: {', '.join(map(str, adata.obs.columns)) or 'none'}"
            )
        if key is not None and adata.obs[key].isna().any():
            raise ValueError(
                f"{int(adata.obs[key].isna().sum()):,} cells have no value in obs[{key!r}]: drop them first"
            )
    if not obsm_keys:
        raise ValueError("name at least one embedding (an obsm key) to evaluate")
    missing = [key for key in obsm_keys if key not in adata.obsm]
    if missing:
        raise ValueError(
            f"obsm has no {', '.join(map(repr, missing))}; it has: {', '.join(adata.obsm) or 'none'} "
            "(`scpalm embed` writes X_scpalm; `sc.pp.pca` writes X_pca)"
        )
    if adata.n_obs < 10:
        raise ValueError(f"{adata.n_obs} cells are too few to evaluate an embedding")


def _exact_neighbors(n_jobs: int):
    """scib-metrics' neighbour search done exactly (scikit-learn). Besides being exact, it spares numba compiling
    pynndescent's search in each new process, which the metrics otherwise need only for kBET's per-label graphs."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    def search(embedding: np.ndarray, num_neighbors: int):
        # Each cell is its own first neighbour, as in pynndescent's graph.
        index = NearestNeighbors(n_neighbors=num_neighbors, algorithm="brute", n_jobs=n_jobs).fit(embedding)
        distances, indices = index.kneighbors(embedding)
        return NeighborsResults(indices=indices, distances=distances)

    return search


def _embeddings_only(adata, columns: list[str], obsm_keys: list[str]):
    import anndata

    obs = adata.obs[columns].astype(str).astype("category")
    return anndata.AnnData(obs=obs, obsm={key: np.asarray(adata.obsm[key], dtype=np.float32) for key in obsm_keys})


def _pca(adata, is_normalized: bool, seed: int, num_components: int = 50) -> np.ndarray:
    """The unintegrated reference: the first principal components of the log-normalised values."""
    import scanpy as sc

    cells = adata.to_memory() if adata.isbacked else adata
    values = sc.AnnData(cells.X.astype(np.float32))
    if not is_normalized:
        sc.pp.normalize_total(values, target_sum=1e4)
        sc.pp.log1p(values)
    num_components = min(num_components, min(values.shape) - 1)
    return sc.pp.pca(values.X, n_comps=num_components, random_state=seed).astype(np.float32)


def _write(table, metric_types, benchmarker, output_dir: Path):
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / f"{RESULTS_NAME}.csv")
    header = ["embedding", *table.columns]
    kinds = ["(kind)", *(metric_types.get(column, "paper (section 4.2)") for column in table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(kinds) + " |"]
    lines += [
        "| " + " | ".join([str(name), *(f"{value:.3f}" for value in row)]) + " |" for name, row in table.iterrows()
    ]
    (output_dir / f"{RESULTS_NAME}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    benchmarker.plot_results_table(show=False, save_dir=str(output_dir))
    plt.close("all")
