"""From `.h5ad` files to one pretraining set over one gene vocabulary, stored as sharded Hugging Face `datasets`.

Each file is read from disk a chunk of cells at a time, so a corpus larger than memory is never loaded whole. A cell
becomes its non-zero (vocabulary id, log-normalised value) pairs, the id of its file's gene panel (the vocabulary
genes that file measured), a `cell_index` that seeds its stage-2 views and, with a `batch_key`, the index of its
batch among all files' batches (for batch-conditioned decoding). Cells with no counts on the vocabulary's
genes are dropped and counted. The panels are saved beside the data (`gene_panels.json`); `ScPaLMDataCollator` turns
them back into per-cell masks.
Data handling lives here, apart from the model files that ship to the Hub.
"""

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .processing_scpalm import GeneMatch, ScPaLMProcessor, anndata_gene_ids

PANELS_FILE = "gene_panels.json"
PARTIAL_MARK = ".partial-"  # `.<name>.partial-<pid>`: a folder or file still being written by process <pid>
BUILD_REPORT_FILE = "build_report.txt"  # what was kept and dropped, for people and the model card


@dataclass
class FileReport:
    path: str
    num_cells: int
    num_dropped_cells: int
    gene_match: GeneMatch

    def __str__(self) -> str:
        return (
            f"{Path(self.path).name}: kept {self.num_cells - self.num_dropped_cells:,} of {self.num_cells:,} cells "
            f"({self.num_dropped_cells:,} without counts on vocabulary genes dropped); {self.gene_match}"
        )


@dataclass
class BuildReport:
    files: list[FileReport] = field(default_factory=list)
    num_train_cells: int = 0
    num_eval_cells: int = 0
    batches: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [str(report) for report in self.files]
        if self.batches:
            more = ", ..." if len(self.batches) > 10 else ""
            lines.append(f"{len(self.batches)} batches: {', '.join(self.batches[:10])}{more}")
        lines.append(f"{self.num_train_cells:,} training and {self.num_eval_cells:,} held-out evaluation cells")
        return "\n".join(lines)


def build_pretraining_dataset(
    train_files: list[str | Path],
    output_dir: str | Path,
    processor: ScPaLMProcessor | None = None,
    eval_fraction: float = 0.05,
    is_normalized: bool = False,
    layer: str | None = None,
    chunk_size: int = 10_000,
    max_shard_size: str | int = "500MB",
    seed: int = 0,
    progress: bool = True,
    batch_key: str | None = None,
) -> tuple[ScPaLMProcessor, BuildReport]:
    """
    Write `output_dir` (a `DatasetDict` with "train" and "eval" splits, plus `gene_panels.json` and the processor).

    Args:
        train_files: `.h5ad` files with raw counts in `X` (or `layers[layer]`; `layer="raw"` reads `raw/X` and its
            genes), genes as `var_names` and optionally Ensembl IDs in `var["gene_ids"]`; their gene panels may differ.
        processor: the vocabulary to map onto; by default one is built from the union of the files' genes.
        eval_fraction: share of cells (drawn at random with `seed`) held out for the evaluation loss.
        batch_key: an `obs` column every file has (technology, donor, lab, ...): each cell keeps its batch's index
            among the sorted union of the files' batches, written to `gene_panels.json` (`load_batches`).

    Raises:
        FileNotFoundError: a file does not exist. ValueError: `output_dir` already holds a dataset, or a file's
            values are not counts (see `ScPaLMProcessor.transform`).
    """
    import anndata

    train_files = [Path(path) for path in train_files]
    missing = [str(path) for path in train_files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Training file(s) not found: {', '.join(missing)}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} exists and is not empty: pick a new folder, or delete it first.")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction}.")

    genes = [_file_genes(path, layer) for path in train_files]  # a missing layer or a broken file stops here
    batches = [_file_batches(path, batch_key) for path in train_files] if batch_key else None
    if processor is None:
        processor = ScPaLMProcessor.from_anndata([anndata.AnnData(var=var) for var in genes])
    # Built under a temporary name beside `output_dir` and renamed when complete: a build that is interrupted leaves
    # no half-written dataset at `output_dir` (only the hidden folder, removed by the next build).
    remove_stale_partials(output_dir)
    staging = partial_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _datasets_bars_off():
            report = _write_dataset(
                train_files,
                staging,
                processor,
                eval_fraction,
                is_normalized,
                layer,
                chunk_size,
                max_shard_size,
                seed,
                progress,
                batches,
            )
        if output_dir.exists():
            output_dir.rmdir()  # empty, as checked above: the rename needs the name free
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return processor, report


