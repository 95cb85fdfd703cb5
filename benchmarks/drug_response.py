"""Cancer drug response (section 4.3, Appendix E) in the DeepCDR setting: every variant, both splits, one report.

    python benchmarks/drug_response.py --output_dir reports/drug_response --scpalm_model runs/x/model
    python benchmarks/drug_response.py --output_dir reports/drug_response    # pretrains its scPaLM model first
    python benchmarks/drug_response.py --output_dir /tmp/drug --quick        # a minute: checks it all runs (CI)

Predicts ln(IC50) of GDSC drugs on CCLE cell lines from the drug's RDKit graph (DeepCDR's GCN) and the cell line as:
DeepCDR's expression MLP over the 706 census genes (its "no mutation, no methylation" setting; the baseline that
scFoundation's experiment replaced), scPaLM's embedding h_C of the same line's expression, and each with the
mutation features. Beside them, each drug's mean ln(IC50) over the training pairs. Splits: random pairs (5% of
each cancer type's pairs for test, 5% for early stopping, as DeepCDR but without stopping on the test pairs), and
unseen cell lines (10% / 10% of each type's lines). Writes `report.md`, `results.json` and Figures 6 and 7.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import DATA_DIR, command_line, environment, knn_accuracy, markdown_table

SCRNA_FILES = [
    "pbmc3k_2638.h5ad",
    "pbmc_3tech_2000.h5ad",
    "mixology_sc_celseq2.h5ad",
    "mixology_sc_dropseq.h5ad",
    "mixology_sc_celseq2_5cl_p1.h5ad",
    "mixology_sc_celseq2_5cl_p2.h5ad",
    "mixology_sc_celseq2_5cl_p3.h5ad",
]
VARIANTS = {  # name -> cell-line feature sets
    "expression (DeepCDR)": ["expression"],
    "scPaLM embedding": ["scpalm"],
    "expression + mutations": ["expression", "mutations"],
    "scPaLM embedding + mutations": ["scpalm", "mutations"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=str(DATA_DIR), help="the shared data folder ($SCPALM_DATA_DIR)")
    parser.add_argument(
        "--scpalm_model",
        help="a saved scPaLM model folder (model + processor); default: pretrain "
        "one on the human single-cell datasets of --data_dir",
    )
    parser.add_argument("--pretrain_steps", type=int, default=400, help="steps per stage when pretraining it")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--splits", nargs="+", default=["random", "cell_line"], choices=["random", "cell_line"])
    parser.add_argument(
        "--batch_size",
        type=int,
        default=256,
        help="DeepCDR used 64; 256 is 4x fewer drug-graph passes per epoch on a CPU",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5, help="epochs without a better validation PCC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="40 drugs, 2 epochs, a 2-step scPaLM: checks it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_epochs, args.patience, args.pretrain_steps = 2, 1, 2
    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        parser.error(f"{args.output_dir} exists: choose a new --output_dir")
    return args


def main(argv=None):
    import pandas as pd

    from modeling_scpalm import ScPaLMModel, ScPaLMProcessor
    from modeling_scpalm.tasks.drug_response import (
        DrugResponseTrainer,
        cell_line_split,
        drug_mean_baseline,
        grouped_pcc,
        load_drug_response_data,
        pearson,
        random_pair_split,
        scpalm_cell_line_embeddings,
        spearman,
    )

    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    (output_dir / "figures").mkdir(parents=True)
    data = load_drug_response_data(Path(args.data_dir) / "drug_response")
    if args.quick:
        drugs = sorted(data.pairs["drug"].unique())[:40]
        data.pairs = data.pairs[data.pairs["drug"].isin(drugs)].reset_index(drop=True)
    model_dir = Path(args.scpalm_model) if args.scpalm_model else pretrain_scpalm(args, output_dir / "scpalm")
    model, processor = ScPaLMModel.from_pretrained(model_dir), ScPaLMProcessor.from_pretrained(model_dir)
    match = processor.match_genes(data.log2_tpm.columns)
    features = {
        "expression": data.expression,
        "mutations": data.mutations,
        "scpalm": scpalm_cell_line_embeddings(model, processor, data.log2_tpm),
    }
    splitters = {"random": random_pair_split, "cell_line": cell_line_split}
    results = {
        "pairs": len(data.pairs),
        "cell_lines": int(data.pairs["cell_line"].nunique()),
        "drugs": int(data.pairs["drug"].nunique()),
        "scpalm_model": str(model_dir),
        "scpalm_gene_match": str(match),
        "cancer_type_accuracy": cancer_type_accuracy(data.pairs, features, args.seed),
        "runs": [],
    }
    print("cancer type from the cell-line features alone:", results["cancer_type_accuracy"], flush=True)
    predictions = {}
    for split_name in args.splits:
        split = splitters[split_name](data.pairs, seed=args.seed)
        test = data.pairs.iloc[split["test"]]
        observed = test["ln_ic50"].to_numpy()
        candidates = {"drug mean (baseline)": (lambda split=split: (drug_mean_baseline(data.pairs, split), []))}
        for variant in args.variants:
            trainer = DrugResponseTrainer(
                data,
                {name: features[name] for name in VARIANTS[variant]},
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                max_epochs=args.max_epochs,
                patience=args.patience,
                seed=args.seed,
            )

            def train_and_predict(trainer=trainer, split=split):
                model, history = trainer.fit(split)
                return trainer.predict(model, split["test"]), history

            candidates[variant] = train_and_predict
        for variant, run in candidates.items():
            clock = time.perf_counter()
            predicted, history = run()
            predictions[split_name, variant] = predicted
            row = {
                "split": split_name,
                "variant": variant,
                "pcc": pearson(predicted, observed),
                "spearman": spearman(predicted, observed),
                "rmse": float(np.sqrt(np.mean((predicted - observed) ** 2))),
                "epochs": len(history),
                "minutes": round((time.perf_counter() - clock) / 60, 2),
                "test_pairs": len(observed),
                # Undefined for the baseline: its predictions are constant within a drug.
                "median_pcc_per_drug": None if not history else float(grouped_pcc(test, predicted, "drug").median()),
                "median_pcc_per_cancer_type": float(grouped_pcc(test, predicted, "cancer_type").median()),
                "history": history,
            }
            results["runs"].append(row)
            print({k: v for k, v in row.items() if k != "history"}, flush=True)
        if split_name == "random" and {"expression (DeepCDR)", "scPaLM embedding"} <= set(args.variants):
            figure_six(
                test,
                predictions[split_name, "expression (DeepCDR)"],
                predictions[split_name, "scPaLM embedding"],
                output_dir / "figures" / "figure6_pcc_by_group.png",
            )
            figure_seven(
                test,
                predictions[split_name, "expression (DeepCDR)"],
                predictions[split_name, "scPaLM embedding"],
                output_dir / "figures" / "figure7_best_cancer_type.png",
            )
    results["minutes"] = round((time.perf_counter() - started) / 60, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output_dir / "report.md").write_text(render_report(args, argv, results, pd))
    print(f"Report: {output_dir / 'report.md'}")
    return results


def cancer_type_accuracy(pairs, features, seed) -> dict[str, float]:
    """How much of a cell line each feature set keeps (`knn_accuracy` of its cancer type), beside the majority type."""
    cancer_type = pairs.drop_duplicates("cell_line").set_index("cell_line")["cancer_type"]
    cancer_type = cancer_type[cancer_type.map(cancer_type.value_counts()) >= 5]  # 5 folds need 5 lines per type
    accuracy = {"majority type": float(cancer_type.value_counts(normalize=True).iloc[0])}
    for name, table in features.items():
        accuracy[name] = knn_accuracy(table.reindex(cancer_type.index).to_numpy(), cancer_type.to_numpy(), seed)
    return accuracy


def pretrain_scpalm(args, run_dir: Path) -> Path:
    """A tiny scPaLM pretrained on the shared human single-cell datasets (raw counts)."""
    from modeling_scpalm.pretraining import main as pretrain

    scrna = Path(args.data_dir) / "scrna"
    files = [str(scrna / name) for name in (SCRNA_FILES[:2] if args.quick else SCRNA_FILES)]
    command = [
        "--output_dir",
        str(run_dir),
        "--preset",
        "tiny",
        "--max_steps",
        str(args.pretrain_steps),
        "--per_device_batch_size",
        "16" if args.quick else "64",
        "--learning_rate",
        "2e-3",
        "--eval_steps",
        str(args.pretrain_steps),
        "--checkpointing_steps",
        str(args.pretrain_steps),
        "--seed",
        str(args.seed),
    ]
    for file in files:
        command += ["--train_file", file]
    return pretrain(command)


def figure_six(test, expression_predicted, scpalm_predicted, path):
    """Figure 6: PCC of the two cell encoders per cell line, per cancer type, per drug, against y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modeling_scpalm.tasks.drug_response import grouped_pcc

    figure, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    for axis, (by, title) in zip(
        axes, [("cell_line", "per cell line"), ("cancer_type", "per cancer type"), ("drug", "per drug")]
    ):
        minimum = 5 if by == "cell_line" else 10
        expression = grouped_pcc(test, expression_predicted, by, minimum)
        scpalm = grouped_pcc(test, scpalm_predicted, by, minimum).reindex(expression.index)
        axis.scatter(expression, scpalm, s=10, alpha=0.7)
        low = float(np.nanmin([expression.min(), scpalm.min(), 0]))
        axis.plot([low, 1], [low, 1], color="red", linewidth=1)
        better = int((scpalm > expression).sum())
        axis.set(
            xlabel="PCC, expression (DeepCDR)",
            ylabel="PCC, scPaLM embedding",
            title=f"{title}: scPaLM higher in {better} of {len(expression)}",
        )
    figure.suptitle("Held-out pairs (random split): Pearson correlation of predicted and observed ln(IC50)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def figure_seven(test, expression_predicted, scpalm_predicted, path):
    """Figure 7: predicted against observed ln(IC50) for the cancer type scPaLM predicts best."""
    import matplotlib.pyplot as plt

    from modeling_scpalm.tasks.drug_response import grouped_pcc, pearson, spearman

    best = grouped_pcc(test, scpalm_predicted, "cancer_type").index[0]
    rows = (test["cancer_type"] == best).to_numpy()
    observed = test["ln_ic50"].to_numpy()[rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
    for axis, (name, predicted) in zip(
        axes, [("expression (DeepCDR)", expression_predicted), ("scPaLM embedding", scpalm_predicted)]
    ):
        axis.scatter(observed, predicted[rows], s=8, alpha=0.6)
        axis.set(
            xlabel="observed ln(IC50)",
            ylabel="predicted ln(IC50)",
            title=f"{name}\nPCC {pearson(predicted[rows], observed):.3f}, "
            f"Spearman {spearman(predicted[rows], observed):.3f}",
        )
    figure.suptitle(f"{best}: {rows.sum()} held-out pairs (random split)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def render_report(args, argv, results, pd) -> str:
    command = command_line("drug_response.py", argv)
    runs = results["runs"]
    table = markdown_table(
        [
            "split",
            "cell-line input",
            "PCC",
            "Spearman",
            "RMSE",
            "median PCC per drug",
            "median PCC per cancer type",
            "epochs",
            "minutes",
        ],
        [
            [
                r["split"],
                r["variant"],
                r["pcc"],
                r["spearman"],
                r["rmse"],
                r["median_pcc_per_drug"] or "undefined",
                r["median_pcc_per_cancer_type"],
                r["epochs"],
                r["minutes"],
            ]
            for r in runs
        ],
    )
    figures = "![Figure 6](figures/figure6_pcc_by_group.png)\n\n![Figure 7](figures/figure7_best_cancer_type.png)"
    return "\n".join(
        [
            "# Drug response (IC50) in the DeepCDR setting",
            "",
            f"Command: `{command}`  ",
            f"Machine: {environment()}  ",
            f"{results['pairs']:,} (cell line, drug) pairs: "
            f"{results['cell_lines']} cell lines x {results['drugs']} drugs; batch {args.batch_size}, "
            f"Adam {args.learning_rate}, at most {args.max_epochs} epochs, early stopping after "
            f"{args.patience} without a better validation PCC; seed {args.seed}; {results['minutes']} min in all"
            + (" (**--quick**: a check that it runs, not a result)" if args.quick else "")
            + ".",
            "",
            f"scPaLM model: `{results['scpalm_model']}`; the bulk profiles' genes: {results['scpalm_gene_match']}.",
            "",
            "How much of a cell line each input keeps, before any drug: 5-fold accuracy of a 5-nearest-neighbour "
            "classifier of the line's cancer type (30 principal components; types with at least 5 lines): "
            + ", ".join(f"{name} {value:.3f}" for name, value in results["cancer_type_accuracy"].items())
            + ".",
            "",
            table,
            "",
            (
                "PCC and Spearman over all test pairs; the per-drug and per-cancer-type medians over groups with "
                "at least 10 test pairs."
            ),
            "",
            figures,
            "",
        ]
    )


if __name__ == "__main__":
    main()
