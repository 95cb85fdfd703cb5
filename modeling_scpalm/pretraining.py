"""Pretrain scPaLM: stage 1 (pathway reconstruction), then stage 2 (cell aggregation) from the stage-1 weights.

`main(argv)` is `scpalm pretrain` and `training/pretrain.py`; its arguments, and what the run folder holds, are
described in `arguments.py` (`scpalm pretrain --help`). It runs on one CPU, several processes or several GPUs
(under `accelerate launch` or torchrun).
"""

import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arguments import DEFAULT_EPOCHS, DEFAULT_GENE_VALUES, DEFAULT_MAX_STEPS, DEFAULT_MIN_STEPS, parse_pretrain_args

STAGE_LEARNING_RATES = {1: 2e-3, 2: 2e-3}  # section 4.1 has 1e-3 and 5e-4: docs/design.md
# A stage whose held-out reconstruction ends above this share of the mean-expression floor learned nothing.
NOTHING_LEARNED_RATIO = 0.995
CHECKPOINT_NAME = re.compile(r"step_(\d+)")  # a complete checkpoint; `step_<k>.partial` is one being written
PARTIAL_SUFFIX = ".partial"
LOCK_FILE = ".scpalm-run.lock"  # held by the run writing the folder
WHITENING_MAX_CELLS = 20_000  # h_C's readout is fitted on at most this many training cells
PRINCIPAL_AXES_CELLS = 20_000  # the expression read starts at the principal axes of at most this many
# Genes whose training variance is below this share of the mean gene's are scaled as if it were this share.
GENE_SCALE_VARIANCE_FLOOR = 0.01
# Batches are compared within this many k-means groups of similar cells, each batch's cells in a group counted from
# this many, re-estimated this many times (docs/design.md, batch-aware pretraining).
BATCH_GROUPS, BATCH_GROUP_MIN_CELLS, BATCH_ROUNDS = 30, 5, 2


def default_max_steps(
    steps_per_epoch: int, num_epochs: float | None, batch_size: int, mean_genes_per_cell: float
) -> int:
    """Optimizer steps of a stage: `num_epochs` passes when given; else `DEFAULT_EPOCHS` passes held within
    [DEFAULT_MIN_STEPS, DEFAULT_MAX_STEPS] and within `DEFAULT_GENE_VALUES` expressed genes seen, at least one pass."""
    if num_epochs is not None:
        return max(1, math.ceil(num_epochs * steps_per_epoch))
    affordable = DEFAULT_GENE_VALUES // max(1, round(batch_size * mean_genes_per_cell))
    steps = min(DEFAULT_MAX_STEPS, affordable, max(DEFAULT_MIN_STEPS, DEFAULT_EPOCHS * steps_per_epoch))
    return max(steps_per_epoch, steps)


def run_folder_contents(output_dir: Path) -> list[Path]:
    """What a run folder holds, less the lock and what an interrupted dataset build left (the next build removes it)."""
    from .data_scpalm import PARTIAL_MARK

    if not output_dir.is_dir():
        return []
    return [path for path in output_dir.iterdir() if path.name != LOCK_FILE and PARTIAL_MARK not in path.name]


class RunFolderInUse(RuntimeError):
    """Another run holds the lock on this run folder."""


def _lock_run_folder(output_dir: Path, accelerator):
    """An exclusive lock on the run folder, held by the main process until the run ends (the system releases it when
    the process dies, however it dies): a second run pointed at the folder stops instead of writing into it."""
    from contextlib import nullcontext

    from filelock import FileLock, Timeout

    if not accelerator.is_main_process:
        return nullcontext()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return FileLock(output_dir / LOCK_FILE).acquire(timeout=0)  # released when the `with` block ends
    except Timeout:
        raise RunFolderInUse(
            f"Another run is writing {output_dir} (it holds {output_dir / LOCK_FILE}): wait for it to end, or choose "
            "another --output_dir."
        ) from None


def main(argv=None) -> Path:
    """`scpalm pretrain`: both stages (or one) on the files or dataset the arguments name; returns the model folder."""
    return pretrain(parse_pretrain_args(argv))


