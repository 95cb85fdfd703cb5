"""scPaLM in about a minute on a laptop: pretrain a tiny model, embed the cells, cluster them, compare with PCA.

    python examples/quickstart.py                       # writes outputs/quickstart/
    python examples/quickstart.py --max_steps 60        # a first look in under half a minute
    python examples/quickstart.py --max_steps 600       # longer pretraining

Data: scanpy's `pbmc68k_reduced` (700 PBMCs, 765 genes, log-normalised; ships with scanpy, no download), labelled
by `bulk_labels`. The script pretrains both stages of the `tiny` preset on it (`scpalm pretrain` does the same from
the shell), writes the cell embeddings h_C to `obsm["X_scpalm"]`, clusters them with Leiden at resolution 1.0 and
prints ARI/NMI against the labels beside the same protocol on 50 principal components, then saves a UMAP of both.
"""

import argparse
import shutil
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--max_steps", type=int, default=300, help="optimizer steps of each pretraining stage")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not args.overwrite:
            parser.error(f"{output_dir} exists: pass --overwrite to replace it, or choose another --output_dir")
        shutil.rmtree(output_dir)
    return args


def main(argv=None) -> dict[str, dict[str, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    from transformers import AutoModel

    from modeling_scpalm import ScPaLMProcessor, embed_anndata
    from modeling_scpalm.pretraining import main as pretrain
    from modeling_scpalm.tasks.annotation import cluster_and_score

    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # The log-normalised values of all 765 genes (X itself holds them scaled, which is not scPaLM's input).
    pbmc = sc.datasets.pbmc68k_reduced()
    adata = pbmc.raw.to_adata()
    adata.obs = pbmc.obs[["bulk_labels"]].copy()
    cells_file = output_dir / "pbmc68k_reduced.h5ad"
    adata.write_h5ad(cells_file)

    model_dir = pretrain(
        [
            "--train_file",
            str(cells_file),
            "--is_normalized",
            "--output_dir",
            str(output_dir / "run"),
            "--preset",
            "tiny",
            "--max_steps",
            str(args.max_steps),
            "--per_device_batch_size",
            str(args.batch_size),
            "--learning_rate",
            "2e-3",
            "--eval_steps",
            str(args.max_steps),
            "--checkpointing_steps",
            str(args.max_steps),
            "--seed",
            str(args.seed),
        ]
    )
    pretrained_at = time.perf_counter()

    model = AutoModel.from_pretrained(model_dir)
    processor = ScPaLMProcessor.from_pretrained(model_dir)
    adata.obsm["X_scpalm"] = embed_anndata(model, processor, adata, is_normalized=True, progress=False)
    sc.pp.pca(adata, n_comps=50, random_state=args.seed)

    scores = {
        name: cluster_and_score(adata, representation, "bulk_labels", resolution=1.0, seed=args.seed)
        for name, representation in (("scPaLM (tiny)", "X_scpalm"), ("PCA (50)", "X_pca"))
    }
    print(
        f"\npbmc68k_reduced ({adata.n_obs} cells, {adata.obs['bulk_labels'].nunique()} bulk_labels), "
        "Leiden at resolution 1.0:\n"
    )
    print("| representation | ARI | NMI | silhouette | clusters |\n|---|---|---|---|---|")
    for name, score in scores.items():
        print(
            f"| {name} | {score['ari']:.3f} | {score['nmi']:.3f} | {score['silhouette']:.3f} "
            f"| {score['num_clusters']} |"
        )

    figure_path = output_dir / "umap.png"
    save_umaps(adata, ["X_scpalm", "X_pca"], figure_path, args.seed)
    adata.write_h5ad(output_dir / "pbmc68k_reduced.embedded.h5ad")
    finished = time.perf_counter()
    print(
        f"\nPretraining {pretrained_at - started:.0f} s, embedding, clustering and figures "
        f"{finished - pretrained_at:.0f} s; total {finished - started:.0f} s."
    )
    print(f"Model: {model_dir}\nUMAP: {figure_path}\nEmbedded cells: {output_dir / 'pbmc68k_reduced.embedded.h5ad'}")
    return scores


def save_umaps(adata, representations, path, seed):
    """One row per representation: UMAP coloured by label and by its Leiden clusters."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    figure, axes = plt.subplots(len(representations), 2, figsize=(11, 4.5 * len(representations)))
    for row, representation in zip(axes, representations):
        view = adata.copy()
        sc.tl.umap(view, neighbors_key=f"neighbors_{representation}", random_state=seed)
        for axis, color in zip(row, ["bulk_labels", f"leiden_{representation}"]):
            sc.pl.umap(
                view,
                color=color,
                ax=axis,
                show=False,
                title=f"{representation}: {color}",
                legend_loc="on data" if color.startswith("leiden") else "right margin",
                legend_fontsize=7,
            )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
