import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_scpalm import ScPaLMConfig, ScPaLMProcessor

DATA_DIR = Path(os.environ.get("SCPALM_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: set SCPALM_DATA_DIR to the folder holding the shared datasets")
    return path


@pytest.fixture(scope="session")
def pbmc3k():
    import anndata as ad

    return ad.read_h5ad(data_file("scrna/pbmc3k_2638.h5ad"))


@pytest.fixture(scope="session")
def pbmc3k_processor(pbmc3k):
    return ScPaLMProcessor.from_anndata(pbmc3k)


@pytest.fixture
def tiny_config():
    """A tiny model over a 300-gene vocabulary, for tests on random data."""
    return ScPaLMConfig.from_preset("tiny", num_genes=300, num_pathway_tokens=16, codebook_size=16)


def random_cells(num_cells: int, num_genes: int, density: float = 0.2, seed: int = 0) -> np.ndarray:
    """Log-normalised-looking values: mostly zeros, positive where expressed."""
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 0.7, size=(num_cells, num_genes)).astype(np.float32)
    values[rng.random((num_cells, num_genes)) > density] = 0.0
    values[np.arange(num_cells), rng.integers(num_genes, size=num_cells)] = 1.0  # no empty cell
    return values


def sparse_inputs(dense: np.ndarray, shuffle_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Dense cells -> padded (gene_ids, gene_values, attention_mask) by the processor's `pad`, optionally with each
    cell's genes in a shuffled order."""
    cells = sp.csr_matrix(dense)
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        # A random key within each row, sorted row by row: every cell's genes in their own random order.
        order = np.lexsort((rng.random(cells.nnz), np.repeat(np.arange(cells.shape[0]), np.diff(cells.indptr))))
        cells = sp.csr_matrix((cells.data[order], cells.indices[order], cells.indptr), shape=cells.shape)
    return dict(ScPaLMProcessor.pad(cells))
