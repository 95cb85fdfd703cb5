r"""Fine-tune scPaLM's cell classifier on labelled cells with `Trainer` (as transformers' `run_mae.py`).

    python training/finetune.py --model_name_or_path runs/tiny/stage_2 --train_file cells.h5ad \
        --label_column cell_type --output_dir runs/classifier --tuning lora --num_train_epochs 3

The classifier starts at a logistic regression on the training cells' pretrained h_C (`--no_probe_init`: at random).
`--tuning full` trains everything, `frozen` the classifier alone, `lora` low-rank adapters on the encoders' attention
(peft) plus the classifier. A stratified share of the cells (`--eval_fraction`) is held out; accuracy and macro-F1
are computed on it with scikit-learn (no Hub metric).
"""

import argparse
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np

FINETUNING_DEFAULTS = {
    "learning_rate": 5e-4,
    "num_train_epochs": 10,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 64,
    "warmup_steps": 0.05,
    "save_strategy": "no",
    "report_to": "none",
}
# The Trainer options most runs set, shown by `--help`; `--help_all` lists every TrainingArguments field.
COMMON_TRAINING_OPTIONS = {
    "output_dir": "where the classifier, its processor and the evaluation metrics are written (required)",
    "learning_rate": "AdamW's peak learning rate",
    "num_train_epochs": "passes over the training cells",
    "per_device_train_batch_size": "cells per batch and device",
    "seed": "the split, the classifier's initialisation and the batches (default: 42)",
    "bf16": "bfloat16 mixed precision (GPUs, and CPUs with bf16 units)",
    "train_sampling_strategy": "`group_by_length` batches cells of similar non-zero counts (less padding)",
}


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "an .h5ad of raw counts with labels in an obs column"})
    label_column: str = field(default="cell_type", metadata={"help": "the obs column holding the labels"})
    eval_fraction: float = field(default=0.2, metadata={"help": "stratified share of cells held out"})
    layer: str | None = field(default=None, metadata={"help": "take counts from this layer instead of X"})
    is_normalized: bool = field(default=False, metadata={"help": "values are already log1p(normalised counts)"})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a pretrained scPaLM folder (model and processor)"})
    tuning: str = field(default="full", metadata={"help": "full, frozen (classifier only) or lora"})
    lora_rank: int = field(default=8, metadata={"help": "with --tuning lora: the adapters' rank"})
    lora_alpha: int = field(default=16, metadata={"help": "with --tuning lora: the adapters' scale numerator"})
    probe_init: bool = field(
        default=True,
        metadata={
            "help": "start the classifier at a logistic regression on the training cells' pretrained h_C "
            "(--no_probe_init: at random)"
        },
    )


def classification_metrics(eval_prediction) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits  # the outputs also carry the cell embeddings
    predictions = np.argmax(logits, axis=-1)
    labels = eval_prediction.label_ids
    return {"accuracy": accuracy_score(labels, predictions), "macro_f1": f1_score(labels, predictions, average="macro")}


def initialise_classifier_from_probe(model, cells, collator, batch_size: int = 256) -> None:
    """Linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): set the classifier to the logistic regression
    that best separates the training cells' pretrained h_C, so that fine-tuning starts from a good head instead of
    sending a random head's gradients through the pretrained encoders. The regression's strength is chosen by
    cross-validation on the training cells alone."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    with torch.no_grad():
        for start in range(0, len(cells), batch_size):
            batch = collator([cells[index] for index in range(start, min(start + batch_size, len(cells)))])
            labels.append(batch.pop("labels").numpy())
            embeddings.append(model.scpalm(**batch).cell_embedding.float().numpy())
    model.train(was_training)
    features, labels = np.concatenate(embeddings), np.concatenate(labels)
    probe = LogisticRegression(max_iter=2000)
    if np.bincount(labels).max() >= 3:
        probe = GridSearchCV(probe, {"C": np.logspace(-2, 2, 5)}, cv=3).fit(features, labels).best_estimator_
    else:  # too few cells to cross-validate
        probe.fit(features, labels)
    # Classes missing from the training cells keep logits that never win; a binary probe has one row for class 1.
    coefficients = probe.coef_ if len(probe.classes_) > 2 else np.stack([np.zeros_like(probe.coef_[0]), probe.coef_[0]])
    intercepts = probe.intercept_ if len(probe.classes_) > 2 else np.array([0.0, probe.intercept_[0]])
    weight = torch.zeros_like(model.classifier.weight)
    bias = torch.full_like(model.classifier.bias, float(intercepts.min()) - 10.0)
    rows = torch.as_tensor(probe.classes_)
    weight[rows] = torch.as_tensor(coefficients, dtype=weight.dtype)
    bias[rows] = torch.as_tensor(intercepts, dtype=bias.dtype)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)


def short_help(prog: str) -> str:
    """The script's own options and the common Trainer ones, without importing transformers."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other transformers.TrainingArguments option is accepted too: `--help_all` lists them all.",
    )
    for arguments in (ModelArguments, DataArguments):
        group = parser.add_argument_group(arguments.__name__)
        for item in fields(arguments):
            default = "required" if item.default is MISSING else f"default: {item.default}"
            group.add_argument(f"--{item.name}", help=f"{item.metadata.get('help', '')} ({default})".lstrip())
    trainer = parser.add_argument_group("TrainingArguments (the common ones)")
    for name, text in COMMON_TRAINING_OPTIONS.items():
        default = f" (default: {FINETUNING_DEFAULTS[name]})" if name in FINETUNING_DEFAULTS else ""
        trainer.add_argument(f"--{name}", help=f"{text}{default}")
    return parser.format_help()


