"""Cell representations of an AnnData, read and embedded a chunk of cells at a time: the library call behind `scpalm
embed`.

The cells are read in chunks of about `CHUNK_ENTRIES` stored values, so memory follows the chunk, not the file: an
AnnData opened with `backed="r"` (or a matrix on disk) is never loaded whole. Within a chunk, cells of similar depth
are batched together (`inference_batches`); a cell's embedding does not depend on the other cells of its batch.
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .data_scpalm import (
    INFERENCE_PAD_MULTIPLE,
    inference_batches,
    open_h5ad_matrix,
    partial_path,
    remove_stale_partials,
)

# What `embed_anndata` can return per cell, from the model's output: h_C (the cell embedding), or what the ablations of
# Tables 2 and 5 use instead (the pathway tokens averaged or concatenated, the encoder output before quantization), or
# the code of each pathway token (pathway identification).
REPRESENTATIONS = {
    "cell_embedding": lambda output: output.cell_embedding,
    "raw_cell_embedding": lambda output: output.raw_cell_embedding,
    "pathway_mean": lambda output: output.pathway_tokens.mean(1),
    "pathway_concat": lambda output: output.pathway_tokens.flatten(1),
    "encoder_mean": lambda output: output.pathway_hidden_states.mean(1),
    "pathway_codes": lambda output: output.pathway_codes,
}

# Stored values read per chunk (about 2,400 pbmc3k cells): the processor holds a few float64 copies of a chunk while
# it normalises, and the chunk's batches are cut from it, so a chunk costs a few hundred MB however large the file.
CHUNK_ENTRIES = 1 << 21


def expression_matrix(adata, layer: str | None = None):
    """The cells x genes values `embed_anndata` reads: `adata.X`, `adata.layers[layer]`, or `adata.raw.X` for
    `layer="raw"` (where scanpy keeps the values a workflow started from)."""
    if layer is None:
        return adata.X
    if layer == "raw":
        if adata.raw is None:
            raise ValueError(
                "`layer='raw'` (--use_raw) but the AnnData has no `.raw`: name a layer, or leave it out to read X."
            )
        return adata.raw.X
    if layer not in adata.layers:
        raise ValueError(
            f"The AnnData has no layer {layer!r}: its layers are {sorted(adata.layers) or 'none'}; 'raw' reads "
            "adata.raw, and no layer reads X."
        )
    return adata.layers[layer]


def row_chunks(matrix, max_entries: int = CHUNK_ENTRIES) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about `max_entries` stored values each (at least one row), from the row pointers
    of a CSR matrix, in memory or on disk, and from the average row otherwise."""
    num_rows = matrix.shape[0]
    if getattr(matrix, "format", None) == "csr":  # scipy's, or anndata's on disk: n + 1 integers, cheap to read
        indptr = np.asarray((matrix.indptr if hasattr(matrix, "indptr") else matrix.group["indptr"])[:], dtype=np.int64)
        bounds, start = [], 0
        while start < num_rows:
            stop = int(np.searchsorted(indptr, indptr[start] + max_entries, side="right")) - 1
            stop = min(max(stop, start + 1), num_rows)
            bounds.append((start, stop))
            start = stop
        return bounds
    stored = matrix.group["data"].shape[0] if hasattr(matrix, "group") else getattr(matrix, "nnz", None)
    per_row = max((stored if stored is not None else num_rows * matrix.shape[1]) / max(num_rows, 1), 1.0)
    step = max(int(max_entries // per_row), 1)
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def iter_embeddings(
    model,
    processor,
    matrix,
    gene_names,
    gene_ids=None,
    batch_size: int | None = None,
    is_normalized: bool = False,
    representation: str = "cell_embedding",
    autocast_dtype: torch.dtype | None = None,
    max_entries: int = CHUNK_ENTRIES,
    progress: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields `(first_row, rows)`: the representation of consecutive cells of `matrix` (cells x genes, in memory or
    on disk), one chunk at a time."""
    from tqdm.auto import tqdm

    if representation not in REPRESENTATIONS:
        raise ValueError(f"Unknown representation {representation!r}: choose one of {sorted(REPRESENTATIONS)}.")
    if representation == "pathway_codes" and not model.config.use_quantizer:
        raise ValueError("This model has no quantizer (`config.use_quantizer` is False), so no pathway codes.")
    if matrix.shape[0] == 0:
        raise ValueError("The AnnData has no cells: nothing to embed.")
    weight = next(model.parameters())
    device = weight.device
    model.eval()
    with tqdm(total=matrix.shape[0], desc="embedding", disable=not progress, unit="cell") as bar:
        for start, stop in row_chunks(matrix, max_entries):
            cells, measured = processor.transform(
                matrix[start:stop], gene_names, gene_ids, is_normalized, first_row=start
            )
            measured = torch.from_numpy(measured).to(device)
            batches = inference_batches(
                np.diff(cells.indptr), model.config.hidden_size, device, batch_size, autocast_dtype or weight.dtype
            )
            chunk = None
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                for rows in batches:
                    padded = processor.pad(cells[rows], pad_to_multiple_of=INFERENCE_PAD_MULTIPLE)
                    inputs = {name: tensor.to(device) for name, tensor in padded.items()}
                    values = REPRESENTATIONS[representation](model(**inputs, measured_gene_mask=measured))
                    values = values.cpu().numpy() if representation == "pathway_codes" else values.float().cpu().numpy()
                    if chunk is None:
                        chunk = np.empty((cells.shape[0], *values.shape[1:]), dtype=values.dtype)
                    chunk[rows] = values
                    bar.update(len(rows))
            yield start, chunk


def embed_anndata(
    model,
    processor,
    adata,
    batch_size: int | None = None,
    is_normalized: bool = False,
    layer: str | None = None,
    progress: bool = True,
    representation: str = "cell_embedding",
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """
    One row per cell: by default h_C `(cells, hidden)`; `representation` picks another of `REPRESENTATIONS`
    (`"pathway_codes"` gives `(cells, N)` code indices). `adata` may be opened with `backed="r"`: the cells are read
    a chunk at a time. Batches hold cells with similar numbers of non-zero genes (`inference_batches`: `batch_size`
    cells each, or by default a few MiB of gene vectors on CPU, 256 cells on a GPU). `layer` reads
    `adata.layers[layer]` (`"raw"`: `adata.raw.X`). `autocast_dtype` (e.g. `torch.bfloat16` on a GPU) runs the model
    under `torch.autocast`; `model` may be `torch.compile`d.
    """
    from .processing_scpalm import anndata_gene_ids

    matrix = expression_matrix(adata, layer)
    genes = adata.raw if layer == "raw" else adata  # `.raw` has genes of its own
    gene_names, gene_ids = list(genes.var_names), anndata_gene_ids(genes)
    result = None
    for start, rows in iter_embeddings(
        model,
        processor,
        matrix,
        gene_names,
        gene_ids,
        batch_size,
        is_normalized,
        representation,
        autocast_dtype,
        progress=progress,
    ):
        if result is None:
            result = np.empty((matrix.shape[0], *rows.shape[1:]), dtype=rows.dtype)
        result[start : start + len(rows)] = rows
    return result


def embed_h5ad(
    model,
    processor,
    input_path,
    output_path,
    key: str = "X_scpalm",
    layer: str | None = None,
    is_normalized: bool = False,
    batch_size: int | None = None,
    representation: str = "cell_embedding",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    max_entries: int = CHUNK_ENTRIES,
) -> int:
    """
    Writes `output_path`: the `.h5ad` at `input_path`, byte for byte, plus the cells' representation in
    `obsm[key]`, streamed: cells are read and their rows written a chunk at a time, so memory follows the chunk, not
    the file. The output is built under a temporary name beside it and renamed when complete; an interrupted run
    leaves nothing at `output_path`. Returns the number of cells.
    """
    import h5py

    from .processing_scpalm import anndata_gene_ids

    input_path, output_path = Path(input_path), Path(output_path)
    with h5py.File(input_path, "r") as source:
        matrix, var = open_h5ad_matrix(source, layer)
        gene_names, gene_ids = list(var.index), anndata_gene_ids(var)
        # Its first cells checked before anything is written: a file of the wrong kind fails in seconds.
        processor.transform(matrix[: min(matrix.shape[0], 64)], gene_names, gene_ids, is_normalized)
    remove_stale_partials(output_path)
    partial = partial_path(output_path)
    try:
        shutil.copyfile(input_path, partial)
        with h5py.File(input_path, "r") as source, h5py.File(partial, "r+") as target:
            matrix, _ = open_h5ad_matrix(source, layer)
            obsm = target.require_group("obsm")
            if not obsm.attrs.get("encoding-type"):
                obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            if key in obsm:
                del obsm[key]
            rows_out = None
            for start, rows in iter_embeddings(
                model,
                processor,
                matrix,
                gene_names,
                gene_ids,
                batch_size,
                is_normalized,
                representation,
                autocast_dtype,
                max_entries,
                progress,
            ):
                if rows_out is None:
                    rows_out = obsm.create_dataset(key, shape=(matrix.shape[0], *rows.shape[1:]), dtype=rows.dtype)
                    rows_out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                rows_out[start : start + len(rows)] = rows
            num_cells = matrix.shape[0]
        os.replace(partial, output_path)
    finally:
        partial.unlink(missing_ok=True)
    return num_cells


__all__ = ["REPRESENTATIONS", "embed_anndata", "embed_h5ad", "expression_matrix", "iter_embeddings", "row_chunks"]
