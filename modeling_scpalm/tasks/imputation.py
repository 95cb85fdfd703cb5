"""Imputation, the paper's protocol (section 4.4, Table 1): hide some of each cell's non-zero values, predict them.

For each cell, a tenth of its non-zero genes are drawn without replacement with probability proportional to
exp(-x) (x the log-normalised value: low values, the likeliest dropouts, are hidden most), set to zero, and the
model's reconstruction of the hidden entries is scored by RMSE and MAE against their true values.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..data_scpalm import inference_batches


@dataclass
class MaskedCells:
    """Cells with some non-zero values hidden, and where they were."""

    cells: sp.csr_matrix  # the input with the hidden values removed (log-normalised, vocabulary order)
    rows: np.ndarray  # (hidden,) cell of each hidden value, in increasing order
    columns: np.ndarray  # (hidden,) its gene
    values: np.ndarray  # (hidden,) its true value


def mask_for_imputation(cells: sp.csr_matrix, fraction: float = 0.1, seed: int = 0) -> MaskedCells:
    """Hide `fraction` of each cell's non-zero values (at least one), drawn with probability proportional to exp(-x)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}.")
    cells = sp.csr_matrix(cells, dtype=np.float32, copy=True)
    cells.eliminate_zeros()
    counts = np.diff(cells.indptr)
    if len(counts) == 0:
        raise ValueError("There are no cells: nothing to hide.")
    if (counts < 2).any():
        raise ValueError(f"{int((counts < 2).sum())} cell(s) have fewer than 2 non-zero values: nothing to hide.")
    # Weighted sampling without replacement by exponential race: the k smallest E_i / w_i, E_i ~ Exp(1).
    rng = np.random.default_rng(seed)
    race = rng.exponential(size=cells.nnz) / np.exp(-cells.data.astype(np.float64))
    row_of_entry = np.repeat(np.arange(cells.shape[0]), counts)
    order = np.lexsort((race, row_of_entry))  # each cell's entries, by race time
    rank_in_cell = np.arange(cells.nnz) - cells.indptr[row_of_entry[order]]
    to_hide = np.maximum(1, np.round(fraction * counts).astype(int))
    hidden = order[rank_in_cell < to_hide[row_of_entry[order]]]
    masked = MaskedCells(
        cells=cells, rows=row_of_entry[hidden], columns=cells.indices[hidden].copy(), values=cells.data[hidden].copy()
    )
    cells.data[hidden] = 0.0
    cells.eliminate_zeros()
    return masked


def imputation_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RMSE and MAE between predicted and true values of the hidden entries."""
    error = np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error)))}


@torch.no_grad()
def impute_with_model(
    model, processor, masked: MaskedCells, measured_gene_mask: np.ndarray, batch_size: int | None = None
):
    """A stage-1 model's reconstruction (`ScPaLMForPathwayReconstruction`) at the hidden entries, in batches of cells
    of similar lengths (`inference_batches`: `batch_size` cells each, or sized by their gene vectors' bytes by
    default)."""
    weight = next(model.parameters())
    device = weight.device
    model.eval()
    measured = torch.from_numpy(np.asarray(measured_gene_mask)).to(device)
    batches = inference_batches(
        np.diff(masked.cells.indptr), model.config.hidden_size, device, batch_size, weight.dtype
    )
    # Each cell's place in the batches' order; the hidden entries sorted by their cell's place make each batch's
    # entries one slice.
    place = np.empty(masked.cells.shape[0], dtype=np.int64)
    place[np.concatenate(batches)] = np.arange(masked.cells.shape[0])
    entry_places = place[masked.rows]
    entries = np.argsort(entry_places, kind="stable")
    batch_starts = np.cumsum([0] + [len(rows) for rows in batches])
    bounds = np.searchsorted(entry_places[entries], batch_starts)
    predicted = np.empty(len(masked.values), dtype=np.float32)
    for rows, batch_start, begin, end in zip(batches, batch_starts, bounds[:-1], bounds[1:]):
        inputs = {name: tensor.to(device) for name, tensor in processor.pad(masked.cells[rows]).items()}
        reconstruction = model(**inputs, measured_gene_mask=measured).reconstruction.float().cpu().numpy()
        batch_entries = entries[begin:end]
        predicted[batch_entries] = reconstruction[
            entry_places[batch_entries] - batch_start, masked.columns[batch_entries]
        ]
    return predicted


def mean_imputation(masked: MaskedCells) -> np.ndarray:
    """The floor: each gene's mean over the cells as they are seen (hidden values as zeros)."""
    gene_means = np.asarray(masked.cells.mean(axis=0)).ravel()
    return gene_means[masked.columns]