def _write_dataset(
    train_files,
    output_dir,
    processor,
    eval_fraction,
    is_normalized,
    layer,
    chunk_size,
    max_shard_size,
    seed,
    progress,
    batches,
) -> "BuildReport":
    """The dataset, its panels, processor and report, written into `output_dir`."""
    import datasets

    build = _BuildState(processor, is_normalized, layer, chunk_size, progress)
    columns = {
        "gene_ids": datasets.Sequence(datasets.Value("int32")),
        "gene_values": datasets.Sequence(datasets.Value("float32")),
        "panel": datasets.Value("int32"),
        "cell_index": datasets.Value("int64"),
    }
    batch_names = []
    if batches:
        batch_names = sorted(set().union(*map(set, batches)))
        columns["batch"] = datasets.Value("int32")
        build.batch_codes = [np.searchsorted(batch_names, labels).astype(np.int32) for labels in batches]
    features = datasets.Features(columns)
    # One generator call per file (datasets shards the list arguments); `build` collects the reports and panels.
    try:
        dataset = datasets.Dataset.from_generator(
            _cell_records,
            features=features,
            cache_dir=str(output_dir / ".cache"),
            gen_kwargs={
                "paths": [str(p) for p in train_files],
                "panel_ids": list(range(len(train_files))),
                "build": build,
            },
        )
    except datasets.exceptions.DatasetGenerationError as error:
        shutil.rmtree(output_dir / ".cache", ignore_errors=True)
        # A file's bad values: our message, naming the file, rather than the library's generic wrapper.
        if isinstance(error.__cause__, (ValueError, TypeError)):
            raise error.__cause__ from None
        raise
    if eval_fraction > 0:
        splits = dataset.train_test_split(test_size=eval_fraction, seed=seed)
        dataset_dict = datasets.DatasetDict({"train": splits["train"], "eval": splits["test"]})
    else:
        dataset_dict = datasets.DatasetDict({"train": dataset})
    dataset_dict.save_to_disk(str(output_dir / "cells"), max_shard_size=max_shard_size)
    shutil.rmtree(output_dir / ".cache", ignore_errors=True)
    panels = [build.panels[panel_id] for panel_id in range(len(train_files))]
    (output_dir / PANELS_FILE).write_text(
        json.dumps({"num_genes": processor.num_genes, "panels": panels, "batches": batch_names})
    )
    processor.save_pretrained(output_dir)
    report = BuildReport(files=[build.reports[panel_id] for panel_id in range(len(train_files))], batches=batch_names)
    report.num_train_cells = len(dataset_dict["train"])
    report.num_eval_cells = len(dataset_dict["eval"]) if "eval" in dataset_dict else 0
    (output_dir / BUILD_REPORT_FILE).write_text(str(report) + "\n")
    return report


def open_h5ad_matrix(file, layer: str | None = None):
    """The cells x genes matrix of an open `.h5ad` (an `h5py.File`) without loading it, and its genes' `var` table:
    `X`, `layers[layer]`, or `raw/X` for `layer="raw"`. A sparse matrix comes back as anndata's on-disk sparse
    dataset, a dense one as the h5py dataset: both slice by rows."""
    import h5py
    from anndata.io import read_elem, sparse_dataset

    if layer == "raw":
        if "raw" not in file:
            raise ValueError(
                "`layer='raw'` (--use_raw) but the file has no `raw`: name a layer, or leave it out to read X."
            )
        element, var = file["raw/X"], file["raw/var"]
    elif layer is None:
        element, var = file["X"], file["var"]
    else:
        layers = sorted(file["layers"]) if "layers" in file else []
        if layer not in layers:
            raise ValueError(
                f"The file has no layer {layer!r}: its layers are {layers or 'none'}; 'raw' reads raw/X, and no layer "
                "reads X."
            )
        element, var = file["layers"][layer], file["var"]
    matrix = element if isinstance(element, h5py.Dataset) else sparse_dataset(element)
    return matrix, read_elem(var)


@contextlib.contextmanager
def _datasets_bars_off():
    """datasets' own bars (generating, splitting, saving) would only repeat ours, which counts the cells read."""
    import datasets

    were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


