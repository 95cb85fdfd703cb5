"""Turns single-cell data (AnnData, or a scipy/numpy matrix with gene names) into scPaLM model inputs.

The processor owns the model's gene vocabulary. Input genes are matched to it by symbol or Ensembl ID (version suffix
and case ignored); input genes that map to the same vocabulary gene are summed. Raw counts are normalised to
`target_sum` per cell (library size over all input genes, as `scanpy.pp.normalize_total`) and log1p-transformed;
data that is already log-normalised passes with `is_normalized=True`. Each cell becomes its non-zero
(gene id, value) pairs, and the vocabulary genes the data measured at all become `measured_gene_mask`, so one model
serves gene panels of any size. It saves with the model (`preprocessor_config.json`).
"""

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

_ENSEMBL_ID = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$", re.IGNORECASE)


def gene_key(name: str) -> str:
    """The matching key of a gene symbol or Ensembl ID: upper case, Ensembl version suffix removed."""
    name = str(name).strip()
    ensembl = _ENSEMBL_ID.match(name)
    return (ensembl.group(1) if ensembl else name).upper()


def anndata_gene_ids(adata, column: str = "gene_ids") -> list[str] | None:
    """An AnnData's (or its `var` table's) per-gene IDs (Ensembl, usually) from `var[column]`, if it has that column."""
    var = adata if hasattr(adata, "columns") else adata.var  # a DataFrame, or an AnnData
    return var[column].astype(str).tolist() if column in var else None


@dataclass
class GeneMatch:
    """How the input genes map onto the vocabulary."""

    vocabulary_index: np.ndarray  # (num_input_genes,) vocabulary id of each input gene, -1 when unmatched
    num_vocabulary_genes: int
    unmatched_examples: list[str] = field(default_factory=list)

    @property
    def num_input_genes(self) -> int:
        return len(self.vocabulary_index)

    @property
    def num_matched_input_genes(self) -> int:
        return int((self.vocabulary_index >= 0).sum())

    @property
    def num_measured_vocabulary_genes(self) -> int:
        return len(np.unique(self.vocabulary_index[self.vocabulary_index >= 0]))

    def __str__(self) -> str:
        collapsed = self.num_matched_input_genes - self.num_measured_vocabulary_genes
        text = (
            f"matched {self.num_matched_input_genes:,} of {self.num_input_genes:,} input genes to "
            f"{self.num_measured_vocabulary_genes:,} of {self.num_vocabulary_genes:,} vocabulary genes"
        )
        if collapsed:
            text += f" ({collapsed:,} duplicates summed)"
        if self.unmatched_examples:
            text += f"; unmatched e.g. {', '.join(self.unmatched_examples)}"
        return text


PROCESSOR_AUTO_CLASSES = ("AutoFeatureExtractor", "AutoProcessor")
MIN_VOCABULARY_COVERAGE = 0.3  # below this share of the vocabulary measured, the processor warns