def pretrain(args) -> Path:
    """Pretraining with arguments parsed by `parse_pretrain_args`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers.utils import logging as transformers_logging

    # Launched as several processes without CUDA, accelerate treats each process as alone unless asked for CPU
    # mode (then it joins them with gloo): ask, so `accelerate launch --multi_gpu` and torchrun just work on CPUs.
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # Each epoch's order is a function of the seed and the epoch, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    backend = f", {accelerator.state.backend}" if accelerator.num_processes > 1 else ""
    accelerator.print(f"Training on {accelerator.num_processes} process(es){backend}, {accelerator.device}")
    if args.verbose:
        accelerator.print(accelerator.state)
    output_dir = Path(args.output_dir)
    verbosity = transformers_logging.get_verbosity()
    if args.verbose:
        transformers_logging.set_verbosity_info()
    try:
        with _lock_run_folder(output_dir, accelerator):
            return _run(args, accelerator, output_dir)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _run(args, accelerator, output_dir: Path) -> Path:
    dataset_dir = Path(args.dataset_dir) if args.dataset_dir else output_dir / "dataset"
    if args.train_file and accelerator.is_main_process and not dataset_dir.exists():
        from .data_scpalm import build_pretraining_dataset
        from .processing_scpalm import ScPaLMProcessor

        _, report = build_pretraining_dataset(
            args.train_file,
            dataset_dir,
            processor=ScPaLMProcessor.from_pretrained(Path(args.init_from) / "stage_1") if args.init_from else None,
            eval_fraction=args.eval_fraction,
            is_normalized=args.is_normalized,
            layer=args.layer,
            seed=args.seed,
            batch_key=args.batch_key,
        )
        accelerator.print(report)
    accelerator.wait_for_everyone()

    from .data_scpalm import load_batches, load_pretraining_dataset
    from .processing_scpalm import ScPaLMProcessor

    dataset, panels = load_pretraining_dataset(dataset_dir)
    processor = ScPaLMProcessor.from_pretrained(dataset_dir)
    mean_expression, gene_variance, lengths = _training_statistics(dataset["train"], processor.num_genes)
    data = TrainingData(
        dataset, panels, processor, mean_expression, gene_variance, lengths, len(load_batches(dataset_dir))
    )
    stages = {"1": [1], "2": [2], "both": [1, 2]}[args.stage]
    stage_dirs = [Path(args.stage_one_model)] if args.stage_one_model else []
    for stage in stages:
        stage_dirs.append(run_stage(stage, args, accelerator, data, stage_dirs[-1] if stage_dirs else None))

    model_dir = output_dir / "model"
    if accelerator.is_main_process:
        from .hub_scpalm import export_model, push_to_hub

        export_model(stage_dirs, model_dir, dataset_dir, args.hub_model_id, args.dataset_name, args.license)
        accelerator.print(f"Model, processor and model card: {model_dir}")
        if args.push_to_hub:
            pushed = push_to_hub(model_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            accelerator.print(f"Pushed to {pushed}")
    accelerator.wait_for_everyone()
    return model_dir


def _cell_model_from_stage_one(stage_one_dir, config, verbose: bool = False):
    """
    Stage 2's model on stage 1's weights. Its heads (cell decoder, mask token, contrastive head) are new by design,
    so transformers' missing-weights report, a warning listing each, is silenced unless `verbose`; anything else
    missing is an error.
    """
    from transformers.utils import logging as transformers_logging

    from .modeling_scpalm import PRETRAINING_HEAD_KEYS, ScPaLMForCellPretraining

    # Through the library's verbosity: an explicit level on `transformers.modeling_utils` makes transformers 5 list
    # every layer as "not sharded" by tensor parallelism.
    verbosity = transformers_logging.get_verbosity()
    if not verbose:
        transformers_logging.set_verbosity_error()
    try:
        model, loading_info = ScPaLMForCellPretraining.from_pretrained(
            stage_one_dir, config=config, output_loading_info=True
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    # The cell encoder is stage 2's too: a stage-1 folder holds it untrained, or not all of it (the expression read).
    new_keys = [*PRETRAINING_HEAD_KEYS, r"cell_encoder\."]
    missing = [key for key in loading_info["missing_keys"] if not any(re.search(head, key) for head in new_keys)]
    if missing:
        raise ValueError(
            f"{stage_one_dir} lacks weights stage 2 needs ({', '.join(missing[:5])}, ...): is it a stage-1 folder "
            "of an scPaLM run?"
        )
    return model


@dataclass
class TrainingData:
    """What both stages read: the dataset's splits and panels, its processor, each gene's mean (a fresh decoder's
    bias) and variance (the expression read's gene scaling), each training cell's number of non-zero genes (length
    grouping) and how many batches it has."""

    dataset: object
    panels: torch.Tensor
    processor: object
    mean_expression: torch.Tensor
    gene_variance: torch.Tensor
    lengths: np.ndarray
    num_batches: int = 0


def run_stage(stage: int, args, accelerator, data: TrainingData, stage_one_dir: Path | None) -> Path:
    """Trains one stage and saves it to `output_dir/stage_<stage>`: its model, data loaders, optimiser and schedule,
    the loop (with checkpoints, logs and evaluations) and its summary, each in a function of its own."""
    from accelerate.utils import set_seed

    from .hub_scpalm import TRAINING_SUMMARY_FILE

    stage_dir = Path(args.output_dir) / f"stage_{stage}"
    if args.resume_from_checkpoint and (stage_dir / TRAINING_SUMMARY_FILE).exists():
        accelerator.print(f"Stage {stage} finished before the run stopped: {stage_dir}")
        return stage_dir
    # A stage's initialisation and data order depend on the seed alone, not on whether the stage before it ran in
    # this process: a run resumed in stage 2 builds what the unbroken run built.
    set_seed(args.seed + stage)
    model = _stage_model(stage, args, data, stage_one_dir)
    collator, train_loader, eval_loader = _stage_loaders(stage, args, accelerator, model.config, data)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_batch_size = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    genes_per_cell = _genes_read_per_cell(data.lengths, model.config.max_genes_per_cell)
    max_steps = (
        args.max_steps
        if args.max_steps is not None
        else default_max_steps(steps_per_epoch, args.num_epochs, total_batch_size, genes_per_cell)
    )
    learning_rate = args.learning_rate if args.learning_rate is not None else STAGE_LEARNING_RATES[stage]
    optimizer, scheduler = _optimizer_and_schedule(model, args, learning_rate, max_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    loop = _TrainingLoop(stage, args, accelerator, model, optimizer, scheduler, collator, stage_dir, total_batch_size)
    record, eval_record = loop.run(train_loader, eval_loader, steps_per_epoch, max_steps)
    floor = None if eval_loader is None else mean_expression_loss(eval_loader, data.mean_expression, accelerator)
    if accelerator.is_main_process:
        _warn_if_nothing_learned(stage, eval_record, floor, learning_rate)
    if stage == 2:
        _fit_cell_embedding_whitening(accelerator.unwrap_model(model), data, args, accelerator)

    _check_processes_agree(accelerator, model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(stage_dir)
        data.processor.save_pretrained(stage_dir)
        summary = {
            "stage": stage,
            "preset": None if args.init_from else args.preset,
            "init_from": args.init_from,
            "config_overrides": args.config_overrides,
            "steps": loop.completed_steps,
            "batch_size": total_batch_size,
            "learning_rate": learning_rate,
            "num_processes": accelerator.num_processes,
            "group_by_length": args.group_by_length,
            "mixed_precision": accelerator.mixed_precision,
            "train_loss": round(record["loss"], 5),
            "eval_loss": round(eval_record["eval_loss"], 5) if eval_record else None,
            "eval_reconstruction_loss": round(eval_record["eval_reconstruction_loss"], 5) if eval_record else None,
            "eval_mean_expression_loss": round(floor, 5) if floor is not None else None,
            "seed": args.seed,
        }
        _write_summary(accelerator, stage_dir, summary)
    accelerator.wait_for_everyone()
    # `save_state` saves every object ever prepared: let the next stage's checkpoints hold its own alone.
    accelerator.free_memory()
    return stage_dir


def _fit_cell_embedding_whitening(model, data: TrainingData, args, accelerator):
    """Fits h_C's readout (`ScPaLMCellEncoder.fit_whitening`) to the trained cell token's output on up to
    `WHITENING_MAX_CELLS` training cells, the same ones on every process, with their batches when the data has them."""
    from torch.utils.data import DataLoader

    from .collator_scpalm import ScPaLMDataCollator

    if model.config.cell_embedding_whitening_power == 0 and not model.config.num_batches:
        return
    train = data.dataset["train"]
    rows = np.sort(np.random.default_rng(args.seed).permutation(len(train))[:WHITENING_MAX_CELLS])
    loader = DataLoader(
        train.select(rows),
        batch_size=args.per_device_batch_size,
        collate_fn=ScPaLMDataCollator.for_stage(model.config, data.panels, 1),
    )
    keys = ("gene_ids", "gene_values", "attention_mask", "measured_gene_mask")
    base, embeddings, batch_ids = model.scpalm, [], []
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            output = base(**{key: batch[key].to(accelerator.device) for key in keys})
            embeddings.append(output.raw_cell_embedding.float().cpu())
            if "batch_ids" in batch:
                batch_ids.append(batch["batch_ids"])
    embeddings = torch.cat(embeddings)
    directions = batch_directions(base.cell_encoder, embeddings, torch.cat(batch_ids), args.seed) if batch_ids else None
    base.cell_encoder.fit_whitening(embeddings, directions)


def batch_directions(cell_encoder, embeddings: torch.Tensor, batch_ids: torch.Tensor, seed: int) -> torch.Tensor | None:
    """The `(hidden, <= B - 1)` orthonormal directions along which the raw h_C of B batches' cells differ, or None for
    one batch: first between the batches' means, then `BATCH_ROUNDS` times within k-means groups of similar cells
    (clustered on the readout with the directions so far projected out), so that batches that hold different cell
    types in different shares do not count that difference as theirs. Leaves `cell_encoder`'s readout refitted."""
    from sklearn.cluster import KMeans

    batches = batch_ids.unique()
    centred = embeddings.double() - embeddings.double().mean(0)
    groups, directions = torch.zeros(len(centred), dtype=torch.long), None
    for round_ in range(BATCH_ROUNDS + 1):
        shifts = []
        for group in groups.unique():
            in_group = groups == group
            members = [in_group & (batch_ids == batch) for batch in batches]
            members = [rows for rows in members if rows.sum() >= BATCH_GROUP_MIN_CELLS]
            if len(members) > 1:
                group_mean = centred[in_group].mean(0)
                shifts += [(centred[rows].mean(0) - group_mean) * rows.sum().sqrt() for rows in members]
        if not shifts:
            break
        _, singular_values, components = torch.linalg.svd(torch.stack(shifts), full_matrices=False)
        kept = singular_values[: len(batches) - 1] > singular_values[0] * 1e-6
        directions = components[: len(batches) - 1][kept].T
        if round_ == BATCH_ROUNDS:
            break
        cell_encoder.fit_whitening(embeddings, directions)
        kmeans = KMeans(min(BATCH_GROUPS, len(centred)), n_init=3, random_state=seed)
        groups = torch.as_tensor(kmeans.fit_predict(cell_encoder.whiten(embeddings).numpy()))
    return directions


def _stage_model(stage: int, args, data: TrainingData, stage_one_dir: Path | None):
    """The stage's model: stage 1 fresh from the preset, or from the earlier run's stage 1 (`--init_from`); stage 2
    from this run's stage 1, or the earlier run's stage 2 on top of this run's adapted stage 1."""
    from .configuration_scpalm import ScPaLMConfig
    from .modeling_scpalm import ScPaLMForCellPretraining, ScPaLMForPathwayReconstruction

    init_dir = Path(args.init_from) / f"stage_{stage}" if args.init_from else None
    source_dir = init_dir or (stage_one_dir if stage == 2 else None)
    if source_dir is None:
        config = ScPaLMConfig.from_preset(args.preset, num_genes=data.processor.num_genes)
    else:
        config = ScPaLMConfig.from_pretrained(source_dir)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
        config.validate()
    if config.num_batches not in (0, data.num_batches):
        raise ValueError(
            f"{source_dir} decodes with {config.num_batches} batches but the dataset has {data.num_batches}: its batch "
            "vectors would not match these batches. Pretrain afresh, or build the data with the same batch column."
        )
    # A batch-unaware model adapted to data with batches gets new, untrained batch vectors.
    config.num_batches = data.num_batches
    model_class = ScPaLMForPathwayReconstruction if stage == 1 else ScPaLMForCellPretraining
    if source_dir is None:
        model = model_class(config)
    elif stage == 2 and init_dir is None:
        model = _cell_model_from_stage_one(stage_one_dir, config, args.verbose)
    else:
        model = model_class.from_pretrained(source_dir, config=config)
    if stage == 2 and init_dir:
        adapted = ScPaLMForPathwayReconstruction.from_pretrained(stage_one_dir).scpalm
        for module, adapted_module in zip(model.scpalm.pathway_modules(), adapted.pathway_modules()):
            module.load_state_dict(adapted_module.state_dict())
    elif init_dir is None:
        # A fresh decoder starts at each gene's mean, the reconstruction loss's floor.
        (model.decoder if stage == 1 else model.cell_decoder).initialize_gene_bias(data.mean_expression)
        if stage == 2 and model.scpalm.cell_encoder.expression_weight is not None:
            scale = gene_scale_factors(data.gene_variance, config.expression_read_gene_scaling)
            axes = principal_axes(data.dataset["train"], config.num_genes, config.hidden_size, args.seed, scale)
            model.scpalm.cell_encoder.initialize_expression_read(axes)
    return model


def gene_scale_factors(variance: torch.Tensor, power: float) -> torch.Tensor | None:
    """`(num_genes,)` factors sd**-power for each gene's values (its training standard deviation, floored at
    `GENE_SCALE_VARIANCE_FLOOR` of the mean gene's variance), rescaled so that the scaled cells' total variance is the
    cells' own; None for power 0, or when no gene varies. A softened form of z-scoring genes before a PCA: genes of
    little variance, such as markers expressed in few cells, count for more beside the few genes of large variance."""
    if power == 0 or not (variance > 0).any():
        return None
    variance = variance.double()
    floor = GENE_SCALE_VARIANCE_FLOOR * variance[variance > 0].mean()
    scale = variance.clamp_min(floor).pow(-power / 2)
    return (scale * (variance.sum() / (scale.square() * variance).sum()).sqrt()).float()


def principal_axes(
    train,
    num_genes: int,
    rank: int,
    seed: int,
    gene_scale: torch.Tensor | None = None,
    max_cells: int = PRINCIPAL_AXES_CELLS,
) -> torch.Tensor:
    """`(num_genes, rank)`: the first principal axes of the training cells' log-normalised values (at most `max_cells`
    of them, drawn with `seed`). With `gene_scale` (`(num_genes,)`, `gene_scale_factors`) they are the axes of the
    cells with each gene's values multiplied by its factor, and each gene's row is multiplied by it again, so that a
    cell's values times the result are its coordinates on the scaled cells' axes. With a `batch` column each cell is
    centred on its batch's mean rather than on the mean of all cells, as batchelor's multiBatchPCA centres them: the
    axes then follow the variation within the batches, not the differences between them, which the batch-aware
    decoders are told anyway. Randomized subspace iteration on the sparse matrix, the centring applied as a low-rank
    correction so that no dense cells x genes matrix is formed (Halko et al. 2011)."""
    if len(train) > max_cells:
        train = train.select(np.sort(np.random.default_rng(seed).choice(len(train), max_cells, replace=False)))
    cells = train.with_format("numpy")[:]
    lengths = np.fromiter((len(genes) for genes in cells["gene_ids"]), dtype=np.int64, count=len(train))
    genes = np.concatenate(cells["gene_ids"]).astype(np.int64)
    values = np.concatenate(cells["gene_values"]).astype(np.float32)
    if gene_scale is not None:
        values = values * gene_scale.numpy()[genes]
    matrix = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([np.repeat(np.arange(len(train)), lengths), genes])),
        torch.from_numpy(values),
        (len(train), num_genes),
        check_invariants=True,
    ).coalesce()
    # CSR products are an order of magnitude faster than COO ones on CPU.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        rows, columns = matrix.to_sparse_csr(), matrix.t().coalesce().to_sparse_csr()
    batch = cells["batch"].astype(np.int64) if "batch" in cells else np.zeros(len(train), dtype=np.int64)
    membership = torch.nn.functional.one_hot(torch.from_numpy(batch)).float()  # (cells, batches)
    means = (torch.sparse.mm(columns, membership) / membership.sum(0).clamp_min(1)).T  # (batches, genes)

    def centred(vectors):  # (X - membership @ means) @ vectors
        return torch.sparse.mm(rows, vectors) - membership @ (means @ vectors)

    def centred_transposed(vectors):  # (X - membership @ means)^T @ vectors
        return torch.sparse.mm(columns, vectors) - means.T @ (membership.T @ vectors)

    # Ten directions beyond `rank` sharpen the last ones (Halko et al.'s oversampling).
    width = min(rank + 10, len(train), num_genes)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(centred(torch.randn(num_genes, width, generator=generator))).Q
    for _ in range(4):
        basis = torch.linalg.qr(centred(torch.linalg.qr(centred_transposed(basis)).Q)).Q
    axes = torch.linalg.svd(centred_transposed(basis).T, full_matrices=False).Vh[:rank].T
    if gene_scale is not None:
        axes = axes * gene_scale[:, None]
    # Fewer cells or genes than `rank`: the remaining columns stay at zero.
    return torch.nn.functional.pad(axes, (0, rank - axes.shape[1]))