def partial_path(path: Path) -> Path:
    """The temporary name beside `path` that this process writes it under before renaming it into place."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")


def remove_stale_partials(path: Path):
    """Deletes what interrupted processes left while writing `path` (`partial_path`s of processes that are gone); a
    partial whose process still runs is left alone."""
    for leftover in path.parent.glob(f".{path.name}{PARTIAL_MARK}*") if path.parent.is_dir() else []:
        pid = leftover.name.rsplit(PARTIAL_MARK, 1)[1].split(".")[0]
        if pid.isdigit() and _process_is_running(int(pid)):
            continue
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@dataclass
class _BuildState:
    processor: ScPaLMProcessor
    is_normalized: bool
    layer: str | None
    chunk_size: int
    progress: bool
    reports: dict[int, FileReport] = field(default_factory=dict)
    panels: dict[int, list[int]] = field(default_factory=dict)
    num_cells: int = 0  # written so far: the next cell's `cell_index`
    batch_codes: list[np.ndarray] | None = None  # each file's cells' batch indices, with a batch key


def _cell_records(paths: list[str], panel_ids: list[int], build: _BuildState):
    """Yield each cell of the files as its non-zero (vocabulary id, value) pairs and its panel id, reading each file a
    chunk of cells at a time from disk."""
    import h5py
    from tqdm.auto import tqdm

    processor = build.processor
    for path, panel_id in zip(paths, panel_ids):
        with h5py.File(path, "r") as file:
            source, var = open_h5ad_matrix(file, build.layer)
            gene_names, gene_ids = list(var.index), anndata_gene_ids(var)
            match = processor.match_genes(gene_names, gene_ids)
            matched_columns = match.vocabulary_index >= 0
            num_cells = source.shape[0]
            report = build.reports[panel_id] = FileReport(path, num_cells, 0, match)
            build.panels[panel_id] = np.unique(match.vocabulary_index[matched_columns]).tolist()
            for start in tqdm(range(0, num_cells, build.chunk_size), desc=Path(path).name, disable=not build.progress):
                matrix = sp.csr_matrix(source[start : start + build.chunk_size])
                keep = np.asarray(matrix[:, matched_columns].sum(axis=1)).ravel() > 0
                report.num_dropped_cells += int((~keep).sum())
                if not keep.any():
                    continue
                try:
                    cells, _ = processor.transform(
                        matrix[keep], gene_names, gene_ids, is_normalized=build.is_normalized
                    )
                except (ValueError, TypeError) as error:
                    raise type(error)(f"{path}: {error}") from None
                batch_codes = None
                if build.batch_codes:
                    batch_codes = build.batch_codes[panel_id][start : start + build.chunk_size][keep]
                for row in range(cells.shape[0]):
                    begin, end = cells.indptr[row], cells.indptr[row + 1]
                    record = {
                        "gene_ids": cells.indices[begin:end].astype(np.int32),
                        "gene_values": cells.data[begin:end],
                        "panel": panel_id,
                        "cell_index": build.num_cells,
                    }
                    if batch_codes is not None:
                        record["batch"] = batch_codes[row]
                    yield record
                    build.num_cells += 1


def _file_genes(path: Path, layer: str | None):
    """The `var` table of the genes a file's `layer` holds (raw/var for 'raw'); read without the cells."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            return open_h5ad_matrix(file, layer)[1]
    except (OSError, KeyError) as error:  # h5py's messages for truncated or non-HDF5 files
        raise ValueError(
            f"{path} could not be read as an .h5ad file ({error}): is it complete, and written by anndata?"
        ) from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _file_batches(path: Path, batch_key: str) -> np.ndarray:
    """Each cell's batch label (as text) from the file's `obs[batch_key]`, read without the cells."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as file:
        obs = file["obs"]
        if batch_key not in obs:
            columns = sorted(key for key in obs if not key.startswith("_") and key != "__categories")
            raise ValueError(
                f"{path} has no obs column {batch_key!r} (--batch_key): its columns are {columns or 'none'}. Every "
                "training file needs the batch column; add it (one value for a file that is one batch)."
            )
        labels = np.asarray(read_elem(obs[batch_key]), dtype=object)
    import pandas as pd

    missing = pd.isna(labels)
    if missing.any():
        raise ValueError(
            f"{path}: {int(missing.sum()):,} cells have no value in obs[{batch_key!r}]: fill them (e.g. 'unknown')."
        )
    return labels.astype(str)


def load_batches(dataset_dir: str | Path) -> list[str]:
    """The batches a dataset was built with (`batch_key`), in the order of the cells' `batch` indices; [] if none."""
    return json.loads((Path(dataset_dir) / PANELS_FILE).read_text()).get("batches", [])


