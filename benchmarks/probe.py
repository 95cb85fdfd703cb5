"""Where a model keeps or loses what tells cells apart: a cell-type probe after each of its stages.

    python benchmarks/probe.py --model runs/x/model       # a pretrained model, beside the same model untrained
    python benchmarks/probe.py --preset small             # an untrained model of a preset (pbmc3k's genes)
    python benchmarks/probe.py --quick                    # seconds: what CI runs

On pbmc3k's labelled cells, each representation's cell-type accuracy (`knn_accuracy`: 5-fold, 5 neighbours, 30
principal components of the values as they are, as scanpy's neighbours read an embedding): the embedding's N tokens,
the pathway encoder's output, the quantized pathway tokens, their codes (one-hot per slot) and h_C. Beside them: the
majority type, the log-normalised values themselves, and a random sketch at the model's width, the log-normalised
values times a random (genes x hidden) matrix, averaged over the cell's expressed genes: what a softmax pool that
attends evenly over the genes can carry at that width (an untrained embedding is close to one)."""

import argparse

import numpy as np
import scipy.sparse as sp
import torch
from _common import command_line, knn_accuracy, load_pbmc3k, print_table

STAGES = {
    "embedding tokens": lambda output: output.hidden_states[0].flatten(1),
    "pathway encoder output": lambda output: output.pathway_hidden_states.flatten(1),
    "quantized pathway tokens": lambda output: output.pathway_tokens.flatten(1),
    "h_C (cell embedding)": lambda output: output.cell_embedding,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved scPaLM folder (model + processor); default: untrained --preset")
    parser.add_argument("--preset", default="tiny", help="without --model: the untrained model's size")
    parser.add_argument("--num_cells", type=int, help="default: all 2,638 labelled pbmc3k cells")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 cells: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_cells = 300
    return args


def main(argv=None):
    from modeling_scpalm import ScPaLMConfig, ScPaLMModel, ScPaLMProcessor
    from modeling_scpalm.processing_scpalm import anndata_gene_ids

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    adata = load_pbmc3k(args.num_cells)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    if args.model:
        trained = ScPaLMModel.from_pretrained(args.model)
        processor = ScPaLMProcessor.from_pretrained(args.model)
        models = {"trained": trained, "untrained": ScPaLMModel(trained.config)}
    else:
        processor = ScPaLMProcessor.from_anndata(adata)
        models = {"untrained": ScPaLMModel(ScPaLMConfig.from_preset(args.preset, num_genes=processor.num_genes))}
    cells, measured = processor.transform(adata.X, adata.var_names, anndata_gene_ids(adata))
    config = next(iter(models.values())).config

    def accuracy(values):
        return knn_accuracy(values, labels, args.seed, standardise=False)

    rows = [
        ["majority type", "", (labels == max(set(labels), key=list(labels).count)).mean()],
        ["log-normalised values", "", accuracy(cells.toarray())],
        [
            f"random sketch, width {config.hidden_size}",
            "",
            accuracy(random_sketch(cells, config.hidden_size, args.seed)),
        ],
    ]
    for name, model in models.items():
        for stage, values in representations(model, processor, cells, measured, args.batch_size).items():
            rows.append([stage, name, accuracy(values)])
    source = args.model or f"untrained preset {args.preset}"
    print_table(
        f"Cell-type probe on {len(labels):,} pbmc3k cells ({len(set(labels))} types): {source}",
        ["representation", "model", "accuracy"],
        rows,
        note=f"Command: {command_line('probe.py', argv)}",
    )


def representations(model, processor, cells: sp.csr_matrix, measured: np.ndarray, batch_size: int) -> dict:
    """Every stage's representation of every cell (rows in the order of `cells`), from one pass per batch."""
    model.eval()
    measured = torch.from_numpy(measured)
    parts = {stage: [] for stage in (*STAGES, "pathway codes, one-hot")}
    with torch.no_grad():
        for start in range(0, cells.shape[0], batch_size):
            output = model(
                **processor.pad(cells[start : start + batch_size]),
                measured_gene_mask=measured,
                output_hidden_states=True,
            )
            for stage, read in STAGES.items():
                parts[stage].append(read(output).numpy())
            if output.pathway_codes is not None:
                one_hot = torch.nn.functional.one_hot(output.pathway_codes, model.config.codebook_size)
                parts["pathway codes, one-hot"].append(one_hot.flatten(1).float().numpy())
    return {stage: np.concatenate(values) for stage, values in parts.items() if values}


def random_sketch(cells: sp.csr_matrix, width: int, seed: int) -> np.ndarray:
    """Each cell's log-normalised values times a random (genes x width) matrix, over its number of expressed genes."""
    projection = np.random.default_rng(seed).standard_normal((cells.shape[1], width))
    expressed = np.maximum(np.diff(cells.indptr), 1)
    return (sp.diags(1.0 / expressed) @ cells) @ projection


if __name__ == "__main__":
    main()
