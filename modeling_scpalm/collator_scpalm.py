"""Batches sparse cells for scPaLM and draws stage 2's pathway-token views."""

from dataclasses import dataclass, field

import numpy as np
import torch

from .configuration_scpalm import ScPaLMConfig
from .modeling_scpalm import sample_kept_token_indices


@dataclass
class ScPaLMDataCollator:
    """
    Pads cells (`gene_ids`, `gene_values`, `panel` features, as `build_pretraining_dataset` writes them) into a batch
    with `attention_mask` and `measured_gene_mask`. With `num_kept_tokens` set (stage 2) it also draws, for every
    cell, the sorted indices of the pathway tokens the cell encoder keeps (`kept_token_indices`) and an independent
    second view for the contrastive loss (`contrastive_kept_token_indices`). Features may carry `labels`.

    Args:
        gene_panels (`torch.BoolTensor` of shape `(panels, num_genes)`): the measured genes of each panel.
        num_pathway_tokens (`int`, *optional*): N; needed with `num_kept_tokens`.
        num_kept_tokens (`int`, *optional*): N', how many tokens each view keeps; None for stage 1 and fine-tuning.
        seed (`int`, *optional*): seeds the views (per DataLoader worker); None draws from torch's global generator.
    """

    gene_panels: torch.Tensor
    num_pathway_tokens: int | None = None
    num_kept_tokens: int | None = None
    seed: int | None = None
    _generators: dict = field(default_factory=dict, init=False, repr=False)

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
        if self.num_kept_tokens is not None:
            if self.num_pathway_tokens is None or not 0 < self.num_kept_tokens < self.num_pathway_tokens:
                raise ValueError(
                    f"`num_kept_tokens` ({self.num_kept_tokens}) must keep at least one and mask at least one of "
                    f"`num_pathway_tokens` ({self.num_pathway_tokens}) tokens."
                )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(feature["gene_ids"]) for feature in features])
        width = max(int(lengths.max(initial=0)), 1)
        rows = np.repeat(np.arange(len(features)), lengths)
        positions = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        gene_ids = np.zeros((len(features), width), dtype=np.int64)
        gene_values = np.zeros((len(features), width), dtype=np.float32)
        attention_mask = np.zeros((len(features), width), dtype=bool)
        if len(rows):
            gene_ids[rows, positions] = np.concatenate([np.asarray(f["gene_ids"]) for f in features])
            gene_values[rows, positions] = np.concatenate([np.asarray(f["gene_values"]) for f in features])
            attention_mask[rows, positions] = True
        panel_ids = torch.tensor([feature["panel"] for feature in features])
        if (panel_ids < 0).any() or (panel_ids >= self.gene_panels.shape[0]).any():
            raise ValueError(f"Panel ids {panel_ids.unique().tolist()} are outside the {self.gene_panels.shape[0]} known panels.")
        batch = {
            "gene_ids": torch.from_numpy(gene_ids),
            "gene_values": torch.from_numpy(gene_values),
            "attention_mask": torch.from_numpy(attention_mask),
            # One panel in the batch (the usual case) travels as one row, not one per cell.
            "measured_gene_mask": self.gene_panels[panel_ids[0]]
            if (panel_ids == panel_ids[0]).all()
            else self.gene_panels[panel_ids],
        }
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([feature["labels"] for feature in features])
        if self.num_kept_tokens is not None:
            for view in ("kept_token_indices", "contrastive_kept_token_indices"):
                batch[view] = sample_kept_token_indices(
                    len(features), self.num_pathway_tokens, self.num_kept_tokens, generator=self._generator()
                )
        return batch

    def _generator(self) -> torch.Generator | None:
        """A generator per DataLoader worker (each worker holds a copy of the collator: one seed would repeat)."""
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else -1
        if worker_id not in self._generators:
            self._generators[worker_id] = torch.Generator().manual_seed(self.seed * 1_000_003 + worker_id + 1)
        return self._generators[worker_id]


__all__ = ["ScPaLMDataCollator"]
