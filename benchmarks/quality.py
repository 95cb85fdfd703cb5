"""Where the cell embedding stands: scPaLM's h_C beside the representations a user already has, on every dataset.

    python benchmarks/quality.py --output_dir benchmarks/results/quality          # every dataset, two seeds
    python benchmarks/quality.py --output_dir /tmp/quality --quick                # what CI runs (minutes)

Each dataset's cells are represented by:

- **scPaLM h_C**: `scpalm pretrain --train_file <cells> --output_dir <run> --preset tiny` with no other flag (the
  package's defaults, training length included), then `scpalm embed`, as a user runs them; and the same model's
  other readouts (h_C before its fitted readout, `scpalm embed --representation raw_cell_embedding`; `encoder_mean`:
  the pathway encoder's output averaged over tokens; `pathway_mean`: the quantized tokens averaged), the ablations of
  the readout and of the cell token;
- **scPaLM h_C zero-shot** (pbmc3k): the same commands, pretrained on the other datasets with gene names (the
  mixology lines and pbmc_3tech) and embedding pbmc3k, which the model never saw;
- **PCA** of the log-normalised values (50 and 256 components; all genes, no scaling), and PCA at h_C's width (the
  tiny preset's 64) given h_C's readout (the model's `fit_whitening`: each principal direction of variance v scaled
  by v**-0.25): what the readout alone gives, without the model;
- **MLP autoencoder** (genes -> 256 -> 64 -> 256 -> genes, MSE on the log-normalised values of the 2,000 most
  variable genes), trained for the wall-clock time scPaLM's pretraining took on the same machine;
- **scVI** (scvi-tools with its defaults, on the 2,000 most variable genes' counts; the `peers` extra).

Every representation is scored the same way: 5-fold 5-nearest-neighbour cell-type accuracy on the representation as
it is, Leiden at resolution 1.0 on its 15-neighbour graph (ARI and NMI against the labels, averaged over three Leiden
seeds), and the silhouette of the labels. Each trained method runs with `--seeds` seeds, and every row, PCA's too,
is scored under each seed's folds and Leiden seeds; the table gives the mean and the range. Each cell's kNN verdict
is kept, so that scPaLM's kNN accuracy is also compared with PCA-50's cell by cell under the same folds: the mean
difference over the seeds, with a 95% interval from resampling the cells. Writes `quality.md` and
`quality.json` under `--output_dir`; rows already in that `quality.json` are kept (a rerun resumes; delete a
method's rows there to run it again).
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import peers
from _common import DATA_DIR, command_line, embed_cells, environment, markdown_table, pretrain_tiny
from downstream import DATASETS, zero_shot_datasets

SCPALM_READOUTS = ["cell_embedding", "raw_cell_embedding", "encoder_mean", "pathway_mean"]
READOUT_ROWS = {
    "cell_embedding": "scPaLM h_C",
    "raw_cell_embedding": "scPaLM h_C before its readout",
    "encoder_mean": "scPaLM encoder_mean",
    "pathway_mean": "scPaLM pathway_mean",
}
LEIDEN_SEEDS = 3
ZERO_SHOT = "scPaLM h_C zero-shot"
ZERO_SHOT_DATASETS = ["pbmc3k"]  # whose zero-shot target, unseen, is ZERO_SHOT_TARGET
ZERO_SHOT_TARGET = {"knn": 0.85, "ari": 0.5}
PCA_WITH_READOUT = "PCA at h_C's width, h_C's readout"
PAIRED_KNN_ROWS = ["scPaLM h_C", "scPaLM h_C before its readout"]  # compared with PCA-50 cell by cell
BOOTSTRAP_SAMPLES = 2000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=str(DATA_DIR), help="default: $SCPALM_DATA_DIR or ../shared/data")
    parser.add_argument("--datasets", nargs="+", help="a subset of: " + ", ".join(d.name for d in DATASETS))
    parser.add_argument("--seeds", type=int, default=2, help="training seeds of every trained method")
    parser.add_argument("--scvi_epochs", type=int, help="default: scvi-tools' own (up to 400, by data size)")
    parser.add_argument("--quick", action="store_true", help="200 of pbmc3k's cells, one seed, short runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.scvi_epochs = ["pbmc3k"], 1, 2
    if not (Path(args.data_dir) / "scrna").is_dir():
        parser.error(f"{args.data_dir} holds no scrna/ folder: pass --data_dir or set SCPALM_DATA_DIR")
    return args


def main(argv=None):
    import anndata

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_file = output_dir / "quality.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"rows": []}
    done = {(row["dataset"], row["method"], row["seed"]) for row in results["rows"]}
    by_name = {d.name: d for d in DATASETS}
    unknown = sorted(set(args.datasets or []) - set(by_name))
    if unknown:
        raise SystemExit(f"Unknown datasets {unknown}: choose from {sorted(by_name)}")
    datasets = [by_name[name] for name in args.datasets] if args.datasets else DATASETS
    for dataset in datasets:
        adata = anndata.read_h5ad(cells_file(dataset, Path(args.data_dir), output_dir / "data", args.quick))
        for seed in range(args.seeds):
            if all((dataset.name, method, seed) in done for method in methods(dataset.name, seed)):
                continue
            rows = score_dataset(dataset, adata, output_dir, seed, args, done)
            rerun = {(row["dataset"], row["method"], row["seed"]) for row in rows}
            results["rows"] = [
                row for row in results["rows"] if (row["dataset"], row["method"], row["seed"]) not in rerun
            ]
            results["rows"] += rows
            results_file.write_text(json.dumps(results, indent=1) + "\n")  # after every dataset: a rerun resumes
    results["command"] = command_line("quality.py", argv)
    results["environment"] = environment()
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    (output_dir / "quality.md").write_text(report(results, [d.name for d in datasets]))
    print(f"Report: {output_dir / 'quality.md'}")
    return results


def cells_file(dataset, data_dir: Path, folder: Path, quick: bool) -> Path:
    """The dataset's raw counts as one .h5ad (plates joined on their shared genes), written once under `folder`."""
    path = folder / f"{dataset.name}.h5ad"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        adata = dataset.read(data_dir)
        if quick:
            adata = adata[
                np.sort(np.random.default_rng(0).choice(adata.n_obs, min(200, adata.n_obs), replace=False))
            ].copy()
        adata.obs = adata.obs[["cell_type"]].astype(str).astype("category")
        adata.write_h5ad(path)
    return path


