"""Unsupervised cell-type annotation, the paper's protocol (section 4.2): neighbour graph on a cell representation,
Leiden at resolution 1.0, clusters scored against known labels by ARI and NMI (and the representation by silhouette).
Needs the `analysis` extra (scanpy, scikit-learn, igraph).
"""

import numpy as np


def cluster_and_score(
    adata,
    representation: str,
    label_key: str,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    cluster_key: str | None = None,
    seed: int = 0,
    silhouette_sample_size: int | None = 5000,
) -> dict[str, float]:
    """
    Leiden clusters of `adata.obsm[representation]`, written to `adata.obs[cluster_key]`, scored against
    `adata.obs[label_key]`.

    Returns:
        `{"ari", "nmi", "silhouette", "num_clusters"}`: adjusted Rand index and normalised mutual information of the
        clusters against the labels, and the silhouette of the labels in the representation (cosine distance; on
        a random `silhouette_sample_size` cells when there are more, as its cost grows with the square of the cells).
    """
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    if representation not in adata.obsm:
        raise KeyError(f"adata.obsm has no {representation!r} (it has {sorted(adata.obsm)}): embed the cells first.")
    if label_key not in adata.obs:
        raise KeyError(f"adata.obs has no column {label_key!r}: choose one of {sorted(adata.obs.columns)}.")
    features = np.asarray(adata.obsm[representation])
    if not np.isfinite(features).all():
        raise ValueError(f"adata.obsm[{representation!r}] holds NaN or infinite values.")
    cluster_key = cluster_key or f"leiden_{representation}"
    neighbors_key = f"neighbors_{representation}"
    # scikit-learn's exact neighbours: deterministic, and free of pynndescent's large-data issues.
    sc.pp.neighbors(
        adata,
        n_neighbors=n_neighbors,
        use_rep=representation,
        transformer="sklearn",
        key_added=neighbors_key,
        random_state=seed,
    )
    sc.tl.leiden(
        adata,
        resolution=resolution,
        key_added=cluster_key,
        neighbors_key=neighbors_key,
        flavor="igraph",
        n_iterations=2,
        random_state=seed,
    )
    labels, clusters = adata.obs[label_key].astype(str).to_numpy(), adata.obs[cluster_key].to_numpy()
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "silhouette": float(
            silhouette_score(
                features,
                labels,
                metric="cosine",
                random_state=seed,
                sample_size=silhouette_sample_size
                if silhouette_sample_size and len(labels) > silhouette_sample_size
                else None,
            )
        ),
        "num_clusters": len(np.unique(clusters)),
    }
