"""The paper's downstream experiments on the shared datasets, scPaLM beside its peers, written up as a report.

    python benchmarks/downstream.py --output_dir reports/downstream          # the full report (about 2 h, 2 cores)
    python benchmarks/downstream.py --output_dir /tmp/downstream --quick    # a seconds-to-minutes form (CI runs it)

Writes `report.md`, `results.json` and `figures/*.png` under `--output_dir`, and the models it trained under
`models/` (`--resume` reuses those of an interrupted run). Every row of a table is measured on the same cells with
the same protocol:

- **Cell-type annotation** (section 4.2): Leiden at resolution 1.0 on a 15-neighbour graph of each representation,
  ARI/NMI against the labels, silhouette of the labels. scPaLM *zero-shot*: pretrained on the other datasets only
  (leave one group out; the two 3-cell-line mixology protocols are one group); *adapted*: that model trained further,
  without labels, on the dataset itself (`scpalm pretrain --init_from`). Datasets without gene names cannot meet a
  pretrained vocabulary: scPaLM is trained on them alone. Peers: PCA (256 and 50 components of the log-normalised
  values) and scVI.
- **Ablations** (Tables 2, 3, 5 and 6), on pbmc3k with models trained on it: h_C against the pathway tokens averaged
  or concatenated, h_C without the contrastive loss, the pathway encoder and the quantizer turned off, the shared
  first layer; and the peak memory of three embeddings at the same batch (under FakeTensorMode).
- **Imputation** (section 4.4, Table 1), on pbmc3k: 10% of each cell's non-zero values hidden (weighted by exp(-x)),
  predicted by scPaLM zero-shot, scPaLM adapted on the masked cells, MAGIC, kNN smoothing and each gene's mean.
- **Pathway identification** (section 4.5, Appendix D), on pbmc3k: each code's 10 top genes tested against Reactome.
"""

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Progress bars of dozens of training runs would bury the results (tqdm reads this when first imported).
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import peers
from _common import DATA_DIR, PeakTensorMemory, command_line, environment, fake_tensors, markdown_table, mib

REACTOME = "gene_sets/c2.cp.reactome.v2023.1.Hs.symbols.gmt.gz"


@dataclass
class Dataset:
    name: str
    files: list[str]  # under the data folder; several are joined on their shared genes
    group: str | None  # datasets of one group leave the zero-shot model together; None: gene names unknown
    description: str

    def read(self, data_dir: Path):
        """The dataset's cells as one AnnData: its files joined on their shared genes."""
        import anndata

        return join_cells([anndata.read_h5ad(Path(data_dir) / file) for file in self.files])


def join_cells(parts: list):
    """AnnDatas joined cell-wise on the genes they share, with unique cell names."""
    import anndata

    adata = parts[0] if len(parts) == 1 else anndata.concat(parts, join="inner", merge="same")
    adata.obs_names_make_unique()
    return adata


DATASETS = [
    Dataset("pbmc3k", ["scrna/pbmc3k_2638.h5ad"], "pbmc3k", "10x PBMCs, 9 types"),
    Dataset("pbmc_3tech", ["scrna/pbmc_3tech_2000.h5ad"], "pbmc_3tech", "PBMCs from three 10x chemistries, 3 types"),
    Dataset("mixology_celseq2", ["scrna/mixology_sc_celseq2.h5ad"], "mixology_3cl", "3 cell lines, CEL-seq2"),
    Dataset("mixology_dropseq", ["scrna/mixology_sc_dropseq.h5ad"], "mixology_3cl", "the same 3 lines, Drop-seq"),
    Dataset(
        "mixology_5cl",
        [f"scrna/mixology_sc_celseq2_5cl_p{plate}.h5ad" for plate in (1, 2, 3)],
        "mixology_5cl",
        "5 cell lines, CEL-seq2, three plates",
    ),
    Dataset("pbmc_4271_anon", ["scrna/pbmc_4271_top2000_anon.h5ad"], None, "PBMCs, 8 types, 2,000 unnamed genes"),
    Dataset(
        "worm_neuron_anon", ["scrna/worm_neuron_4186_anon.h5ad"], None, "C. elegans neurons, 10 types, unnamed genes"
    ),
]
QUICK_DATASETS = ["pbmc3k", "mixology_dropseq", "pbmc_4271_anon"]