def methods(name: str, seed: int) -> list[str]:
    """The rows of one dataset and training seed."""
    scpalm = [READOUT_ROWS[readout] for readout in SCPALM_READOUTS]
    zero_shot = [ZERO_SHOT] if name in ZERO_SHOT_DATASETS else []
    # Each seed draws its own folds and Leiden seeds (and PCA's solver start): scored under every seed, PCA's mean is
    # over the same evaluation draws as the trained methods'.
    pca = ["PCA (50)", "PCA (256)", PCA_WITH_READOUT]
    return scpalm + zero_shot + pca + ["MLP autoencoder (same time)", "scVI"]


def score_dataset(dataset, adata, output_dir: Path, seed: int, args, done: set) -> list[dict]:
    """The rows of `methods(name, seed)` not in `done`; the scPaLM rows and the autoencoder, which gets scPaLM's
    pretraining time, are run together."""
    name = dataset.name
    data_folder = output_dir / "data"
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    rows = []

    def add(method, representation, **extra):
        row = {"dataset": name, "method": method, "seed": seed, **score(representation, labels, seed), **extra}
        rows.append(row)
        print(row, flush=True)

    def wanted(method):
        return (name, method, seed) not in done

    log_normalized = peers.log_normalize(adata.X)
    if wanted("scPaLM h_C") or wanted("MLP autoencoder (same time)"):
        run_dir = output_dir / "models" / f"{name}_seed{seed}"
        seconds, embedded = pretrain_and_embed(adata, [data_folder / f"{name}.h5ad"], run_dir, seed, args.quick)
        for readout in SCPALM_READOUTS:
            add(READOUT_ROWS[readout], embedded[readout], train_seconds=round(seconds, 1))
        if wanted("MLP autoencoder (same time)"):
            add(
                "MLP autoencoder (same time)",
                peers.mlp_autoencoder(log_normalized, seconds, seed, max_steps=20 if args.quick else None),
                train_seconds=round(seconds, 1),
            )
    if ZERO_SHOT in methods(name, seed) and wanted(ZERO_SHOT):
        others = zero_shot_datasets(dataset.group)
        others = [cells_file(other, Path(args.data_dir), data_folder, args.quick) for other in others]
        run_dir = output_dir / "models" / f"without_{name}_seed{seed}"
        seconds, embedded = pretrain_and_embed(adata, others, run_dir, seed, args.quick, ["cell_embedding"])
        add(ZERO_SHOT, embedded["cell_embedding"], train_seconds=round(seconds, 1))
    for components in (50, 256):
        if f"PCA ({components})" in methods(name, seed) and wanted(f"PCA ({components})"):
            add(f"PCA ({components})", peers.pca(log_normalized, components, seed))
    if wanted(PCA_WITH_READOUT):
        add(PCA_WITH_READOUT, pca_with_readout(log_normalized, seed))
    if wanted("scVI"):
        try:
            add("scVI", peers.scvi_latent(adata, args.scvi_epochs, seed))
        except peers.PeerUnavailable as error:
            print(f"scVI not run: {error}")
    return rows


