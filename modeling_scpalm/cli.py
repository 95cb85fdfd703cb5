"""The `scpalm` command: `scpalm pretrain ...` (as training/pretrain.py) and `scpalm embed ...`."""

import argparse
import sys
from pathlib import Path

import torch

from .data_scpalm import ACCELERATOR_BATCH_SIZE


def embed(argv=None):
    from .pretraining import HelpFormatter, resolve_layer

    parser = argparse.ArgumentParser(prog="scpalm embed", description="Write scPaLM cell embeddings to obsm['X_scpalm'].",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model and processor: a pretraining run's model/ folder "
                        "(or the run folder itself)")
    parser.add_argument("--input", required=True, help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--output", required=True, help="the .h5ad to write: the input plus obsm['X_scpalm']")
    parser.add_argument("--layer", help="read the values from this layer instead of X")
    parser.add_argument("--use_raw", action="store_true", help="read raw/X (adata.raw, where scanpy keeps the values a "
                        "workflow started from) and its genes")
    parser.add_argument("--is_normalized", action="store_true", help="values are already log1p(normalised counts)")
    parser.add_argument("--batch_size", type=int, help="cells per batch (default: a few MiB of gene vectors a batch on CPU, "
                        f"{ACCELERATOR_BATCH_SIZE} cells on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    parser.add_argument("--key", default="X_scpalm", help="the obsm key")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype: bfloat16 is the fast choice on a GPU and, from the small preset up, on a "
                        "CPU with bf16 matrix units (Intel AMX); h_C is within about 1%% of float32 for most cells")
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile (dynamic shapes; "
                        "the first batch pays the compilation): about 1.1x the cells/s on CPU, see benchmarks/results/")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    args = parser.parse_args(argv)
    resolve_layer(parser, args)
    model_dir, input_path, output_path = Path(args.model), Path(args.input), Path(args.output)
    if not (model_dir / "config.json").is_file() and (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"  # a pretraining run's folder: its exported model
    if not (model_dir / "config.json").is_file() or not (model_dir / "preprocessor_config.json").is_file():
        parser.error(f"{model_dir} is not a saved scPaLM model: it needs config.json and preprocessor_config.json")
    if not input_path.is_file():
        parser.error(f"{input_path}: no such file")
    if output_path.exists():
        parser.error(f"{output_path} exists: choose another --output (nothing is overwritten)")
    if not output_path.parent.is_dir():
        parser.error(f"{output_path.parent} is not a folder: create it first, or choose another --output")

    import h5py
    from safetensors import SafetensorError
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    from .data_scpalm import open_h5ad_matrix
    from .inference import embed_h5ad
    from .processing_scpalm import ScPaLMProcessor, anndata_gene_ids

    try:
        with h5py.File(input_path, "r") as file:
            matrix, var = open_h5ad_matrix(file, args.layer)
            num_cells = matrix.shape[0]
    except (OSError, KeyError) as error:  # h5py's messages for truncated or non-HDF5 files
        parser.error(f"{input_path} could not be read as an .h5ad file ({error}): is it complete, and written by anndata?")
    except ValueError as error:  # a --layer the file does not have
        parser.error(str(error))
    if num_cells == 0:
        parser.error(f"{input_path} holds no cells: nothing to embed")
    transformers_logging.disable_progress_bar()  # a bar for loading 73 tensors is noise
    try:
        model = AutoModel.from_pretrained(model_dir).to(args.device)
    except (SafetensorError, OSError) as error:  # a truncated or missing weights file
        parser.error(f"the model in {model_dir} could not be loaded ({error}): is its model.safetensors complete? "
                     "Copy or download the folder again.")
    if args.compile:
        model = torch.compile(model, dynamic=True)
    processor = ScPaLMProcessor.from_pretrained(model_dir)
    print(f"scPaLM: {processor.match_genes(list(var.index), anndata_gene_ids(var))}")
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    # Streamed from the input to a temporary file beside --output, renamed when complete: memory follows the chunk,
    # and an interrupted run leaves no truncated file at --output to block the rerun.
    try:
        embed_h5ad(model, processor, input_path, output_path, args.key, args.layer, args.is_normalized, args.batch_size,
                   autocast_dtype=autocast_dtype)
    except (ValueError, TypeError) as error:  # the data's values or genes: the processor's message says what to do
        if args.debug:
            raise
        parser.error(f"{input_path}: {error}")
    print(f"Wrote {num_cells:,} embeddings of size {model.config.hidden_size} to {output_path} (obsm['{args.key}'])")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"pretrain": "pretrain scPaLM (both stages); see `scpalm pretrain --help`", "embed": "embed an .h5ad"}
    if not argv or argv[0] not in commands:
        print("usage: scpalm {pretrain,embed} ...\n" + "\n".join(f"  {name:10s}{text}" for name, text in commands.items()))
        raise SystemExit(2)
    if argv[0] == "pretrain":
        from .pretraining import RunFolderInUse
        from .pretraining import main as pretrain

        try:
            pretrain(argv[1:])
        except (ValueError, TypeError, FileNotFoundError, RunFolderInUse) as error:  # the data, paths or the run folder
            if "--debug" in argv:
                raise
            print(f"scpalm pretrain: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        embed(argv[1:])


if __name__ == "__main__":
    main()