def load_pretraining_dataset(dataset_dir: str | Path, streaming: bool = False, num_shards: int = 8):
    """The saved `DatasetDict`, memory-mapped (or as `IterableDataset`s when `streaming`), and its gene panels."""
    import datasets

    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / PANELS_FILE).is_file():
        raise FileNotFoundError(f"{dataset_dir} holds no scPaLM dataset: build one with `build_pretraining_dataset`.")
    dataset_dict = datasets.load_from_disk(str(dataset_dir / "cells"))
    if streaming:
        dataset_dict = datasets.IterableDatasetDict(
            {name: split.to_iterable_dataset(num_shards=num_shards) for name, split in dataset_dict.items()}
        )
    return dataset_dict, load_gene_panels(dataset_dir)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """
    Random batches of cells with similar numbers of non-zero genes (Transformers' length grouping: shuffle, sort
    within mega-batches of 50 batches), so that a batch is not padded to its one deep cell: on pbmc3k with the
    CEL-seq2 mixology cells (~7,100 non-zeros against ~1,000) random batches are padded several-fold. The order
    depends on the seed and the epoch alone (`set_epoch`), so a resumed run sees the batches the unbroken one saw.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = list(map(int, lengths)), batch_size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def load_gene_panels(dataset_dir: str | Path) -> torch.Tensor:
    """(panels, num_genes) bool: the vocabulary genes each source file measured."""
    saved = json.loads((Path(dataset_dir) / PANELS_FILE).read_text())
    panels = torch.zeros(len(saved["panels"]), saved["num_genes"], dtype=torch.bool)
    for panel_id, gene_ids in enumerate(saved["panels"]):
        panels[panel_id, gene_ids] = True
    return panels


# On CPU, a batch's gene vectors (padded gene entries x hidden values) are kept to 8 MiB, a budget in bytes so that it
# follows the dtype: large CPU batches pay for fresh memory that the allocator maps and faults in anew for every big
# tensor (`benchmarks/results/batching.md`, docs/design.md). GPUs take `ACCELERATOR_BATCH_SIZE` cells.
CPU_BATCH_BYTES = 2**23
ACCELERATOR_BATCH_SIZE = 256
# Inference pads a batch to a multiple of this many genes, and sizes CPU batches by that width: the batches of a width
# then have one shape, and their tensors reuse the memory the last one freed. With every batch a different shape,
# glibc's heap fragmented and peak memory about doubled (docs/design.md).
INFERENCE_PAD_MULTIPLE = 128


def inference_batches(
    lengths: np.ndarray,
    hidden_size: int,
    device: torch.device,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[np.ndarray]:
    """
    Cells sorted by their number of non-zero genes (`lengths`), so that a batch pads little, cut into batches of row
    indices: `batch_size` cells each when given; by default on CPU as many as keep the padded batch's gene vectors
    (cells x its longest cell, rounded up to `INFERENCE_PAD_MULTIPLE`, x `hidden_size` values of `dtype`, the dtype
    the model computes in) within
    `CPU_BATCH_BYTES` (at least one cell), elsewhere `ACCELERATOR_BATCH_SIZE`.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive number of cells, got {batch_size}.")
    order = np.argsort(lengths, kind="stable")
    if batch_size is not None or device.type != "cpu":
        size = batch_size or ACCELERATOR_BATCH_SIZE
        return [order[start : start + size] for start in range(0, len(order), size)]
    max_entries = max(CPU_BATCH_BYTES // (hidden_size * dtype.itemsize), 1)
    sorted_lengths = -(-np.maximum(lengths[order], 1) // INFERENCE_PAD_MULTIPLE) * INFERENCE_PAD_MULTIPLE
    batches, start = [], 0
    while start < len(order):
        # No more than max_entries // (the batch's shortest cell) cells fit; padded to its last (longest) cell, a
        # batch's entries grow with every cell added, so the cells that fit are a prefix of the window.
        window = sorted_lengths[start : start + max_entries // sorted_lengths[start]]
        fits = int((np.arange(1, len(window) + 1) * window <= max_entries).sum())
        end = start + max(fits, 1)
        batches.append(order[start:end])
        start = end
    return batches


__all__ = [
    "BuildReport",
    "LengthGroupedSampler",
    "build_pretraining_dataset",
    "inference_batches",
    "load_batches",
    "load_gene_panels",
    "load_pretraining_dataset",
]