def pca_with_readout(log_normalized, seed: int) -> np.ndarray:
    """PCA at the tiny preset's width, given h_C's readout: the model's own `fit_whitening`, fitted on the components
    and applied to them, at the default power."""
    import torch

    from modeling_scpalm import ScPaLMConfig
    from modeling_scpalm.modeling_scpalm import ScPaLMCellEncoder

    config = ScPaLMConfig.from_preset("tiny", cell_token_from_expression=False)  # no per-gene read: the readout alone
    components = torch.tensor(np.ascontiguousarray(peers.pca(log_normalized, config.hidden_size, seed), np.float32))
    readout = ScPaLMCellEncoder(config)
    readout.fit_whitening(components)
    return readout.whiten(components).numpy()


def pretrain_and_embed(
    adata, train_files: list[Path], run_dir: Path, seed: int, quick: bool, readouts=SCPALM_READOUTS
) -> tuple[float, dict]:
    """The two commands a user runs, with the package's defaults (`--seed` aside): pretraining on `train_files`,
    then embedding `adata`; returns pretraining's seconds and each readout's embedding."""
    seconds = pretrain_tiny(run_dir, train_files, seed, quick)
    return seconds, {readout: embed_cells(run_dir / "model", adata, readout) for readout in readouts}


def score(representation: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """kNN accuracy (the mean over folds), Leiden-1.0 ARI/NMI (mean over `LEIDEN_SEEDS` seeds) and label silhouette
    of one representation; `knn_correct`, each of its `cells` cells' kNN verdicts as hex of their packed bits, for
    paired comparisons."""
    import anndata
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from modeling_scpalm.tasks.annotation import cluster_and_score

    representation = np.asarray(representation, dtype=np.float32)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(representation, labels))
    correct = cross_val_predict(KNeighborsClassifier(5), representation, labels, cv=folds) == labels
    knn = np.mean([correct[test].mean() for _, test in folds])
    adata = anndata.AnnData(obs={"cell_type": labels}, obsm={"X_rep": representation})
    leiden = [cluster_and_score(adata, "X_rep", "cell_type", seed=seed * LEIDEN_SEEDS + s) for s in range(LEIDEN_SEEDS)]
    return {
        "knn": float(knn),
        **{key: float(np.mean([run[key] for run in leiden])) for key in ("ari", "nmi", "silhouette")},
        "knn_correct": np.packbits(correct).tobytes().hex(),
        "cells": len(labels),
    }


def report(results: dict, datasets: list[str]) -> str:
    rows = results["rows"]
    present = {row["method"] for row in rows}
    methods_in_order = list(dict.fromkeys(m for name in datasets for m in methods(name, 0) if m in present))
    legend = (
        "Mean over training seeds (range in brackets where more than one). kNN: 5-fold 5-NN cell-type accuracy; "
        "ARI, NMI: Leiden at resolution 1.0 (mean of three Leiden seeds); silhouette of the labels (cosine)."
    )
    lines = [
        "# Cell-embedding quality",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['environment']}",
        "",
        legend,
        "",
    ]
    for metric in ("knn", "ari", "nmi", "silhouette"):
        table = []
        for method in methods_in_order:
            cells = [method]
            for name in datasets:
                values = [row[metric] for row in rows if row["method"] == method and row["dataset"] == name]
                cells.append(_summary(values))
            table.append(cells)
        lines += [f"## {metric}", "", markdown_table(["method", *datasets], table), ""]
    wins = _wins(rows, datasets)
    lines += ["## scPaLM h_C against the targets, and against scVI", "", wins, ""]
    lines += [
        "## 5-NN accuracy against PCA-50's, cell by cell",
        "",
        (
            "Each cell's verdict under the same folds, the difference from PCA-50's averaged over the seeds; in "
            f"brackets the 95% interval from resampling the cells ({BOOTSTRAP_SAMPLES:,} draws). Below PCA-50's "
            "beyond resampling where the interval lies under 0."
        ),
        "",
        _paired_knn(rows, datasets),
        "",
    ]
    return "\n".join(lines)


