"""Batches sparse cells for scPaLM and draws stage 2's pathway-token views."""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .configuration_scpalm import ScPaLMConfig
from .modeling_scpalm import kept_token_indices_from_noise, sample_kept_token_indices
from .processing_scpalm import ScPaLMProcessor


@dataclass
class ScPaLMDataCollator:
    """
    Pads cells (`gene_ids`, `gene_values`, `panel` features, as `build_pretraining_dataset` writes them) into a batch
    with `attention_mask` and `measured_gene_mask`. With `num_kept_tokens` set (stage 2) it also draws, for every
    cell, the sorted indices of the pathway tokens the cell encoder keeps (`kept_token_indices`) and an independent
    second view for the contrastive loss (`contrastive_kept_token_indices`). Features may carry `labels`, and a
    `batch` index (a dataset built with a `batch_key`), which becomes `batch_ids`.

    With a `seed`, a cell's views are a function of (seed, epoch, `cell_index`) alone, so they do not depend on
    DataLoader workers, processes, or a run's restart from a checkpoint; the training loop calls `set_epoch`.

    Args:
        gene_panels (`torch.BoolTensor` of shape `(panels, num_genes)`): the measured genes of each panel.
        num_pathway_tokens (`int`, *optional*): N; needed with `num_kept_tokens`.
        num_kept_tokens (`int`, *optional*): N', how many tokens each view keeps; None for stage 1 and fine-tuning.
        seed (`int`, *optional*): seeds the views (features then need `cell_index`); None draws from torch's global
            generator.
    """

    gene_panels: torch.Tensor
    num_pathway_tokens: int | None = None
    num_kept_tokens: int | None = None
    seed: int | None = None
    epoch: int = 0

    @classmethod
    def for_stage(cls, config: ScPaLMConfig, gene_panels: torch.Tensor, stage: int, seed: int | None = None):
        """The collator of pretraining stage 1 (reconstruction) or 2 (masked views); stage 1's suits fine-tuning."""
        if stage not in (1, 2):
            raise ValueError(f"`stage` is 1 or 2, got {stage}.")
        kept = config.num_kept_tokens if stage == 2 else None
        return cls(gene_panels, config.num_pathway_tokens, kept, seed)

    def __post_init__(self):
        if self.gene_panels.dim() != 2 or self.gene_panels.dtype != torch.bool:
            raise ValueError(
                f"`gene_panels` must be a (panels, num_genes) bool tensor, got {tuple(self.gene_panels.shape)} "
                f"{self.gene_panels.dtype}: use `load_gene_panels(dataset_dir)`."
            )
        if self.num_kept_tokens is not None and (
            self.num_pathway_tokens is None or not 0 < self.num_kept_tokens < self.num_pathway_tokens
        ):
            raise ValueError(
                f"`num_kept_tokens` ({self.num_kept_tokens}) must keep at least one and mask at least one of "
                f"`num_pathway_tokens` ({self.num_pathway_tokens}) tokens."
            )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(feature["gene_ids"]) for feature in features], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        gene_ids = np.concatenate([np.asarray(f["gene_ids"], dtype=np.int64) for f in features])
        values = np.concatenate([np.asarray(f["gene_values"], dtype=np.float32) for f in features])
        cells = sp.csr_matrix((values, gene_ids, indptr), shape=(len(features), self.gene_panels.shape[1]))
        padded = ScPaLMProcessor.pad(cells)
        panel_ids = torch.tensor([feature["panel"] for feature in features])
        if (panel_ids < 0).any() or (panel_ids >= self.gene_panels.shape[0]).any():
            raise ValueError(
                f"Panel ids {panel_ids.unique().tolist()} are outside the {self.gene_panels.shape[0]} known panels."
            )
        batch = {
            **padded,
            # One panel in the batch (the usual case) travels as one row, not one per cell.
            "measured_gene_mask": self.gene_panels[panel_ids[0]]
            if (panel_ids == panel_ids[0]).all()
            else self.gene_panels[panel_ids],
        }
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([feature["labels"] for feature in features])
        if "batch" in features[0]:
            batch["batch_ids"] = torch.tensor([feature["batch"] for feature in features], dtype=torch.long)
        if self.num_kept_tokens is not None:
            batch["kept_token_indices"], batch["contrastive_kept_token_indices"] = self._draw_views(features)
        return batch

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _draw_views(self, features: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seed is None:
            return tuple(
                sample_kept_token_indices(len(features), self.num_pathway_tokens, self.num_kept_tokens)
                for _ in range(2)
            )
        if "cell_index" not in features[0]:
            raise ValueError(
                "A seeded stage-2 collator needs each feature's `cell_index` (build_pretraining_dataset writes it)."
            )
        # Counter-based noise: a hash of (seed, epoch, cell, view, token), computed for the whole batch at once.
        cells = np.array([feature["cell_index"] for feature in features], dtype=np.uint64)
        tokens = np.arange(2 * self.num_pathway_tokens, dtype=np.uint64)
        stream = _splitmix64(np.uint64(self.seed) * np.uint64(1_000_003) + np.uint64(self.epoch))
        counters = stream + cells[:, None] * np.uint64(2 * self.num_pathway_tokens) + tokens
        noise = torch.from_numpy(_splitmix64(counters).view(np.int64) >> 1).view(len(features) * 2, -1)
        views = kept_token_indices_from_noise(noise, self.num_kept_tokens).view(len(features), 2, -1)
        return views[:, 0], views[:, 1]


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele et al. 2014): a well-mixed 64-bit hash of each value; uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


__all__ = ["ScPaLMDataCollator"]