def _stage_loaders(stage: int, args, accelerator, config, data: TrainingData):
    """The stage's collator, and its training (length-grouped by default) and held-out loaders."""
    from torch.utils.data import DataLoader

    from .collator_scpalm import ScPaLMDataCollator
    from .data_scpalm import LengthGroupedSampler

    collator = ScPaLMDataCollator.for_stage(config, data.panels, stage, seed=args.seed)
    loader_options = {
        "batch_size": args.per_device_batch_size,
        "collate_fn": collator,
        "num_workers": args.num_workers,
        "pin_memory": accelerator.device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
    }
    if args.group_by_length:
        sampler = LengthGroupedSampler(data.lengths, args.per_device_batch_size, seed=args.seed + stage)
        train_loader = DataLoader(data.dataset["train"], sampler=sampler, drop_last=True, **loader_options)
    else:
        train_loader = DataLoader(data.dataset["train"], shuffle=True, drop_last=True, **loader_options)
    eval_loader = DataLoader(data.dataset["eval"], **loader_options) if "eval" in data.dataset else None
    return collator, train_loader, eval_loader


def _optimizer_and_schedule(model, args, learning_rate: float, max_steps: int):
    """AdamW without weight decay on biases and norms, and a linear schedule with warm-up."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for parameter in (p for p in model.parameters() if p.requires_grad):
        (decay if parameter.dim() > 1 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(args.warmup_ratio * max_steps), num_training_steps=max_steps
    )
    return optimizer, scheduler


class _TrainingLoop:
    """One stage's optimisation: resumes from its newest checkpoint, logs, evaluates and checkpoints on schedule."""

    def __init__(self, stage, args, accelerator, model, optimizer, scheduler, collator, stage_dir, total_batch_size):
        self.stage, self.args, self.accelerator = stage, args, accelerator
        self.model, self.optimizer, self.scheduler, self.collator = model, optimizer, scheduler, collator
        self.stage_dir, self.total_batch_size = stage_dir, total_batch_size
        self.checkpoints = Path(args.output_dir) / "checkpoints" / f"stage_{stage}"
        self.log_file = stage_dir / "log.jsonl"
        self.completed_steps = 0
        self.log_clock, self.steps_since_log = time.perf_counter(), 0  # restarted when training starts

    def run(self, train_loader, eval_loader, steps_per_epoch: int, max_steps: int) -> tuple[dict, dict | None]:
        """Trains to `max_steps`; returns the last training log record and the last evaluation (None without one)."""
        from tqdm.auto import tqdm

        args, accelerator, model = self.args, self.accelerator, self.model
        resume = _checkpoint_to_resume(args.resume_from_checkpoint, self.checkpoints)
        if resume is not None:
            accelerator.load_state(str(resume))
            self.completed_steps = int(CHECKPOINT_NAME.fullmatch(resume.name).group(1))
            accelerator.print(f"Resumed stage {self.stage} from {resume} at step {self.completed_steps}")
        if accelerator.is_main_process:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
        progress = tqdm(
            total=max_steps,
            initial=self.completed_steps,
            desc=f"stage {self.stage}",
            disable=not accelerator.is_local_main_process,
        )
        model.train()
        epoch = self.completed_steps // steps_per_epoch
        self.log_clock, self.steps_since_log = time.perf_counter(), 0
        record, eval_record = None, None
        # Batches of the resumed epoch that the run had already trained on.
        batches_to_skip = (self.completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
        while self.completed_steps < max_steps:
            train_loader.set_epoch(epoch)
            self.collator.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, batches_to_skip) if batches_to_skip else train_loader
            batches_to_skip = 0
            for micro_step, batch in enumerate(batches, start=self.completed_steps * args.gradient_accumulation_steps):
                output = self._step(micro_step, batch)
                if not accelerator.sync_gradients:
                    continue
                self.completed_steps += 1
                self.steps_since_log += 1
                progress.update(1)
                record = self._log(output, max_steps, progress) or record
                if eval_loader is not None and (
                    self.completed_steps % args.eval_steps == 0 or self.completed_steps == max_steps
                ):
                    eval_record = {"step": self.completed_steps, **evaluate(model, eval_loader, accelerator)}
                    _append_log(accelerator, self.log_file, eval_record)
                    self.log_clock = time.perf_counter()
                if self.completed_steps % args.checkpointing_steps == 0 and self.completed_steps < max_steps:
                    _save_checkpoint(accelerator, self.checkpoints / f"step_{self.completed_steps}")
                    self.log_clock = time.perf_counter()
                if self.completed_steps >= max_steps:
                    break
            epoch += 1
        progress.close()
        return record, eval_record

    def _step(self, micro_step: int, batch: dict):
        args, accelerator, model = self.args, self.accelerator, self.model
        # The model's own draws (code replacement, negatives) depend on the step alone, not on what the RNG saw
        # before (data loaders draw from it too): a resumed run repeats the unbroken one exactly.
        torch.manual_seed(hash((args.seed, self.stage, micro_step)) % 2**63)
        with accelerator.accumulate(model):
            output = model(**batch)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return output

    def _log(self, output, max_steps: int, progress) -> dict | None:
        """The training log record of this step, written every `logging_steps` and at the last step."""
        if self.completed_steps % self.args.logging_steps and self.completed_steps != max_steps:
            return None
        # Training speed alone: the clock restarts after evaluations and checkpoints.
        cells_per_second = self.steps_since_log * self.total_batch_size / (time.perf_counter() - self.log_clock)
        record = {
            "step": self.completed_steps,
            "lr": self.scheduler.get_last_lr()[0],
            **_loss_parts(output),
            "cells_per_second": round(cells_per_second, 1),
        }
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        _append_log(self.accelerator, self.log_file, record)
        self.log_clock, self.steps_since_log = time.perf_counter(), 0
        return record


