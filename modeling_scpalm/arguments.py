"""The command lines of `scpalm pretrain` (and `training/pretrain.py`) and `scpalm embed`.

Only the standard library is imported here, so `--help` and a mistyped flag answer at once; torch, transformers and
the data stack load once the arguments are known.
"""

import argparse
from pathlib import Path

PRETRAIN_DESCRIPTION = """\
Pretrain scPaLM: stage 1 (pathway reconstruction), then stage 2 (cell aggregation) from the stage-1 weights.

Runs on one CPU, several processes or several GPUs:

    scpalm pretrain --train_file a.h5ad --train_file b.h5ad --output_dir runs/tiny --preset tiny
    accelerate launch training/pretrain.py ...                  # GPUs
    accelerate launch --multi_gpu --num_processes 2 training/pretrain.py ...   # two CPU processes (gloo), or torchrun

The h5ad files become a sharded on-disk dataset under `output_dir/dataset` (or pass `--dataset_dir` to reuse one).
Each stage writes `output_dir/stage_<n>/` (model, processor, `log.jsonl`) and checkpoints under
`output_dir/checkpoints/stage_<n>/step_<k>`; `--resume_from_checkpoint latest` continues a killed run exactly.
The run ends by writing `output_dir/model`: the last stage's model and processor with a filled model card
(README.md from `hub_cards/model_card.md`), which `--push_to_hub` uploads.

`--init_from <an earlier run's output_dir>` adapts a pretrained model to new data without labels: both stages
continue from that run's weights (and keep its gene vocabulary; genes outside it are dropped and reported).
"""