def zero_shot_datasets(group: str) -> list[Dataset]:
    """The datasets a zero-shot model for `group` pretrains on: those with gene names outside the group."""
    return [dataset for dataset in DATASETS if dataset.group is not None and dataset.group != group]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where the report, figures and models go")
    parser.add_argument(
        "--data_dir", default=str(DATA_DIR), help="the shared data folder (default: $SCPALM_DATA_DIR or ../shared/data)"
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max_steps", type=int, default=300, help="pretraining steps per stage (zero-shot, ablations)")
    parser.add_argument("--adapt_steps", type=int, default=150, help="adaptation steps per stage, at most ...")
    parser.add_argument(
        "--adapt_epochs", type=float, default=10, help="... and at most this many passes over the cells"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--scvi_epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse the models an earlier run left in output_dir")
    parser.add_argument("--quick", action="store_true", help="3 datasets of 120 cells, 2 steps: checks it all runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.adapt_steps, args.batch_size, args.scvi_epochs = 2, 2, 16, 1
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.resume:
        parser.error(f"{output_dir} exists: choose a new --output_dir, or --resume to reuse its models")
    if not (Path(args.data_dir) / "scrna").is_dir():
        parser.error(f"{args.data_dir} holds no scrna/ folder: pass --data_dir or set SCPALM_DATA_DIR")
    return args


def main(argv=None):
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    datasets.disable_progress_bars()
    args = parse_args(argv)
    bench = Benchmark(args)
    started = time.perf_counter()
    bench.prepare_data()
    bench.pretrain_models()
    bench.annotation()
    bench.ablations()
    bench.imputation()
    bench.pathways()
    bench.embedding_memory()
    bench.results["minutes"] = round((time.perf_counter() - started) / 60, 1)
    bench.write_report(argv)
    print(f"Report: {bench.output_dir / 'report.md'}")
    return bench.results


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.data_dir = Path(args.data_dir)
        self.figures = self.output_dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.datasets = [d for d in DATASETS if not args.quick or d.name in QUICK_DATASETS]
        self.cells = {}  # name -> AnnData of raw counts
        self.results = {
            "annotation": [],
            "ablations": {},
            "imputation": [],
            "pathways": {},
            "memory": [],
            "training_minutes": {},
            "reused_models": [],
        }

    # -- data and models -------------------------------------------------------------------------------------

    def prepare_data(self):
        folder = self.output_dir / "data"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(self.args.seed)
        for dataset in self.datasets:
            adata = dataset.read(self.data_dir)
            if self.args.quick:
                adata = adata[np.sort(rng.choice(adata.n_obs, min(120, adata.n_obs), replace=False))].copy()
            adata.obs = adata.obs[["cell_type"]].astype(str).astype("category")
            adata.write_h5ad(folder / f"{dataset.name}.h5ad")
            self.cells[dataset.name] = adata

    def data_file(self, name: str) -> str:
        return str(self.output_dir / "data" / f"{name}.h5ad")

    def pretrain(self, run_name: str, train_files=(), steps=None, **options) -> Path:
        """`scpalm pretrain` into models/<run_name> (kept from an earlier run with --resume); returns the folder."""
        from modeling_scpalm.data_scpalm import partial_path
        from modeling_scpalm.pretraining import main as pretrain

        run_dir = self.output_dir / "models" / run_name
        minutes_file = run_dir / "training_minutes.txt"
        if (run_dir / "model" / "config.json").is_file():
            if run_name not in self.results["training_minutes"]:  # trained by an earlier invocation
                self.results["reused_models"].append(run_name)
                if minutes_file.is_file():
                    self.results["training_minutes"][run_name] = float(minutes_file.read_text())
            return run_dir
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run's leftovers
        steps = steps or self.args.max_steps
        command = [
            "--output_dir",
            str(run_dir),
            "--preset",
            self.args.preset,
            "--max_steps",
            str(steps),
            "--per_device_batch_size",
            str(self.args.batch_size),
            "--learning_rate",
            str(self.args.learning_rate),
            "--eval_steps",
            str(steps),
            "--checkpointing_steps",
            str(steps),
            "--logging_steps",
            str(max(1, steps // 20)),
            "--seed",
            str(self.args.seed),
        ]
        for file in train_files:
            command += ["--train_file", file]
        for option, value in options.items():
            command += [f"--{option}"] if value is True else [f"--{option}", str(value)]
        started = time.perf_counter()
        print(f"\n== pretraining {run_name} ==", flush=True)
        pretrain(command)
        self.results["training_minutes"][run_name] = round((time.perf_counter() - started) / 60, 2)
        staging = partial_path(minutes_file)  # renamed into place: a resumed run never reads half a number
        staging.write_text(f"{self.results['training_minutes'][run_name]}\n")
        os.replace(staging, minutes_file)
        return run_dir

    def pretrain_models(self):
        named = [d for d in self.datasets if d.group]
        for group in dict.fromkeys(d.group for d in named):
            others = [self.data_file(d.name) for d in named if d.group != group]
            if others:
                self.pretrain(f"without_{group}", others)
        for dataset in self.datasets:
            if dataset.group:
                self.pretrain(
                    f"adapted_{dataset.name}",
                    [self.data_file(dataset.name)],
                    self.adapt_steps(dataset.name),
                    init_from=self.output_dir / "models" / f"without_{dataset.group}",
                )
            else:
                self.pretrain(f"trained_on_{dataset.name}", [self.data_file(dataset.name)])

    def adapt_steps(self, name: str) -> int:
        """Adaptation steps: `--adapt_steps`, fewer on a dataset so small that they would be many passes over it."""
        steps_per_epoch = max(1, self.cells[name].n_obs // self.args.batch_size)
        return max(1, min(self.args.adapt_steps, round(self.args.adapt_epochs * steps_per_epoch)))

    def model(self, run_dir: Path, head: str = "model"):
        from modeling_scpalm import ScPaLMForPathwayReconstruction, ScPaLMModel, ScPaLMProcessor

        if head == "stage_1":
            return ScPaLMForPathwayReconstruction.from_pretrained(run_dir / "stage_1"), ScPaLMProcessor.from_pretrained(
                run_dir / "stage_1"
            )
        return ScPaLMModel.from_pretrained(run_dir / "model"), ScPaLMProcessor.from_pretrained(run_dir / "model")

    def embed(self, run_dir: Path, adata, representation: str = "cell_embedding") -> np.ndarray:
        from modeling_scpalm import embed_anndata

        model, processor = self.model(run_dir)
        return embed_anndata(model, processor, adata, progress=False, representation=representation)

    # -- section 4.2 ------------------------------------------------------------------------------------------

    def annotation(self):
        from modeling_scpalm.tasks.annotation import cluster_and_score

        for dataset in self.datasets:
            adata = self.cells[dataset.name].copy()
            keys = {}
            for method, compute in self.representations(dataset, adata).items():
                row = {"dataset": dataset.name, "method": method}
                started = time.perf_counter()
                try:
                    key = keys[method] = f"X_{len(keys)}"
                    adata.obsm[key] = compute()
                    row["embed_seconds"] = round(time.perf_counter() - started, 1)
                    row.update(cluster_and_score(adata, key, "cell_type", seed=self.args.seed))
                except peers.PeerUnavailable as error:
                    keys.pop(method)
                    row["not_run"] = str(error)
                self.results["annotation"].append(row)
                print(row, flush=True)
            save_umaps(adata, keys, self.figures / f"umap_{dataset.name}.png", dataset.name, self.args.seed)

    def representations(self, dataset: Dataset, adata) -> dict:
        """Each method's way to represent the cells (computed when called, so a missing peer fails alone)."""
        models = self.output_dir / "models"
        log_normalized = peers.log_normalize(adata.X)
        seed = self.args.seed
        if dataset.group:
            scpalm = {
                "scPaLM zero-shot": partial(self.embed, models / f"without_{dataset.group}", adata),
                "scPaLM adapted": partial(self.embed, models / f"adapted_{dataset.name}", adata),
            }
        else:
            scpalm = {"scPaLM (trained on it)": partial(self.embed, models / f"trained_on_{dataset.name}", adata)}
        return {
            **scpalm,
            "PCA (256)": partial(peers.pca, log_normalized, 256, seed),
            "PCA (50)": partial(peers.pca, log_normalized, 50, seed),
            "scVI": partial(peers.scvi_latent, adata, self.args.scvi_epochs, seed),
        }

    # -- section 5: Tables 2/5, 3 and 6 ------------------------------------------------------------------------

    def ablations(self):
        from modeling_scpalm.tasks.annotation import cluster_and_score

        if "pbmc3k" not in self.cells:
            return
        adata, cells = self.cells["pbmc3k"].copy(), [self.data_file("pbmc3k")]
        full = self.pretrain("ablation_full", cells)
        variants = {
            "with_contrastive": self.pretrain(
                "ablation_with_contrastive",
                stage="2",
                stage_one_model=full / "stage_1",
                dataset_dir=full / "dataset",
                config_overrides="contrastive_loss_weight=1",
            ),
            "no_encoder": self.pretrain(
                "ablation_no_encoder", cells, config_overrides="pathway_encoder_num_hidden_layers=0"
            ),
            "no_quantizer": self.pretrain("ablation_no_quantizer", cells, config_overrides="use_quantizer=false"),
            "no_encoder_no_quantizer": self.pretrain(
                "ablation_no_encoder_no_quantizer",
                cells,
                config_overrides="pathway_encoder_num_hidden_layers=0,use_quantizer=false",
            ),
            "shared_first_layer": self.pretrain(
                "ablation_shared_first_layer", cells, config_overrides="share_value_projection=true"
            ),
        }
        representations = {
            "pathway tokens, mean": (full, "pathway_mean"),
            "pathway tokens, concatenated": (full, "pathway_concat"),
            "pathway encoder output, mean (before the quantizer)": (full, "encoder_mean"),
            "h_C, with the contrastive loss (weight 1)": (variants["with_contrastive"], "cell_embedding"),
            "h_C": (full, "cell_embedding"),
            **{
                f"h_C, {name}": (run_dir, "cell_embedding")
                for name, run_dir in variants.items()
                if name != "with_contrastive"
            },
        }
        scores = self.results["ablations"]
        for name, (run_dir, representation) in representations.items():
            key = f"X_ablation_{len(scores)}"
            adata.obsm[key] = self.embed(run_dir, adata, representation)
            scores[name] = {
                **cluster_and_score(adata, key, "cell_type", seed=self.args.seed),
                "dimensions": int(adata.obsm[key].shape[1]),
            }
            print(name, scores[name], flush=True)

    # -- section 4.4 ------------------------------------------------------------------------------------------

    def imputation(self):
        import anndata

        from modeling_scpalm.processing_scpalm import anndata_gene_ids
        from modeling_scpalm.tasks.imputation import (
            MaskedCells,
            imputation_scores,
            impute_with_model,
            mask_for_imputation,
            mean_imputation,
        )

        if "pbmc3k" not in self.cells:
            return
        adata = self.cells["pbmc3k"]
        masked = mask_for_imputation(peers.log_normalize(adata.X), fraction=0.1, seed=self.args.seed)
        zero_shot = self.output_dir / "models" / "without_pbmc3k"
        # scPaLM adapted on what the peers see: the masked cells, never the hidden values.
        masked_file = self.output_dir / "data" / "pbmc3k_masked.h5ad"
        anndata.AnnData(masked.cells, obs=adata.obs, var=adata.var).write_h5ad(masked_file)
        adapted = self.pretrain(
            "imputation_adapted",
            [str(masked_file)],
            self.adapt_steps("pbmc3k"),
            stage="1",
            init_from=zero_shot,
            is_normalized=True,
        )

        # The hidden values on genes the model's vocabulary holds are what every method is scored on.
        _, processor = self.model(zero_shot, "stage_1")
        vocabulary_index = processor.match_genes(adata.var_names, anndata_gene_ids(adata)).vocabulary_index
        scored = vocabulary_index[masked.columns] >= 0
        rows, columns, truth = masked.rows[scored], masked.columns[scored], masked.values[scored]
        vocabulary_cells, measured = processor.transform(
            masked.cells, adata.var_names, anndata_gene_ids(adata), is_normalized=True
        )
        in_vocabulary = MaskedCells(vocabulary_cells, rows, vocabulary_index[columns], truth)
        predictions = {
            "scPaLM zero-shot": lambda: impute_with_model(*self.model(zero_shot, "stage_1"), in_vocabulary, measured),
            "scPaLM adapted (on the masked cells)": lambda: impute_with_model(
                *self.model(adapted, "stage_1"), in_vocabulary, measured
            ),
            "MAGIC": lambda: peers.magic_imputation(masked.cells, rows, columns, self.args.seed),
            "kNN smoothing (15 neighbours)": lambda: peers.knn_imputation(
                masked.cells, rows, columns, seed=self.args.seed
            ),
            "gene mean": lambda: mean_imputation(masked)[scored],
        }
        for method, predict in predictions.items():
            row = {"method": method, "scored_values": int(scored.sum()), "hidden_values": len(masked.values)}
            started = time.perf_counter()
            try:
                row.update(imputation_scores(predict(), truth))
                row["seconds"] = round(time.perf_counter() - started, 1)
            except peers.PeerUnavailable as error:
                row["not_run"] = str(error)
            self.results["imputation"].append(row)
            print(row, flush=True)

    # -- section 4.5 ------------------------------------------------------------------------------------------

    def pathways(self):
        from modeling_scpalm.tasks.pathways import identify_pathways

        if "pbmc3k" not in self.cells:
            return
        models = self.output_dir / "models"
        for name, run_dir in (("zero-shot", models / "without_pbmc3k"), ("adapted", models / "adapted_pbmc3k")):
            model, processor = self.model(run_dir)
            codes = self.embed(run_dir, self.cells["pbmc3k"], "pathway_codes")
            table = identify_pathways(model, processor, self.cells["pbmc3k"], self.data_dir / REACTOME, num_genes=10)
            self.results["pathways"][name] = {
                "codes_used": len(np.unique(codes)),
                "tests_with_overlap": len(table),
                "significant": table[table.adjusted_p_value < 0.05].to_dict("records"),
                "best": table.head(10).to_dict("records"),
            }
            print(name, len(self.results["pathways"][name]["significant"]), "significant", flush=True)

    # -- Table 6 ----------------------------------------------------------------------------------------------

    def embedding_memory(self):
        """Peak tensor memory of a training step through the embedding and the pathway encoder, three embeddings."""
        from vocabulary import cells_over_vocabulary

        settings = [("tiny", 2_000, 8)] if self.args.quick else [("tiny", 13_714, 64), ("paper", 60_664, 128)]
        for preset, num_genes, batch_size in settings:
            batch = cells_over_vocabulary(self.cells["pbmc3k"], num_genes, batch_size)
            for variant in ("permutation-invariant", "shared first layer", "per-gene tokens"):
                peak = embedding_training_peak(preset, num_genes, batch, variant)
                self.results["memory"].append(
                    {
                        "preset": preset,
                        "genes": num_genes,
                        "batch": batch_size,
                        "embedding": variant,
                        "peak_mib": round(mib(peak), 1),
                    }
                )

    # -- report -----------------------------------------------------------------------------------------------

    def write_report(self, argv):
        (self.output_dir / "results.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        plot_annotation(self.results["annotation"], self.figures / "annotation.png")
        if self.results["imputation"]:
            plot_imputation(self.results["imputation"], self.figures / "imputation.png")
        (self.output_dir / "report.md").write_text(render_report(self, argv))


def embedding_training_peak(preset: str, num_genes: int, batch: dict, variant: str) -> int:
    """Forward and backward of the embedding then the pathway encoder, counted under FakeTensorMode (nothing allocated).

    The per-gene variant gives every vocabulary gene its own token (its Algorithm-1 vector; zeros as e_zero) and runs
    the encoder over all of them, as per-gene models (scFoundation, Geneformer) do; the others pool into N tokens.
    """
    from modeling_scpalm import ScPaLMConfig
    from modeling_scpalm.embedding_scpalm import ScPaLMEmbeddings
    from modeling_scpalm.modeling_scpalm import ScPaLMTransformer

    config = ScPaLMConfig.from_preset(
        preset, num_genes=num_genes, share_value_projection=variant == "shared first layer"
    )
    config._attn_implementation = "sdpa"
    with fake_tensors() as fake_mode:
        embeddings, encoder = (
            ScPaLMEmbeddings(config),
            ScPaLMTransformer(config, config.pathway_encoder_num_hidden_layers),
        )
        inputs = {key: fake_mode.from_tensor(value) for key, value in batch.items()}
        with PeakTensorMemory() as tracker:
            if variant == "per-gene tokens":
                tokens = embeddings.dense_gene_vectors(inputs["dense"])
            else:
                tokens = embeddings(
                    inputs["gene_ids"], inputs["gene_values"], inputs["attention_mask"], inputs["measured_gene_mask"]
                )
            encoder(tokens)[0].sum().backward()
    return tracker.peak


def save_umaps(adata, keys: dict[str, str], path: Path, title: str, seed: int):
    """One UMAP per representation (its neighbour graph from the clustering), coloured by the labels."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    if not keys:
        return
    from matplotlib.colors import to_hex

    # One colour per cell type, the same in every panel.
    types = adata.obs["cell_type"].cat.categories
    adata.uns["cell_type_colors"] = [to_hex(plt.cm.tab20(index % 20)) for index in range(len(types))]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2), squeeze=False)
    for axis, (method, key) in zip(axes[0], keys.items()):
        view = adata.copy()
        sc.tl.umap(view, neighbors_key=f"neighbors_{key}", random_state=seed)
        sc.pl.umap(view, color="cell_type", ax=axis, show=False, title=method, legend_loc="none", frameon=False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=color) for color in adata.uns["cell_type_colors"]]
    figure.legend(handles, types, loc="center right", fontsize=7, frameon=False)
    figure.suptitle(f"{title}: UMAP of each representation, coloured by cell type")
    figure.tight_layout(rect=(0, 0, 0.88, 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_annotation(rows: list[dict], path: Path):
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "ari" in row]
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(methods)
    for axis, metric in zip(axes, ("ari", "nmi")):
        for offset, method in enumerate(methods):
            values = [
                next((r[metric] for r in rows if r["dataset"] == d and r["method"] == method), np.nan) for d in datasets
            ]
            axis.bar(np.arange(len(datasets)) + offset * width, values, width, label=method)
        axis.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, datasets, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(metric.upper())
        axis.set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    figure.suptitle("Unsupervised cell-type annotation: Leiden (resolution 1.0) against the labels")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_imputation(rows: list[dict], path: Path):
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "rmse" in row]
    figure, axis = plt.subplots(figsize=(8, 3.8))
    positions = np.arange(len(rows))
    axis.bar(positions - 0.2, [row["rmse"] for row in rows], 0.4, label="RMSE")
    axis.bar(positions + 0.2, [row["mae"] for row in rows], 0.4, label="MAE")
    axis.set_xticks(positions, [row["method"] for row in rows], rotation=20, ha="right", fontsize=8)
    axis.set_title("Imputation of hidden values on pbmc3k (log-normalised scale; lower is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def render_report(bench: Benchmark, argv) -> str:
    args, results = bench.args, bench.results
    command = command_line("downstream.py", argv)
    lines = [
        "# scPaLM downstream benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {environment()}  ",
        f"Wall time: {results['minutes']} min"
        + (
            f" (this invocation; it reused {len(results['reused_models'])} models an earlier one trained, their "
            "training minutes below where it kept them)"
            if results["reused_models"]
            else ""
        )
        + f"; preset `{args.preset}`, {args.max_steps} pretraining steps per stage "
        f"(adaptation: {args.adapt_steps}, at most {args.adapt_epochs:g} epochs), batch {args.batch_size}, "
        f"learning rate {args.learning_rate}, seed {args.seed}"
        + (" (**--quick**: 120 cells per dataset, a check that it runs, not a result)" if args.quick else "")
        + ".",
        "",
        "## Unsupervised cell-type annotation (section 4.2)",
        "",
        (
            "Leiden at resolution 1.0 on each representation's 15-neighbour graph; ARI / NMI against `cell_type`. "
            "Zero-shot: pretrained on the other datasets only; adapted: then trained on this dataset without labels."
        ),
        "",
    ]
    annotation = results["annotation"]
    methods = list(dict.fromkeys(row["method"] for row in annotation))
    methods.sort(key=lambda method: not method.startswith("scPaLM"))  # scPaLM's columns first, then the peers
    summary = []
    for dataset in bench.datasets:
        cells = bench.cells[dataset.name]
        cells_row = [f"{dataset.name} ({cells.n_obs:,} cells, {cells.obs['cell_type'].nunique()} types)"]
        for method in methods:
            row = next((r for r in annotation if r["dataset"] == dataset.name and r["method"] == method), None)
            cells_row.append(
                "" if row is None else "not run" if "ari" not in row else f"{row['ari']:.3f} / {row['nmi']:.3f}"
            )
        summary.append(cells_row)
    lines += [markdown_table(["dataset"] + [f"{m} ARI / NMI" for m in methods], summary), ""]
    lines += ["Every row, with the silhouette of the labels (cosine) and the number of clusters:", ""]
    lines += [
        markdown_table(
            ["dataset", "method", "ARI", "NMI", "silhouette", "clusters", "embedding s"],
            [
                [
                    r["dataset"],
                    r["method"],
                    *(
                        (r["ari"], r["nmi"], r["silhouette"], r["num_clusters"], r["embed_seconds"])
                        if "ari" in r
                        else (r["not_run"], "", "", "", "")
                    ),
                ]
                for r in annotation
            ],
        ),
        "",
        "![annotation](figures/annotation.png)",
        "",
    ]
    lines += [f"![{d.name}](figures/umap_{d.name}.png)" for d in bench.datasets] + [""]

    if results["ablations"]:
        lines += [
            "## Ablations on pbmc3k (Tables 2, 3, 5 and 6)",
            "",
            f"Models trained on pbmc3k alone ({args.max_steps} steps per stage), one change each.",
            "",
        ]
        lines += [
            markdown_table(
                ["representation / model", "ARI", "NMI", "silhouette", "clusters", "dimensions"],
                [
                    [name, s["ari"], s["nmi"], s["silhouette"], s["num_clusters"], s["dimensions"]]
                    for name, s in results["ablations"].items()
                ],
            ),
            "",
        ]
    if results["memory"]:
        lines += [
            "### Embedding memory (Table 6)",
            "",
            (
                "Peak tensor memory of a training step (forward and backward) through the embedding and the pathway "
                "encoder, counted under FakeTensorMode with SDPA attention; weights not counted, gradients counted. "
                "Per-gene tokens: every vocabulary gene is a token of the encoder (scFoundation's layout)."
            ),
            "",
        ]
        lines += [
            markdown_table(
                ["preset", "genes", "batch", "embedding", "peak MiB"],
                [[m["preset"], m["genes"], m["batch"], m["embedding"], m["peak_mib"]] for m in results["memory"]],
            ),
            "",
        ]

    if results["imputation"]:
        first = results["imputation"][0]
        lines += [
            "## Imputation on pbmc3k (section 4.4, Table 1)",
            "",
            (
                f"10% of each cell's non-zero values hidden (drawn with weight exp(-x)), {first['hidden_values']:,} in "
                f"all; scored on the {first['scored_values']:,} whose gene the scPaLM vocabulary holds, log-normalised "
                "scale. Every method is fitted on the masked cells only (zero-shot scPaLM never saw pbmc3k)."
            ),
            "",
        ]
        lines += [
            markdown_table(
                ["method", "RMSE", "MAE", "seconds"],
                [
                    [r["method"], r.get("rmse", r.get("not_run")), r.get("mae", ""), r.get("seconds", "")]
                    for r in results["imputation"]
                ],
            ),
            "",
            "![imputation](figures/imputation.png)",
            "",
        ]

    if results["pathways"]:
        lines += [
            "## Pathway identification on pbmc3k (section 4.5, Appendix D)",
            "",
            (
                "Each code's 10 top genes (association matrix of Appendix D) tested for over-representation in the "
                "1,654 Reactome sets of MSigDB (hypergeometric, against the 13,714 genes measured), Benjamini-"
                "Hochberg over all tests."
            ),
            "",
        ]
        for name, found in results["pathways"].items():
            lines += [
                (
                    f"**{name}**: {found['codes_used']} codes used; {len(found['significant'])} (code, pathway) "
                    "pairs with adjusted p < 0.05. Strongest:"
                ),
                "",
            ]
            lines += [
                markdown_table(
                    ["code", "top genes", "Reactome set", "overlap", "p", "adjusted p"],
                    [
                        [
                            r["code"],
                            r["top_genes"],
                            r["gene_set"],
                            r["overlap"],
                            f"{r['p_value']:.2g}",
                            f"{r['adjusted_p_value']:.2g}",
                        ]
                        for r in found["best"]
                    ],
                ),
                "",
            ]

    lines += [
        "## Training time",
        "",
        markdown_table(["model", "minutes"], list(results["training_minutes"].items())),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