def _write_summary(accelerator, stage_dir: Path, summary: dict):
    """Written last, and renamed into place: a stage is finished when its summary is there, so a run killed while
    saving the model trains the stage's tail again on resuming."""
    from .hub_scpalm import TRAINING_SUMMARY_FILE

    partial = stage_dir / f".{TRAINING_SUMMARY_FILE}.partial"
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, stage_dir / TRAINING_SUMMARY_FILE)
    held_out = (
        f"held-out loss {summary['eval_loss']:.4f} (reconstruction {summary['eval_reconstruction_loss']:.4f})"
        if summary["eval_loss"] is not None
        else "no held-out cells"
    )
    accelerator.print(
        f"Stage {summary['stage']}: {summary['steps']} steps, training loss {summary['train_loss']:.4f}, "
        f"{held_out}; saved to {stage_dir}"
    )


@torch.no_grad()
def _check_processes_agree(accelerator, model):
    """Every process must hold the same weights and buffers (the k-means queue and the codebook included)."""
    accelerator.wait_for_everyone()
    state = accelerator.unwrap_model(model).state_dict()
    checksum = torch.stack([tensor.double().sum() for tensor in state.values()]).to(accelerator.device)
    gathered = accelerator.gather(checksum[None])
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise RuntimeError("The processes' models diverged: their weights or buffers differ after training.")


