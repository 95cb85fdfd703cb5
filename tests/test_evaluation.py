"""`scpalm evaluate`: scib-metrics' scores of real embeddings respond to the labels and to the batches."""

import anndata
import numpy as np
import pytest

from .conftest import data_file

pytest.importorskip("scib_metrics")


@pytest.fixture(scope="module")
def three_chemistries():
    """600 PBMCs from three 10x chemistries (obs["tech"]), with the PCA of their log-normalised values."""
    import scanpy as sc

    adata = anndata.read_h5ad(data_file("scrna/pbmc_3tech_2000.h5ad"))
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 600, replace=False))].copy()
    values = adata.copy()
    sc.pp.normalize_total(values, target_sum=1e4)
    sc.pp.log1p(values)
    adata.obsm["X_pca"] = sc.pp.pca(values.X, n_comps=30, random_state=0)
    return adata


@pytest.mark.slow
def test_bio_scores_follow_the_labels_and_batch_scores_the_batches(three_chemistries, tmp_path):
    from modeling_scpalm.cli import main
    from modeling_scpalm.evaluation import evaluate_embeddings

    path = tmp_path / "cells.h5ad"
    three_chemistries.write_h5ad(path)
    main(
        [
            "evaluate",
            "--input",
            str(path),
            "--label_key",
            "cell_type",
            "--batch_key",
            "tech",
            "--obsm",
            "X_pca",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    assert {"scib_results.csv", "scib_results.md", "scib_results.svg"} <= {
        p.name for p in (tmp_path / "eval").iterdir()
    }
    import pandas as pd

    table = pd.read_csv(tmp_path / "eval" / "scib_results.csv", index_col=0)
    row = table.loc["X_pca"]
    assert row["Total"] == pytest.approx(0.6 * row["Bio conservation"] + 0.4 * row["Batch correction"])
    assert 0 < row["Leiden-1.0 ARI"] <= 1 and 0 < row["KMeans NMI"] <= 1

    rng = np.random.default_rng(1)
    shuffled_labels = three_chemistries.copy()
    shuffled_labels.obs["cell_type"] = rng.permutation(shuffled_labels.obs["cell_type"].to_numpy())
    scores = evaluate_embeddings(shuffled_labels, "cell_type", ["X_pca"], batch_key="tech").loc["X_pca"]
    assert scores["Bio conservation"] < row["Bio conservation"] - 0.1
    assert scores["Leiden-1.0 ARI"] < 0.05 and scores["KMeans NMI"] < 0.1

    shuffled_batches = three_chemistries.copy()
    shuffled_batches.obs["tech"] = rng.permutation(shuffled_batches.obs["tech"].to_numpy())
    scores = evaluate_embeddings(shuffled_batches, "cell_type", ["X_pca"], batch_key="tech").loc["X_pca"]
    assert scores["iLISI"] > row["iLISI"] + 0.1  # batches drawn at random are mixed everywhere
    for metric in ("KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", "Leiden-1.0 ARI"):
        assert scores[metric] == pytest.approx(row[metric], abs=1e-6), metric


def test_without_a_batch_key_only_bio_metrics_are_computed(three_chemistries):
    from modeling_scpalm.evaluation import evaluate_embeddings

    cells = three_chemistries[:200].copy()
    table = evaluate_embeddings(cells, "cell_type", ["X_pca"])
    assert "Bio conservation" in table and "Batch correction" not in table and "Total" not in table


def test_the_metrics_neighbours_are_the_exact_nearest_cells_each_cell_first(three_chemistries):
    from modeling_scpalm.evaluation import _exact_neighbors

    embedding = np.asarray(three_chemistries.obsm["X_pca"], dtype=np.float32)
    found = _exact_neighbors(n_jobs=1)(embedding, 15)
    distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    np.testing.assert_array_equal(found.indices[:, 0], np.arange(len(embedding)))
    np.testing.assert_allclose(found.distances, np.sort(distances, axis=1)[:, :15], atol=1e-3)


def test_evaluate_names_what_the_file_lacks(three_chemistries, tmp_path, capsys):
    from modeling_scpalm.cli import main

    path = tmp_path / "cells.h5ad"
    three_chemistries[:50].copy().write_h5ad(path)
    cases = [
        (["--obsm", "X_scpalm"], "obsm has no 'X_scpalm'; it has: X_pca"),
        (["--label_key", "celltypes"], "obs has no label column 'celltypes'"),
        (["--batch_key", "chemistry"], "obs has no batch column 'chemistry'"),
    ]
    for arguments, message in cases:
        base = {"--label_key": "cell_type", "--obsm": "X_pca"}
        base.update(dict(zip(arguments[::2], arguments[1::2])))
        with pytest.raises(SystemExit) as stop:
            main(["evaluate", "--input", str(path), "--output_dir", str(tmp_path / "e"), *sum(base.items(), ())])
        assert stop.value.code == 2 and message in capsys.readouterr().err
