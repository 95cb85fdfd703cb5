"""Permutation-invariant embedding of scPaLM (Algorithm 1): every measured gene of a cell, pooled into N tokens.

A gene's vector is `LayerNorm(W [v_i ; E_gene[i]])` with `v_i = alpha[i] * u_i + MLP(u_i)`,
`u_i = leaky_relu(x_i * P1[i])` for an expressed gene and `v_i = e_zero` for a gene measured at zero. N learned
queries (the basis P') attend over the genes twice, once over the expressed ones and once over the zero ones
(hierarchical pooling); the two pools are fused by a linear layer. Attention sums over a set, so permuting the genes
(with their ids) leaves the tokens unchanged.

Cost grows with the non-zero genes of a cell, not with the vocabulary: a zero gene's vector does not depend on the
cell, so the zero pool is the pool over all measured genes "as if zero" (computed once per batch and gene panel)
minus the share of the cell's expressed genes, with the softmax sums kept in float32. `forward_dense` computes the
same function over every gene of every cell and is the reference the sparse path is tested against.

Both pools also attend to a learned null gene, so a pool over an empty set (a cell with every measured gene
expressed, or none) stays defined and the subtraction never divides by zero.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_scpalm import ScPaLMConfig


class ScPaLMEmbeddings(nn.Module):
    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_genes = config.num_genes
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // config.num_attention_heads
        # Algorithm 1: P1, alpha, E_gene are per gene; e_zero and the value MLP are shared.
        self.value_projection = nn.Parameter(torch.empty(config.num_genes, hidden))
        self.value_scale = nn.Parameter(torch.empty(config.num_genes, hidden))
        self.value_mlp = nn.Sequential(
            nn.Linear(hidden, hidden), ACT2FN[config.hidden_act], nn.Linear(hidden, hidden)
        )
        self.zero_value = nn.Parameter(torch.empty(hidden))
        self.gene_embeddings = nn.Parameter(torch.empty(config.num_genes, hidden))
        self.gene_fusion = nn.Linear(2 * hidden, hidden)
        self.gene_layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        # Pooling: N learned queries over the genes' keys and values, plus the null gene.
        self.token_queries = nn.Parameter(torch.empty(config.num_pathway_tokens, hidden))
        self.null_gene = nn.Parameter(torch.empty(hidden))
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        # Every pool averages hundreds of genes, so a component shared by all cells dwarfs what differs between
        # them (a few percent at initialisation); normalising each slot's pooled features across cells (running
        # statistics in eval mode, so a cell's embedding never depends on its batch) gives that difference full scale.
        self.pool_norm = nn.BatchNorm1d(config.num_pathway_tokens * hidden)
        self.pool_fusion = nn.Linear(2 * hidden, hidden)
        self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    # -- gene vectors ---------------------------------------------------------------------------------------------

    def _fuse(self, value_part: torch.Tensor, gene_part: torch.Tensor) -> torch.Tensor:
        """`LayerNorm(W [value ; gene] + b)`, with W split so a shared value part is projected once."""
        hidden = value_part.shape[-1]
        weight = self.gene_fusion.weight
        fused = F.linear(value_part, weight[:, :hidden]) + F.linear(gene_part, weight[:, hidden:], self.gene_fusion.bias)
        return self.gene_layernorm(fused)

    def _expressed_gene_vectors(self, gene_ids: torch.Tensor, gene_values: torch.Tensor) -> torch.Tensor:
        """(..., L) gene ids and values -> (..., L, hidden): lines 3-7 of Algorithm 1."""
        # F.embedding rather than indexing: its backward accumulates into the (num_genes, hidden) tables far faster.
        projection = F.embedding(gene_ids, self.value_projection)
        projected = F.leaky_relu(gene_values.unsqueeze(-1).to(projection.dtype) * projection)
        value_part = F.embedding(gene_ids, self.value_scale) * projected + self.value_mlp(projected)
        return self._fuse(value_part, F.embedding(gene_ids, self.gene_embeddings))

    def _zero_gene_vectors(self) -> torch.Tensor:
        """(num_genes, hidden): every vocabulary gene as if measured at zero; the same for every cell."""
        return self._fuse(self.zero_value, self.gene_embeddings)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """(..., L, hidden) -> (..., heads, L, head_dim)."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _queries(self) -> torch.Tensor:
        return self._heads(self.token_queries)  # (heads, N, head_dim)

    def _null_key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.key(self.null_gene)[None]), self._heads(self.value(self.null_gene)[None])

    def _attend(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool (batch, heads, L, head_dim) keys/values where `mask` (batch, L) holds, the null gene always."""
        batch = keys.shape[0]
        null_key, null_value = self._null_key_value()
        keys = torch.cat([null_key.expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([null_value.expand(batch, -1, -1, -1), values], dim=2)
        mask = torch.cat([mask.new_ones(batch, 1), mask], dim=1)[:, None, None, :]
        queries = self._queries().expand(batch, -1, -1, -1).to(keys.dtype)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)

    def _tokens(self, expressed_pool: torch.Tensor, zero_pool: torch.Tensor) -> torch.Tensor:
        """Merge heads and fuse the two pools into the N tokens (line 8 of Algorithm 1)."""
        expressed_pool = expressed_pool.transpose(1, 2).flatten(2)
        zero_pool = zero_pool.transpose(1, 2).flatten(2).to(expressed_pool.dtype)
        expressed_pool = self.pool_norm(expressed_pool.flatten(1)).view_as(expressed_pool)
        return self.layernorm(self.token_queries + self.pool_fusion(torch.cat([expressed_pool, zero_pool], dim=-1)))

    # -- sparse path ----------------------------------------------------------------------------------------------

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor,
        measured_gene_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            gene_ids (`torch.LongTensor` of shape `(batch_size, max_nonzero)`): vocabulary ids of each cell's
                non-zero genes, padded.
            gene_values (`torch.FloatTensor` of shape `(batch_size, max_nonzero)`): their normalised values.
            attention_mask (`torch.BoolTensor` of shape `(batch_size, max_nonzero)`): True for real entries.
            measured_gene_mask (`torch.BoolTensor` of shape `(num_genes,)` or `(batch_size, num_genes)`): the
                vocabulary genes the cell's dataset measured; the others are left out of both pools.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_pathway_tokens, hidden_size)`.
        """
        panels, panel_of_cell = _gene_panels(measured_gene_mask, gene_ids.shape[0])
        expressed = attention_mask.bool() & panels[panel_of_cell[:, None], gene_ids] & (gene_values != 0)
        vectors = self._expressed_gene_vectors(gene_ids, gene_values)
        expressed_pool = self._attend(self._heads(self.key(vectors)), self._heads(self.value(vectors)), expressed)
        zero_pool = self._zero_pool(gene_ids, expressed, panels, panel_of_cell)
        return self._tokens(expressed_pool, zero_pool)

    def _zero_pool(
        self, gene_ids: torch.Tensor, expressed: torch.Tensor, panels: torch.Tensor, panel_of_cell: torch.Tensor
    ) -> torch.Tensor:
        """Softmax pool over each cell's zero genes = (pool over its panel) - (its expressed genes' share)."""
        zero_vectors = self._zero_gene_vectors()
        null_key, null_value = self._null_key_value()
        with torch.autocast(device_type=zero_vectors.device.type, enabled=False):
            queries = self._queries().float() * self.head_dim**-0.5
            keys = self._heads(self.key(zero_vectors.float()))  # (heads, genes, head_dim)
            values = self._heads(self.value(zero_vectors.float()))
            gene_scores = queries @ keys.transpose(-1, -2)  # (heads, N, genes)
            null_scores = queries @ null_key.float().transpose(-1, -2)  # (heads, N, 1)
            # One shift for every gene and panel keeps every exponent <= 0, padding and unmeasured genes included.
            shift = torch.maximum(gene_scores.amax(-1, keepdim=True), null_scores)
            gene_weights = torch.exp(gene_scores - shift)
            null_weight = torch.exp(null_scores - shift)

            # Softmax sums over each panel's measured genes and the null gene.
            panel_weights = gene_weights * panels[:, None, None, :]  # (panels, heads, N, genes)
            denominator = panel_weights.sum(-1) + null_weight[..., 0]  # (panels, heads, N)
            numerator = panel_weights @ values + null_weight * null_value.float()  # (panels, heads, N, head_dim)

            # Each cell's expressed genes, scored as zero genes, leave its panel's sums. Fused attention gives those
            # sums without materialising (batch, heads, N, nonzero) weights: an anchor key scores exactly `shift`
            # (weight 1) and carries the value e_last, so the output's last entry is c = 1 / (1 + S) for the sum S
            # of the expressed genes' weights, and its first entries are their weighted value sum times c.
            batch, length = gene_ids.shape
            head_dim = self.head_dim
            width = -(-(head_dim + 1) // 8) * 8  # fused kernels want a multiple of 8
            cell_keys = F.embedding(gene_ids, keys.transpose(0, 1).flatten(1)).view(batch, length, self.num_heads, head_dim)
            cell_values = F.embedding(gene_ids, values.transpose(0, 1).flatten(1)).view(batch, length, self.num_heads, head_dim)
            anchor = F.one_hot(torch.tensor(head_dim, device=keys.device), width).float().expand(batch, 1, self.num_heads, width)
            pad = (0, width - head_dim)
            attention_keys = torch.cat([anchor, F.pad(cell_keys, pad)], dim=1).transpose(1, 2)
            attention_values = torch.cat([anchor, F.pad(cell_values, pad)], dim=1).transpose(1, 2)
            attention_queries = F.pad(torch.cat([queries, shift], dim=-1), (0, width - head_dim - 1))
            mask = torch.cat([expressed.new_ones(batch, 1), expressed], dim=1)[:, None, None, :]
            attended = F.scaled_dot_product_attention(
                attention_queries.expand(batch, -1, -1, -1), attention_keys, attention_values, attn_mask=mask, scale=1.0
            )
            inverse_total = attended[..., head_dim]  # c = 1 / (1 + S)
            numerator = numerator[panel_of_cell] - attended[..., :head_dim] / inverse_total.unsqueeze(-1)
            expressed_weight = 1.0 / inverse_total - 1.0
            # The null gene is never subtracted, so its weight bounds the true denominator from below.
            denominator = torch.maximum(denominator[panel_of_cell] - expressed_weight, null_weight[..., 0])
            return numerator / denominator.unsqueeze(-1)

    # -- dense reference path -------------------------------------------------------------------------------------

    def forward_dense(self, expression: torch.Tensor, measured_gene_mask: torch.Tensor) -> torch.Tensor:
        """
        The reference path: every vocabulary gene of every cell gets its vector, memory `batch x num_genes x hidden`.

        Args:
            expression (`torch.FloatTensor` of shape `(batch_size, num_genes)`): normalised values in vocabulary order.
            measured_gene_mask (`torch.BoolTensor` of shape `(num_genes,)` or `(batch_size, num_genes)`).
        """
        batch = expression.shape[0]
        panels, panel_of_cell = _gene_panels(measured_gene_mask, batch)
        measured = panels[panel_of_cell]
        gene_ids = torch.arange(self.num_genes, device=expression.device).expand(batch, -1)
        expressed = measured & (expression != 0)
        vectors = torch.where(
            expressed.unsqueeze(-1), self._expressed_gene_vectors(gene_ids, expression), self._zero_gene_vectors()
        )
        keys, values = self._heads(self.key(vectors)), self._heads(self.value(vectors))
        expressed_pool = self._attend(keys, values, expressed)
        zero_pool = self._attend(keys, values, measured & ~expressed)
        return self._tokens(expressed_pool, zero_pool)


def _gene_panels(measured_gene_mask: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct measured-gene masks `(panels, num_genes)` and each cell's panel index `(batch,)`."""
    measured_gene_mask = measured_gene_mask.bool()
    if measured_gene_mask.dim() == 1:
        panel_of_cell = torch.zeros(batch_size, dtype=torch.long, device=measured_gene_mask.device)
        return measured_gene_mask[None], panel_of_cell
    return torch.unique(measured_gene_mask, dim=0, return_inverse=True)


__all__ = ["ScPaLMEmbeddings"]