@torch.no_grad()
def evaluate(model, eval_loader, accelerator) -> dict[str, float]:
    """Mean loss and reconstruction loss over the held-out cells (every process's share)."""
    model.eval()
    losses = []
    for batch in eval_loader:
        output = model(**batch)
        losses.append(accelerator.gather_for_metrics(torch.stack([output.loss, output.reconstruction_loss])[None]))
    model.train()
    loss, reconstruction_loss = torch.cat(losses).mean(0).tolist()
    return {"eval_loss": loss, "eval_reconstruction_loss": reconstruction_loss}


@torch.no_grad()
def mean_expression_loss(eval_loader, mean_expression: torch.Tensor, accelerator) -> float:
    """The held-out reconstruction loss (MSE over each cell's measured genes) of predicting every cell as the
    training cells' mean: the floor a stage has to get under to have learned anything from the cells."""
    from .modeling_scpalm import reconstruction_mse

    mean_expression, losses = mean_expression.to(accelerator.device), []
    for batch in eval_loader:
        inputs = (batch[key] for key in ("gene_ids", "gene_values", "attention_mask", "measured_gene_mask"))
        losses.append(accelerator.gather_for_metrics(reconstruction_mse(mean_expression, *inputs)[None]))
    return torch.cat(losses).mean().item()