def main(argv=None, prog: str = "training/finetune.py"):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(short_help(prog))
        raise SystemExit(0)
    import anndata
    import datasets
    import torch
    from sklearn.model_selection import train_test_split
    from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

    from .collator_scpalm import ScPaLMDataCollator
    from .modeling_scpalm import ScPaLMForCellClassification
    from .processing_scpalm import ScPaLMProcessor, anndata_gene_ids

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=prog)
    if "--help_all" in argv:
        parser.print_help()
        raise SystemExit(0)
    # Trainer's defaults (5e-5 for 3 epochs of 8 cells) suit a large language model's fine-tuning; a new classifier
    # over h_C needs a higher rate and more passes (docs/design.md has the measurement).
    parser.set_defaults(**FINETUNING_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the collator needs each cell's `panel`, which forward() does not take
    if model_args.tuning not in ("full", "frozen", "lora"):
        parser.error(f"--tuning must be full, frozen or lora, got {model_args.tuning!r}")
    if not Path(data_args.train_file).is_file():
        parser.error(f"--train_file {data_args.train_file}: no such file")
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        parser.error(f"{output_dir} exists and is not empty: choose a new --output_dir")
    adata = anndata.read_h5ad(data_args.train_file)
    if data_args.label_column not in adata.obs:
        parser.error(f"--label_column {data_args.label_column!r} is not in obs; it has: {', '.join(adata.obs.columns)}")
    column = adata.obs[data_args.label_column]
    if column.isna().any():
        parser.error(
            f"{int(column.isna().sum()):,} cells have no label in obs[{data_args.label_column!r}]: "
            "drop them first, e.g. "
            f"adata[adata.obs[{data_args.label_column!r}].notna()].write_h5ad(...)"
        )
    sizes = column.astype(str).value_counts()
    if (sizes < 2).any():
        parser.error(
            "classes with a single cell cannot be split into training and evaluation cells: "
            f"{', '.join(map(repr, sizes.index[sizes < 2]))}; drop or merge them first"
        )

    processor = ScPaLMProcessor.from_pretrained(model_args.model_name_or_path)
    matrix = adata.layers[data_args.layer] if data_args.layer else adata.X
    cells, measured = processor.transform(matrix, adata.var_names, anndata_gene_ids(adata), data_args.is_normalized)
    names = sorted(adata.obs[data_args.label_column].astype(str).unique())
    labels = (
        adata.obs[data_args.label_column].astype(str).map({name: index for index, name in enumerate(names)}).to_numpy()
    )
    # A `datasets.Dataset` with each cell's non-zero count as `length`: `--train_sampling_strategy group_by_length`
    # then batches cells of similar length (less padding), as pretraining does.
    rows = datasets.Dataset.from_dict(
        {
            "gene_ids": np.split(cells.indices, cells.indptr[1:-1]),
            "gene_values": np.split(cells.data, cells.indptr[1:-1]),
            "panel": np.zeros(cells.shape[0], dtype=np.int64),
            "labels": labels,
            training_args.length_column_name: np.diff(cells.indptr),
        }
    ).with_format("numpy")
    train_indices, eval_indices = train_test_split(
        np.arange(len(rows)), test_size=data_args.eval_fraction, stratify=labels, random_state=training_args.seed
    )
    train_rows, eval_rows = rows.select(train_indices), rows.select(eval_indices)

    set_seed(training_args.seed)  # the new classifier's initialisation, as the rest of the run, follows --seed
    model = ScPaLMForCellClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    collator = ScPaLMDataCollator(torch.from_numpy(measured)[None])
    if model_args.probe_init:
        initialise_classifier_from_probe(model, train_rows, collator)
    if model_args.tuning == "frozen":
        model.scpalm.requires_grad_(False)
    elif model_args.tuning == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_rank,
            lora_alpha=model_args.lora_alpha,
            target_modules=["qkv"],
            modules_to_save=["classifier"],
        )
        model = get_peft_model(model, lora)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model()
    processor.save_pretrained(output_dir)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
