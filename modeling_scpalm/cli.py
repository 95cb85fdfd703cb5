"""The `scpalm` command: `scpalm pretrain ...` (as training/pretrain.py) and `scpalm embed ...`."""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .data_scpalm import ACCELERATOR_BATCH_SIZE, inference_batches

# What `embed_anndata` can return per cell, from the model's output: h_C (the cell embedding), or what the ablations of
# Tables 2 and 5 use instead (the pathway tokens averaged or concatenated, the encoder output before quantization), or
# the code of each pathway token (pathway identification).
REPRESENTATIONS = {
    "cell_embedding": lambda output: output.cell_embedding,
    "pathway_mean": lambda output: output.pathway_tokens.mean(1),
    "pathway_concat": lambda output: output.pathway_tokens.flatten(1),
    "encoder_mean": lambda output: output.pathway_hidden_states.mean(1),
    "pathway_codes": lambda output: output.pathway_codes,
}


def embed_anndata(model, processor, adata, batch_size: int | None = None, is_normalized: bool = False, layer: str | None = None,
                  progress: bool = True, representation: str = "cell_embedding",
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """
    One row per cell, computed in batches of cells with similar numbers of non-zero genes (`inference_batches`:
    `batch_size` cells each, or by default a few MiB of gene vectors on CPU, 256 cells on a GPU): by default h_C
    `(cells, hidden)`; `representation` picks another of `REPRESENTATIONS` (`"pathway_codes"` gives `(cells, N)`
    code indices). `autocast_dtype` (e.g. `torch.bfloat16` on a GPU) runs the model under `torch.autocast`; `model`
    may be `torch.compile`d.
    """
    from tqdm.auto import tqdm

    from .processing_scpalm import anndata_gene_ids

    if representation not in REPRESENTATIONS:
        raise ValueError(f"Unknown representation {representation!r}: choose one of {sorted(REPRESENTATIONS)}.")
    if representation == "pathway_codes" and not model.config.use_quantizer:
        raise ValueError("This model has no quantizer (`config.use_quantizer` is False), so no pathway codes.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no cells: nothing to embed.")
    gene_ids = anndata_gene_ids(adata)
    cells, measured = processor.transform(adata.layers[layer] if layer else adata.X, adata.var_names, gene_ids, is_normalized)
    weight = next(model.parameters())
    device = weight.device
    batches = inference_batches(np.diff(cells.indptr), model.config.hidden_size, device, batch_size,
                                autocast_dtype or weight.dtype)
    measured = torch.from_numpy(measured).to(device)
    rows_out = None
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for rows in tqdm(batches, desc="embedding", disable=not progress, unit="batch"):
            inputs = {name: tensor.to(device) for name, tensor in processor.pad(cells[rows]).items()}
            values = REPRESENTATIONS[representation](model(**inputs, measured_gene_mask=measured))
            values = values.cpu().numpy() if representation == "pathway_codes" else values.float().cpu().numpy()
            if rows_out is None:
                rows_out = np.empty((cells.shape[0], *values.shape[1:]), dtype=values.dtype)
            rows_out[rows] = values
    return rows_out


def embed(argv=None):
    parser = argparse.ArgumentParser(prog="scpalm embed", description="Write scPaLM cell embeddings to obsm['X_scpalm'].")
    parser.add_argument("--model", required=True, help="a folder written by pretraining (model and processor)")
    parser.add_argument("--input", required=True, help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--output", required=True, help="the .h5ad to write: the input plus obsm['X_scpalm']")
    parser.add_argument("--layer", help="take counts from this layer instead of X")
    parser.add_argument("--is_normalized", action="store_true", help="values are already log1p(normalised counts)")
    parser.add_argument("--batch_size", type=int, help="cells per batch (default: a few MiB of gene vectors a batch on CPU, "
                        f"{ACCELERATOR_BATCH_SIZE} cells on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--key", default="X_scpalm", help="the obsm key")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype: bfloat16 is the fast choice on a GPU and, from the small preset up, on a "
                        "CPU with bf16 matrix units (Intel AMX); h_C is within about 1%% of float32 for most cells")
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile (dynamic shapes; "
                        "the first batch pays the compilation): about 1.1x the cells/s on CPU, see benchmarks/results/")
    args = parser.parse_args(argv)
    model_dir, input_path, output_path = Path(args.model), Path(args.input), Path(args.output)
    if not (model_dir / "config.json").is_file() or not (model_dir / "preprocessor_config.json").is_file():
        parser.error(f"{model_dir} is not a saved scPaLM model: it needs config.json and preprocessor_config.json")
    if not input_path.is_file():
        parser.error(f"{input_path}: no such file")
    if output_path.exists():
        parser.error(f"{output_path} exists: choose another --output (nothing is overwritten)")

    import anndata
    from transformers import AutoModel

    from .processing_scpalm import ScPaLMProcessor, anndata_gene_ids

    adata = anndata.read_h5ad(input_path)
    model = AutoModel.from_pretrained(model_dir).to(args.device)
    if args.compile:
        model = torch.compile(model, dynamic=True)
    processor = ScPaLMProcessor.from_pretrained(model_dir)
    print(f"scPaLM: {processor.match_genes(adata.var_names, anndata_gene_ids(adata))}")
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    adata.obsm[args.key] = embed_anndata(model, processor, adata, args.batch_size, args.is_normalized, args.layer,
                                         autocast_dtype=autocast_dtype)
    adata.write_h5ad(output_path)
    print(f"Wrote {adata.n_obs:,} embeddings of size {adata.obsm[args.key].shape[1]} to {output_path} (obsm['{args.key}'])")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"pretrain": "pretrain scPaLM (both stages); see `scpalm pretrain --help`", "embed": "embed an .h5ad"}
    if not argv or argv[0] not in commands:
        print("usage: scpalm {pretrain,embed} ...\n" + "\n".join(f"  {name:10s}{text}" for name, text in commands.items()))
        raise SystemExit(2)
    if argv[0] == "pretrain":
        from .pretraining import main as pretrain

        pretrain(argv[1:])
    else:
        embed(argv[1:])


if __name__ == "__main__":
    main()