def _warn_if_nothing_learned(stage: int, eval_record: dict | None, floor: float | None, learning_rate: float):
    """Say so when a stage's held-out reconstruction ends no better than the mean-expression floor: it learned
    nothing from the cells (too high a learning rate for a wider preset can collapse every cell onto one state),
    and its model would embed every cell alike."""
    if eval_record is None or eval_record["eval_reconstruction_loss"] < NOTHING_LEARNED_RATIO * floor:
        return
    warnings.warn(
        f"Stage {stage} learned nothing from the cells: its held-out reconstruction loss "
        f"({eval_record['eval_reconstruction_loss']:.4f}) is no better than predicting each gene's mean expression "
        f"({floor:.4f}). Train again with a lower --learning_rate (this run: {learning_rate:g}) or more steps "
        "(--max_steps).",
        stacklevel=2,
    )


def _loss_parts(output) -> dict[str, float]:
    names = (
        "loss",
        "reconstruction_loss",
        "token_reconstruction_loss",
        "commitment_loss",
        "contrastive_loss",
        "codebook_perplexity",
        "num_dead_codes",
    )
    return {name: float(getattr(output, name).detach()) for name in names if getattr(output, name, None) is not None}


def _append_log(accelerator, log_file: Path, record: dict):
    if accelerator.is_main_process:
        with log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _save_checkpoint(accelerator, folder: Path):
    """accelerate's state, written under a temporary name and renamed when every process has written its part: a run
    killed while saving leaves no `step_<k>` for `latest` to pick."""
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():  # the same step saved again by a run resumed from an earlier checkpoint
            shutil.rmtree(folder)
        os.replace(partial, folder)
    accelerator.wait_for_everyone()