# The default length of each stage follows the data, as scvi-tools' default epochs do: many passes over a small
# dataset, fewer over a large one, never less than one; and a step's cost grows with the cells' expressed genes, so
# deep cells get fewer steps (a budget of gene values). docs/design.md gives the measured step times.
DEFAULT_EPOCHS, DEFAULT_MIN_STEPS, DEFAULT_MAX_STEPS = 20, 200, 600
DEFAULT_GENE_VALUES = 28_000_000


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default where it has one."""

    def _get_help_string(self, action):
        if (
            action.default in (None, argparse.SUPPRESS)
            or action.default is False
            or action.default == []
            or "default" in action.help
        ):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".strip()


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scpalm pretrain", description=PRETRAIN_DESCRIPTION, formatter_class=HelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", action="append", default=[], help="an .h5ad of raw counts (repeatable)")
    data.add_argument("--dataset_dir", help="a dataset built before (by an earlier run, or build_pretraining_dataset)")
    data.add_argument("--layer", help="take counts from this AnnData layer instead of X")
    data.add_argument("--use_raw", action="store_true", help="take counts from raw/X (adata.raw) and its genes")
    data.add_argument(
        "--is_normalized", action="store_true", help="the files hold log1p(counts per 10,000), not counts"
    )
    data.add_argument(
        "--eval_fraction", type=float, default=0.05, help="share of cells held out for the evaluation loss"
    )
    data.add_argument(
        "--batch_key",
        help="an obs column of batches (technology, donor, ...): the decoders are told each cell's batch and "
        "h_C's readout drops what tells the batches apart (embedding needs no batch)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", help="tiny, small or paper")
    model.add_argument("--stage", choices=["1", "2", "both"], default="both", help="which stages to train")
    model.add_argument("--stage_one_model", help="with --stage 2: the stage-1 folder to start from")
    model.add_argument(
        "--config_overrides",
        help="config fields to change, e.g. 'use_quantizer=false,pathway_encoder_num_hidden_layers=0'"
        " (applied to every stage's config: the ablations of Tables 2, 3, 5 and 6)",
    )
    model.add_argument(
        "--init_from",
        help="an earlier run's output_dir: continue from its weights and vocabulary "
        "(self-supervised adaptation to the new files; --preset is then ignored)",
    )
    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True, help="the run folder: dataset, stages, checkpoints, model")
    training.add_argument("--per_device_batch_size", type=int, default=64, help="cells per batch and process")
    training.add_argument("--learning_rate", type=float, help="default: 2e-3 in both stages (docs/design.md)")
    training.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's")
    training.add_argument(
        "--warmup_ratio", type=float, default=0.05, help="share of the steps the learning rate warms up over"
    )
    training.add_argument("--max_steps", type=int, help="optimizer steps per stage (overrides --num_epochs)")
    training.add_argument(
        "--num_epochs",
        type=float,
        help="epochs per stage (default: by data size, "
        f"{DEFAULT_EPOCHS:g} epochs within {DEFAULT_MIN_STEPS}-{DEFAULT_MAX_STEPS} steps and "
        f"{DEFAULT_GENE_VALUES:,} expressed genes seen, at least one epoch)",
    )
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    training.add_argument("--eval_steps", type=int, default=500, help="steps between evaluations of the held-out loss")
    training.add_argument("--checkpointing_steps", type=int, default=500, help="steps between checkpoints")
    training.add_argument("--logging_steps", type=int, default=10, help="steps between log records")
    training.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest'")
    training.add_argument("--num_workers", type=int, default=0, help="data loader processes")
    training.add_argument(
        "--group_by_length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch cells of similar non-zero counts together (less padding; on by default)",
    )
    training.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the initialisation, the batches and the views"
    )
    hub = parser.add_argument_group("sharing (the run ends by writing output_dir/model: model, processor, model card)")
    hub.add_argument("--push_to_hub", action="store_true", help="upload output_dir/model to the Hub at the end")
    hub.add_argument("--hub_model_id", help="the Hub repository, 'user/name' (default: the output folder's name)")
    hub.add_argument("--hub_token", help="default: the token `hf auth login` saved, or $HF_TOKEN")
    hub.add_argument("--hub_private_repo", action="store_true", help="make the repository private")
    hub.add_argument("--dataset_name", action="append", help="a training dataset's name for the card (repeatable)")
    hub.add_argument("--license", default="apache-2.0", help="the model card's licence (mind your data's terms)")
    _add_console_flags(parser, "accelerate's set-up, transformers' loading reports")
    return parser


def parse_pretrain_args(argv=None) -> argparse.Namespace:
    """`scpalm pretrain`'s arguments, checked before any work starts."""
    parser = pretrain_parser()
    args = parser.parse_args(argv)
    resolve_layer(parser, args)
    if bool(args.train_file) == bool(args.dataset_dir):
        parser.error("give the data as --train_file (one or more) or as --dataset_dir, not both or neither")
    if args.batch_key and args.dataset_dir:
        parser.error(
            "--batch_key applies when the dataset is built from --train_file; a --dataset_dir keeps the "
            "batches it was built with"
        )
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.num_epochs is not None and args.num_epochs <= 0:
        parser.error(f"--num_epochs must be positive, got {args.num_epochs}")
    if args.stage == "2" and not args.stage_one_model:
        parser.error("--stage 2 needs --stage_one_model, the folder stage 1 wrote")
    if args.config_overrides:
        _check_config_overrides(parser, args.preset, args.config_overrides)
    if args.init_from:
        missing = [
            f"{args.init_from}/{stage}"
            for stage in ("stage_1", "stage_2")
            if not (Path(args.init_from) / stage / "config.json").is_file()
        ]
        if missing:
            parser.error(f"--init_from needs a finished run's output_dir; missing {', '.join(missing)}")
        if args.stage_one_model or args.dataset_dir:
            parser.error(
                "--init_from takes the vocabulary and weights from that run: drop --stage_one_model/--dataset_dir"
            )
    output_dir = Path(args.output_dir)
    from .pretraining import run_folder_contents

    if run_folder_contents(output_dir) and not args.resume_from_checkpoint:
        parser.error(f"{output_dir} exists and is not empty: choose a new --output_dir, or --resume_from_checkpoint")
    if args.push_to_hub:
        from huggingface_hub import constants

        # Found out now, not after hours of training.
        if constants.HF_HUB_OFFLINE:
            parser.error("--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it, or push later")
        args.hub_model_id = args.hub_model_id or output_dir.resolve().name
    return args


