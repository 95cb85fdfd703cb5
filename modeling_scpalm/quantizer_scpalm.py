"""Vector quantizer of scPaLM's pathway tokens (section 3.2, Appendix C), after Huh et al. 2023.

Codes are affinely reparameterised, `v = c_mean + c_std * c`, so one shared scale and shift move every code with
the encoder's output distribution. The loss is eq. 1 with squared distances, averaged over tokens and dimensions so
its scale does not depend on N or the hidden size:
`beta * ||sg(z) - e||^2 + (1 - beta) * ||z - sg(e)||^2`. Gradients reach the encoder straight through the
quantization. A code unused for `dead_code_patience` training steps is moved onto a random recent encoder output;
under torch.distributed the usage counts are summed and the replacements broadcast from rank 0, so every process
keeps the same codebook.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration_scpalm import ScPaLMConfig


@dataclass
class ScPaLMQuantizerOutput:
    """
    quantized (`(batch, N, hidden)`): the codes, with straight-through gradients to the encoder output.
    codes (`(batch, N)`): index of each token's code.
    commitment_loss (scalar): eq. 1.
    perplexity (scalar): exp of the entropy of this batch's code usage (K when all codes are used evenly).
    num_dead_codes (scalar): codes unused for `dead_code_patience` steps, replaced at the start of this step.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    num_dead_codes: torch.Tensor


class ScPaLMVectorQuantizer(nn.Module):
    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.beta = config.commitment_beta
        self.dead_code_patience = config.dead_code_patience
        self.codebook = nn.Parameter(torch.empty(config.codebook_size, config.hidden_size))
        self.codebook_mean = nn.Parameter(torch.empty(config.hidden_size))
        self.codebook_std = nn.Parameter(torch.empty(config.hidden_size))
        self.register_buffer("steps_since_used", torch.empty(config.codebook_size, dtype=torch.long))

    def code_vectors(self) -> torch.Tensor:
        """(K, hidden): the codebook after the affine reparameterisation."""
        return self.codebook_mean + self.codebook_std * self.codebook

    def forward(self, hidden_states: torch.Tensor) -> ScPaLMQuantizerOutput:
        replacing = self.training and self.codebook.requires_grad and self.dead_code_patience > 0
        # Replace before the codebook enters the graph: an in-place edit afterwards would break backward.
        num_dead_codes = self._replace_dead_codes(hidden_states.detach()) if replacing else self._num_dead_codes()
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            encoded = hidden_states.float()
            vectors = self.code_vectors().float()
            distances = (
                encoded.pow(2).sum(-1, keepdim=True) - 2 * encoded @ vectors.T + vectors.pow(2).sum(-1)
            )  # (batch, N, K)
            codes = distances.argmin(-1)
            nearest = F.embedding(codes, vectors)
            commitment_loss = self.beta * F.mse_loss(encoded, nearest.detach()) + (1 - self.beta) * F.mse_loss(
                nearest, encoded.detach()
            )
            quantized = encoded + (nearest - encoded).detach()

        counts = torch.bincount(codes.flatten(), minlength=self.codebook.shape[0])
        if replacing:
            self._record_usage(counts)
        probabilities = counts.float() / counts.sum()
        perplexity = torch.exp(-(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum())
        return ScPaLMQuantizerOutput(
            quantized=quantized.to(hidden_states.dtype),
            codes=codes,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            num_dead_codes=num_dead_codes,
        )

    def _num_dead_codes(self) -> torch.Tensor:
        return (self.steps_since_used >= max(self.dead_code_patience, 1)).sum()

    @torch.no_grad()
    def _record_usage(self, counts: torch.Tensor):
        if _is_distributed():
            counts = counts.clone()
            dist.all_reduce(counts)
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _replace_dead_codes(self, encoded: torch.Tensor) -> torch.Tensor:
        """Move every dead code onto a random encoder output of this batch; returns how many were dead."""
        dead = self.steps_since_used >= self.dead_code_patience
        num_dead = dead.sum()
        if num_dead.item() == 0:
            return num_dead
        encoded = encoded.flatten(0, -2).float()
        picks = torch.randint(encoded.shape[0], (int(num_dead),), device=encoded.device)
        std = self.codebook_std.float()
        std = torch.where(std.abs() < 1e-6, torch.full_like(std, 1e-6), std)
        # In code space, so that the reparameterised code lands exactly on the chosen encoder output.
        replacements = ((encoded[picks] - self.codebook_mean.float()) / std).to(self.codebook.dtype)
        if _is_distributed():
            dist.broadcast(replacements, src=0)
        self.codebook[dead] = replacements
        self.steps_since_used[dead] = 0
        return num_dead


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


__all__ = ["ScPaLMQuantizerOutput", "ScPaLMVectorQuantizer"]