def _checkpoint_to_resume(requested: str | None, checkpoints: Path) -> Path | None:
    """The checkpoint of this stage to resume from: the newest complete one for "latest", else the folder named, when it
    is this stage's (a checkpoint of the other stage resumes that stage, and this one starts or is done)."""
    if requested is None:
        return None
    checkpoints = checkpoints.resolve()
    if requested != "latest":
        path = Path(requested).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such checkpoint folder.")
        if path.parent.parent != checkpoints.parent or not CHECKPOINT_NAME.fullmatch(path.name):
            raise ValueError(
                f"--resume_from_checkpoint {requested} is not a checkpoint of this run: they are "
                f"{checkpoints.parent}/stage_<n>/step_<k>. Give one of those, or 'latest'."
            )
        return path if path.parent == checkpoints else None
    unfinished = sorted(path.name for path in checkpoints.glob(f"step_*{PARTIAL_SUFFIX}"))
    if unfinished:
        warnings.warn(f"Skipping {', '.join(unfinished)} in {checkpoints}: checkpoints the run did not finish writing.")
    matches = (CHECKPOINT_NAME.fullmatch(path.name) for path in checkpoints.glob("step_*"))
    saved = {int(match.group(1)): checkpoints / match.group(0) for match in matches if match}
    return saved[max(saved)] if saved else None


def _genes_read_per_cell(lengths: np.ndarray, max_genes: int) -> float:
    """The mean number of genes a training step's embedding reads per cell."""
    if not len(lengths):
        return 1.0
    return float(np.mean(np.minimum(lengths, max_genes) if max_genes else lengths))


def _training_statistics(train, num_genes: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Each vocabulary gene's mean and variance of its log-normalised value over the training cells, and each cell's
    number of non-zero genes (for length-grouped batches), in one pass over the data."""
    totals, squares, lengths = np.zeros(num_genes), np.zeros(num_genes), []
    for batch in train.with_format("numpy").iter(batch_size=10_000):
        genes = np.concatenate(batch["gene_ids"])
        values = np.concatenate(batch["gene_values"]).astype(np.float64)
        totals += np.bincount(genes, values, num_genes)
        squares += np.bincount(genes, values**2, num_genes)
        lengths.extend(len(genes) for genes in batch["gene_ids"])
    cells = max(len(train), 1)
    mean = totals / cells
    variance = np.clip(squares / cells - mean**2, 0, None)
    return torch.from_numpy(mean).float(), torch.from_numpy(variance).float(), np.asarray(lengths)


if __name__ == "__main__":
    main()