# `inference.REPRESENTATIONS`' names, here so that `--help` answers without importing torch.
EMBED_REPRESENTATIONS = (
    "cell_embedding",
    "raw_cell_embedding",
    "encoder_mean",
    "pathway_mean",
    "pathway_concat",
    "pathway_codes",
)


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scpalm embed",
        description="Write scPaLM cell embeddings to obsm['X_scpalm'].",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a saved model and processor: a pretraining run's model/ folder (or the run folder itself)",
    )
    parser.add_argument("--input", required=True, help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--output", required=True, help="the .h5ad to write: the input plus obsm['X_scpalm']")
    parser.add_argument("--layer", help="read the values from this layer instead of X")
    parser.add_argument(
        "--use_raw",
        action="store_true",
        help="read raw/X (adata.raw, where scanpy keeps the values a workflow started from) and its genes",
    )
    parser.add_argument("--is_normalized", action="store_true", help="values are already log1p(normalised counts)")
    parser.add_argument(
        "--batch_size",
        type=int,
        help="cells per batch (default: a few MiB of gene vectors a batch on CPU, a fixed number of cells on a GPU)",
    )
    parser.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--key", default="X_scpalm", help="the obsm key")
    parser.add_argument(
        "--representation",
        default="cell_embedding",
        choices=EMBED_REPRESENTATIONS,
        help="what to write: h_C (cell_embedding), made for clustering; h_C before its readout (raw_cell_embedding), "
        "whose nearest neighbours are nearer to the cell's type, for label transfer by neighbours, where clustering "
        "cuts it finer; or the pathway tokens (encoder_mean, pathway_mean, pathway_concat, pathway_codes)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="autocast dtype: bfloat16 is the fast choice on a GPU and, from the small preset up, on a "
        "CPU with bf16 matrix units (Intel AMX); h_C is within about 1%% of float32 for most cells",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the model under torch.compile (dynamic shapes; "
        "the first batch pays the compilation): about 1.1x the cells/s on CPU, see benchmarks/results/",
    )
    _add_console_flags(parser, "transformers' loading reports")
    return parser


def parse_embed_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """`scpalm embed`'s arguments, with the parser, which reports the errors found once the files are opened."""
    parser = embed_parser()
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
    args.model = str(model_dir)
    return parser, args


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scpalm evaluate",
        formatter_class=HelpFormatter,
        description="Score cell embeddings with scib-metrics (bio conservation; with --batch_key, batch correction and "
        "the scIB total, 0.6 bio + 0.4 batch) and the paper's Leiden-1.0 ARI / NMI. Writes scib_results.csv, .md and "
        "scib-metrics' figure (.svg) to --output_dir. Needs the `evaluate` extra.",
    )
    parser.add_argument(
        "--input", required=True, help="an .h5ad holding the embeddings in obsm (e.g. `scpalm embed`'s output)"
    )
    parser.add_argument("--label_key", required=True, help="the obs column of cell types")
    parser.add_argument("--batch_key", help="the obs column of batches: adds the batch-correction metrics")
    parser.add_argument("--obsm", nargs="+", default=["X_scpalm"], help="the embeddings to score (obsm keys)")
    parser.add_argument(
        "--unintegrated_obsm",
        help="with --batch_key: the embedding batch correction is measured "
        "against (default: X_pca when the file has it, else a PCA of the log-normalised X)",
    )
    parser.add_argument(
        "--is_normalized",
        action="store_true",
        help="X holds log1p(normalised counts), not counts (for the default unintegrated PCA)",
    )
    parser.add_argument("--output_dir", required=True, help="where the table and the figure are written")
    parser.add_argument("--n_jobs", type=int, default=1, help="processes for the neighbour search")
    parser.add_argument("--seed", type=int, default=0, help="seeds the PCA and the Leiden clustering")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    return parser


def resolve_layer(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`--use_raw` is `--layer raw` (raw/X and its genes); both at once is an error."""
    if args.use_raw:
        if args.layer:
            parser.error("give --layer or --use_raw, not both")
        args.layer = "raw"


def _add_console_flags(parser: argparse.ArgumentParser, verbose_shows: str):
    parser.add_argument("--verbose", action="store_true", help=f"also show {verbose_shows}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _check_config_overrides(parser: argparse.ArgumentParser, preset: str, overrides: str):
    """Overrides are checked on the preset before any work: a wrong one must not cost a dataset build first."""
    from huggingface_hub.errors import StrictDataclassError

    from .configuration_scpalm import ScPaLMConfig

    keys = [item.split("=", 1)[0].strip() for item in overrides.split(",")]
    if "num_genes" in keys:
        parser.error("--config_overrides cannot set num_genes: the vocabulary of the data (or of --init_from) sets it")
    try:
        config = ScPaLMConfig.from_preset(preset)
        config.update_from_string(overrides)
        config.validate()
    except (ValueError, TypeError, StrictDataclassError) as error:
        parser.error(f"--config_overrides {overrides!r}: {error.__cause__ or error}")