class ScPaLMProcessor(FeatureExtractionMixin):
    r"""
    Args:
        gene_names (`list[str]`): the vocabulary, in model order (symbols, or IDs where no symbol is known).
        gene_ids (`list[str]`, *optional*): an Ensembl ID per vocabulary gene ("" where unknown), also matched.
        target_sum (`float`): counts per cell after library-size normalisation (paper: 1e4).

    Example:

    ```python
    >>> processor = ScPaLMProcessor.from_anndata([adata])  # vocabulary from training data
    >>> inputs = processor(adata)  # gene_ids, gene_values, attention_mask, measured_gene_mask
    >>> outputs = model(**inputs)
    ```"""

    model_input_names = ["gene_ids", "gene_values", "attention_mask", "measured_gene_mask"]

    def __init__(self, gene_names: list[str], gene_ids: list[str] | None = None, target_sum: float = 1e4, **kwargs):
        super().__init__(**kwargs)
        if len(gene_names) == 0:
            raise ValueError("The gene vocabulary is empty: build it with `ScPaLMProcessor.from_anndata(...)`.")
        if gene_ids is not None and len(gene_ids) != len(gene_names):
            raise ValueError(f"`gene_ids` has {len(gene_ids)} entries for {len(gene_names)} `gene_names`.")
        if not target_sum > 0:
            raise ValueError(f"`target_sum` must be > 0, got {target_sum}.")
        self.gene_names = [str(name) for name in gene_names]
        self.gene_ids = [str(gene_id) for gene_id in gene_ids] if gene_ids is not None else None
        self.target_sum = float(target_sum)
        self._lookup = self._build_lookup()
        self._last_match: tuple[tuple, GeneMatch] | None = None

    # -- vocabulary -----------------------------------------------------------------------------------------------

    @classmethod
    def from_anndata(cls, adatas, gene_id_column: str = "gene_ids", **kwargs) -> "ScPaLMProcessor":
        """A vocabulary from the union of the genes of one or several AnnData (sorted, duplicates collapsed)."""
        adatas = adatas if isinstance(adatas, (list, tuple)) else [adatas]
        vocabulary: dict[str, tuple[str, str]] = {}
        for adata in adatas:
            ids = anndata_gene_ids(adata, gene_id_column) or [""] * adata.n_vars
            for name, gene_id in zip(adata.var_names, ids):
                key = gene_key(gene_id) if gene_id and gene_id != "nan" else gene_key(name)
                known = vocabulary.get(key)
                if known is None or (not known[1] and gene_id):
                    vocabulary[key] = (str(name), gene_id if gene_id != "nan" else "")
        names, ids = zip(*sorted(vocabulary.values()))
        return cls(gene_names=list(names), gene_ids=list(ids) if any(ids) else None, **kwargs)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    def _build_lookup(self) -> dict[str, int]:
        lookup: dict[str, int] = {}
        for index, name in enumerate(self.gene_names):
            lookup.setdefault(gene_key(name), index)
        for index, gene_id in enumerate(self.gene_ids or []):
            if gene_id:
                lookup.setdefault(gene_key(gene_id), index)
        return lookup

    def match_genes(self, gene_names, gene_ids=None) -> GeneMatch:
        """Map input genes to the vocabulary; an input Ensembl ID is tried before its symbol."""
        gene_names = [str(name) for name in gene_names]
        gene_ids = [str(gene_id) for gene_id in gene_ids] if gene_ids is not None else [""] * len(gene_names)
        if len(gene_ids) != len(gene_names):
            raise ValueError(f"{len(gene_ids)} gene ids given for {len(gene_names)} gene names: pass one per gene.")
        index = np.full(len(gene_names), -1, dtype=np.int64)
        for position, (name, gene_id) in enumerate(zip(gene_names, gene_ids)):
            found = self._lookup.get(gene_key(gene_id)) if gene_id and gene_id != "nan" else None
            index[position] = found if found is not None else self._lookup.get(gene_key(name), -1)
        unmatched = [gene_names[i] for i in np.flatnonzero(index < 0)[:5]]
        return GeneMatch(vocabulary_index=index, num_vocabulary_genes=self.num_genes, unmatched_examples=unmatched)

    def _cached_match(self, gene_names, gene_ids) -> GeneMatch:
        """Matching is per gene list, not per batch: reuse the last match when the genes are the same."""
        key = (tuple(map(str, gene_names)), tuple(map(str, gene_ids)) if gene_ids is not None else None)
        if self._last_match is None or self._last_match[0] != key:
            match = self.match_genes(gene_names, gene_ids)
            if match.num_matched_input_genes == 0:
                raise ValueError(
                    f"None of the {match.num_input_genes:,} input genes (e.g. {', '.join(match.unmatched_examples)}) "
                    f"is in the model's vocabulary (e.g. {', '.join(self.gene_names[:5])}). Pass gene symbols or "
                    "Ensembl IDs as `var_names` or in `var['gene_ids']`, for the species the model was trained on."
                )
            logger.info(f"scPaLM processor: {match}")
            if match.num_matched_input_genes < 0.5 * match.num_input_genes:
                warnings.warn(f"Only a few genes matched the vocabulary: {match}.", stacklevel=3)
            elif match.num_measured_vocabulary_genes < MIN_VOCABULARY_COVERAGE * self.num_genes:
                warnings.warn(
                    f"The input covers {match.num_measured_vocabulary_genes / self.num_genes:.1%} of the model's "
                    f"vocabulary ({match}), under {MIN_VOCABULARY_COVERAGE:.0%}: each token pools only the genes "
                    "measured, so these cells embed unlike the ones the model learned on. Likely causes: a subset of "
                    "genes (highly variable genes only: pass all measured genes, e.g. `adata.raw` / --use_raw), "
                    "another gene panel, or another species.",
                    stacklevel=3,
                )
            self._last_match = (key, match)
        return self._last_match[1]

    # -- data -----------------------------------------------------------------------------------------------------

    def transform(
        self, expression, gene_names=None, gene_ids=None, is_normalized: bool = False, first_row: int = 0
    ) -> tuple[sp.csr_matrix, np.ndarray]:
        """
        Cells x input genes -> (cells x vocabulary CSR of log-normalised float32 values, measured-gene mask).
        `first_row` is the first cell's row in a larger matrix read in chunks, for the row numbers errors name.

        Raises `ValueError` / `TypeError` on NaN, infinite, negative or non-numeric values, non-integer counts when
        `is_normalized=False`, a gene list that does not fit the matrix or matches nothing, and cells without counts.
        """
        if hasattr(expression, "to_memory"):  # a backed AnnData's X (anndata's on-disk sparse matrix)
            expression = expression.to_memory()
        matrix = expression if sp.issparse(expression) else np.asarray(expression)
        if matrix.dtype != bool and (not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix)):
            raise TypeError(
                f"Expression values must be real numbers, got dtype {matrix.dtype}: convert the matrix first."
            )
        matrix = sp.csr_matrix(matrix)
        if matrix.shape[0] == 0:
            raise ValueError("The expression matrix has no cells (0 rows): pass at least one cell.")
        if gene_names is None or len(gene_names) != matrix.shape[1]:
            raise ValueError(
                f"The matrix has {matrix.shape[1]:,} genes (columns) but "
                f"{'no' if gene_names is None else len(gene_names)} "
                "gene names were given: pass one name per column (cells are rows)."
            )
        _check_values(matrix, is_normalized, self.target_sum)
        match = self._cached_match(gene_names, gene_ids)

        matrix = matrix.astype(np.float64)
        if is_normalized:
            linear = matrix.copy()
            linear.data = np.expm1(linear.data)  # duplicates are summed on the linear scale
        else:
            library_size = np.asarray(matrix.sum(axis=1)).ravel()
            _check_nonempty(library_size == 0, "have no counts at all", first_row)
            linear = sp.diags(self.target_sum / library_size) @ matrix

        columns = np.flatnonzero(match.vocabulary_index >= 0)
        mapping = sp.csr_matrix(
            (np.ones(len(columns)), (columns, match.vocabulary_index[columns])), shape=(matrix.shape[1], self.num_genes)
        )
        mapped = (linear @ mapping).tocsr()
        mapped.eliminate_zeros()
        _check_nonempty(np.diff(mapped.indptr) == 0, "express none of the model's vocabulary genes", first_row)
        mapped.data = np.log1p(mapped.data)
        mapped.sort_indices()
        measured = np.zeros(self.num_genes, dtype=bool)
        measured[match.vocabulary_index[columns]] = True
        return mapped.astype(np.float32), measured

    @staticmethod
    def pad(cells: sp.csr_matrix, return_tensors: str = "pt", pad_to_multiple_of: int | None = None) -> BatchFeature:
        """Rows of a vocabulary CSR -> padded `gene_ids`, `gene_values` and `attention_mask` (no per-cell loop), as
        wide as the longest cell, rounded up to `pad_to_multiple_of` when given."""
        cells = cells.tocsr()
        lengths = np.diff(cells.indptr)
        width = max(int(lengths.max(initial=0)), 1)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        rows = np.repeat(np.arange(cells.shape[0]), lengths)
        positions = np.arange(cells.nnz) - np.repeat(cells.indptr[:-1], lengths)
        gene_ids = np.zeros((cells.shape[0], width), dtype=np.int64)
        gene_values = np.zeros((cells.shape[0], width), dtype=np.float32)
        attention_mask = np.zeros((cells.shape[0], width), dtype=bool)
        gene_ids[rows, positions] = cells.indices
        gene_values[rows, positions] = cells.data
        attention_mask[rows, positions] = True
        data = {"gene_ids": gene_ids, "gene_values": gene_values, "attention_mask": attention_mask}
        return BatchFeature(data, tensor_type=return_tensors)

    def __call__(
        self,
        data,
        gene_names=None,
        gene_ids=None,
        is_normalized: bool = False,
        layer: str | None = None,
        gene_id_column: str = "gene_ids",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """
        Args:
            data: an `AnnData` (genes from `var_names` and `var[gene_id_column]`, values from `X` or `layers[layer]`),
                or a cells x genes scipy sparse matrix / numpy array with `gene_names` (and optionally `gene_ids`).
            is_normalized: the values are already library-size normalised and log1p-transformed.

        Returns:
            `BatchFeature` with `gene_ids`, `gene_values`, `attention_mask` (batch x max non-zero genes) and
            `measured_gene_mask` (num_genes,), ready for `model(**inputs)`.
        """
        if hasattr(data, "var_names") and hasattr(data, "obs_names"):  # AnnData, without importing anndata
            gene_names = list(data.var_names)
            gene_ids = anndata_gene_ids(data, gene_id_column)
            data = data.layers[layer] if layer is not None else data.X
        elif layer is not None:
            raise ValueError("`layer` applies to AnnData input only.")
        cells, measured = self.transform(data, gene_names, gene_ids, is_normalized)
        inputs = self.pad(cells, return_tensors=None)
        inputs["measured_gene_mask"] = measured
        return BatchFeature(dict(inputs), tensor_type=return_tensors)

    def to_dict(self) -> dict:
        return {
            "feature_extractor_type": type(self).__name__,
            # With processing_scpalm.py beside it (save_pretrained copies it), the folder loads without this package:
            # `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
            "auto_map": {
                auto_class: f"processing_scpalm.{type(self).__name__}" for auto_class in PROCESSOR_AUTO_CLASSES
            },
            "gene_names": self.gene_names,
            "gene_ids": self.gene_ids,
            "target_sum": self.target_sum,
        }


def _check_values(matrix: sp.csr_matrix, is_normalized: bool, target_sum: float):
    values = matrix.data
    if not np.isfinite(values).all():
        raise ValueError(
            f"The expression matrix holds {int((~np.isfinite(values)).sum()):,} NaN or infinite values: "
            "replace or drop them before embedding."
        )
    if (values < 0).any():
        raise ValueError(
            f"The expression matrix holds {int((values < 0).sum()):,} negative values: scPaLM needs raw counts "
            "(or log1p-normalised values with is_normalized=True / --is_normalized), not scaled or z-scored data. If "
            "the file should hold counts, it may be damaged: check it opens and sums as expected, or copy it again."
        )
    if not is_normalized and not np.array_equal(values, np.round(values)):
        raise ValueError(
            "The expression matrix holds non-integer values but `is_normalized=False` expects raw counts: pass raw "
            "counts (e.g. `layer='counts'` or `layer='raw'` for `adata.raw`; the CLI's --layer counts / --layer raw), "
            "or `is_normalized=True` (--is_normalized) if the values are already library-size normalised and "
            "log1p-transformed."
        )
    if is_normalized and values.size:
        # Counts read as log values overflow in expm1 and give NaN embeddings: refuse what log1p(counts per
        # target_sum) cannot be. A gene reaches at most log1p(target_sum), when it holds all of its cell's counts.
        ceiling = float(np.log1p(target_sum))
        largest = float(values.max())
        if np.array_equal(values, np.round(values)):
            raise ValueError(
                "`is_normalized=True` (the CLI's --is_normalized), but every value is a whole number: these look like "
                "raw counts. Leave `is_normalized` off for raw counts; the processor normalises them itself."
            )
        if largest > ceiling * (1 + 1e-3):
            raise ValueError(
                f"`is_normalized=True` (the CLI's --is_normalized), but the largest value is {largest:.4g}, above "
                f"log1p({target_sum:g}) = {ceiling:.2f}, the most a gene can reach in a cell normalised to "
                f"{target_sum:g} counts. Pass raw counts without `is_normalized`, or values normalised to that total "
                "and log1p-transformed."
            )


def _check_nonempty(empty: np.ndarray, what: str, first_row: int = 0):
    if empty.any():
        raise ValueError(
            f"{int(empty.sum()):,} cells {what} (first at rows {(np.flatnonzero(empty)[:5] + first_row).tolist()}): "
            "remove them "
            "first, e.g. `sc.pp.filter_cells(adata, min_counts=1)` on the genes the model knows."
        )


ScPaLMProcessor.register_for_auto_class("AutoFeatureExtractor")  # save_pretrained copies this file beside the config

__all__ = ["GeneMatch", "ScPaLMProcessor", "anndata_gene_ids", "gene_key"]
