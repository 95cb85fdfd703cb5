"""The `scpalm` command: `scpalm pretrain` (as training/pretrain.py), `scpalm embed`, `scpalm finetune` (as
training/finetune.py) and `scpalm evaluate`."""

import sys
from pathlib import Path

from .arguments import evaluate_parser, parse_embed_args, parse_pretrain_args


def embed(argv=None):
    parser, args = parse_embed_args(argv)  # before the imports below: --help and argument errors answer at once
    import h5py
    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    from .data_scpalm import open_h5ad_matrix
    from .inference import embed_h5ad
    from .modeling_scpalm import ScPaLMModel
    from .processing_scpalm import ScPaLMProcessor, anndata_gene_ids

    model_dir, input_path, output_path = Path(args.model), Path(args.input), Path(args.output)
    try:
        with h5py.File(input_path, "r") as file:
            matrix, var = open_h5ad_matrix(file, args.layer)
            num_cells = matrix.shape[0]
    except (OSError, KeyError) as error:  # h5py's messages for truncated or non-HDF5 files
        parser.error(
            f"{input_path} could not be read as an .h5ad file ({error}): is it complete, and written by anndata?"
        )
    except ValueError as error:  # a --layer the file does not have
        parser.error(str(error))
    if num_cells == 0:
        parser.error(f"{input_path} holds no cells: nothing to embed")
    if not args.verbose:
        transformers_logging.disable_progress_bar()  # a bar for loading 73 tensors is noise
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = ScPaLMModel.from_pretrained(model_dir).to(device)
    except (SafetensorError, OSError) as error:  # a truncated or missing weights file
        parser.error(
            f"the model in {model_dir} could not be loaded ({error}): is its model.safetensors complete? "
            "Copy or download the folder again."
        )
    if args.compile:
        model = torch.compile(model, dynamic=True)
    processor = ScPaLMProcessor.from_pretrained(model_dir)
    print(f"scPaLM: {processor.match_genes(list(var.index), anndata_gene_ids(var))}")
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    # Streamed from the input to a temporary file beside --output, renamed when complete: memory follows the chunk,
    # and an interrupted run leaves no truncated file at --output to block the rerun.
    try:
        embed_h5ad(
            model,
            processor,
            input_path,
            output_path,
            args.key,
            args.layer,
            args.is_normalized,
            args.batch_size,
            args.representation,
            autocast_dtype=autocast_dtype,
        )
    except (ValueError, TypeError) as error:  # the data's values or genes: the processor's message says what to do
        if args.debug:
            raise
        parser.error(f"{input_path}: {error}")
    with h5py.File(output_path, "r") as file:
        shape = file["obsm"][args.key].shape
    print(
        f"Wrote {args.representation} of {num_cells:,} cells, {shape[1]} values each, "
        f"to {output_path} (obsm['{args.key}'])"
    )


def evaluate(argv=None):
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    if not Path(args.input).is_file():
        parser.error(f"{args.input}: no such file")
    require_extra("evaluate", ["scib_metrics", "scanpy"], "evaluate")
    import anndata

    from .evaluation import RESULTS_NAME, evaluate_embeddings

    adata = anndata.read_h5ad(args.input)
    try:
        table = evaluate_embeddings(
            adata,
            args.label_key,
            args.obsm,
            args.batch_key,
            args.unintegrated_obsm,
            args.is_normalized,
            args.output_dir,
            args.n_jobs,
            args.seed,
        )
    except ValueError as error:  # a key the file lacks, or labels missing: the message names it
        if args.debug:
            raise
        parser.error(f"{args.input}: {error}")
    print(table.T.round(3).to_string())
    print(f"Wrote {Path(args.output_dir) / RESULTS_NAME}.csv, .md and .svg")


def require_extra(command: str, modules: list[str], extra: str):
    """One line naming the extra to install, rather than an import error halfway through the command."""
    import importlib.util

    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"scpalm {command}: error: needs {', '.join(missing)} (not installed): pip install 'scpalm[{extra}]'",
            file=sys.stderr,
        )
        raise SystemExit(2)


COMMANDS = {
    "pretrain": "pretrain scPaLM on .h5ad files of raw counts (both stages)",
    "embed": "write a model's cell embeddings into an .h5ad",
    "finetune": "fine-tune a cell-type classifier on labelled cells",
    "evaluate": "score embeddings with scib-metrics and Leiden-1.0 ARI/NMI",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: scpalm {"
            + ",".join(COMMANDS)
            + "} ... (`scpalm <command> --help` for its options)\n\ncommands:\n"
            + "\n".join(f"  {name:10s}{text}" for name, text in COMMANDS.items())
        )
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, argv = argv[0], argv[1:]
    if command == "pretrain":
        args = parse_pretrain_args(argv)
        require_extra("pretrain", ["accelerate", "datasets", "sklearn"], "train")
        from .pretraining import RunFolderInUse, pretrain

        try:
            pretrain(args)
        except (ValueError, TypeError, FileNotFoundError, RunFolderInUse) as error:  # the data, paths or the run folder
            if args.debug:
                raise
            print(f"scpalm pretrain: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    elif command == "embed":
        embed(argv)
    elif command == "evaluate":
        evaluate(argv)
    else:
        if not {"-h", "--help", "--help_all"} & set(argv):
            require_extra("finetune", ["accelerate", "datasets", "sklearn"], "train")
        from .finetuning import main as finetune

        finetune(argv, prog="scpalm finetune")


if __name__ == "__main__":
    main()