def _paired_knn(rows: list[dict], datasets: list[str]) -> str:
    """Per dataset, each of `PAIRED_KNN_ROWS` against PCA-50 over the seeds both were scored under: the mean over
    cells of (ours right) - (PCA-50 right), each cell's difference averaged over those seeds, and its bootstrap
    interval over cells."""

    def verdicts(method, name):
        return {
            row["seed"]: np.unpackbits(np.frombuffer(bytes.fromhex(row["knn_correct"]), np.uint8))[: row["cells"]]
            for row in rows
            if row["method"] == method and row["dataset"] == name and "knn_correct" in row
        }

    generator = np.random.default_rng(0)
    table = []
    for method in PAIRED_KNN_ROWS:
        cells, compared, below = [method], 0, []
        for name in datasets:
            ours, pca = verdicts(method, name), verdicts("PCA (50)", name)
            seeds = sorted(set(ours) & set(pca))
            if not seeds:
                cells.append("-")
                continue
            compared += 1
            difference = np.mean([ours[seed].astype(float) - pca[seed] for seed in seeds], axis=0)
            # A cell's difference takes one of a few values, so resampling the cells is drawing how many of each.
            values, counts = np.unique(difference, return_counts=True)
            draws = generator.multinomial(len(difference), counts / len(difference), BOOTSTRAP_SAMPLES)
            low, high = np.percentile(draws @ values / len(difference), [2.5, 97.5])
            cells.append(f"{difference.mean():+.3f} ({low:+.3f} to {high:+.3f})")
            if high < 0:
                below.append(name)
        cells.append(f"{len(below)} of {compared}" if compared else "-")
        table.append(cells)
    return markdown_table(["method", *datasets, "below beyond resampling"], table)


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _wins(rows: list[dict], datasets: list[str]) -> str:
    """On how many datasets h_C's mean meets each target: at least PCA-50's kNN, ARI and NMI, and a kNN accuracy at
    most 0.03 below the autoencoder trained for the same time; and, beside the targets, how often it is at least
    scVI's, the other representation a user already has (where scVI was run)."""

    def mean(method, name, metric):
        values = [row[metric] for row in rows if row["method"] == method and row["dataset"] == name]
        return np.mean(values) if values else np.nan

    table = []
    for reference, label in (("PCA (50)", "PCA-50"), ("scVI", "scVI's")):
        compared = [name for name in datasets if not np.isnan(mean(reference, name, "knn"))]
        for metric in ("knn", "ari", "nmi") if compared else ():
            at_least = [name for name in compared if mean("scPaLM h_C", name, metric) >= mean(reference, name, metric)]
            table.append([f"{metric} >= {label}", f"{len(at_least)} of {len(compared)}", ", ".join(at_least) or "-"])
    autoencoder = "MLP autoencoder (same time)"
    close = [name for name in datasets if mean("scPaLM h_C", name, "knn") >= mean(autoencoder, name, "knn") - 0.03]
    table.append(["knn >= autoencoder's - 0.03", f"{len(close)} of {len(datasets)}", ", ".join(close) or "-"])
    for name in ZERO_SHOT_DATASETS:
        if name in datasets:
            scores = {metric: mean(ZERO_SHOT, name, metric) for metric in ZERO_SHOT_TARGET}
            met = all(scores[metric] >= floor for metric, floor in ZERO_SHOT_TARGET.items())
            target = " and ".join(f"{metric} >= {floor}" for metric, floor in ZERO_SHOT_TARGET.items())
            measured = ", ".join(f"{metric} {value:.3f}" for metric, value in scores.items())
            table.append([f"zero-shot {target}", "met" if met else "not met", f"{name} ({measured})"])
    return markdown_table(["target", "met on", "datasets"], table)


if __name__ == "__main__":
    main()
