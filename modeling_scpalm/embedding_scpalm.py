"""Permutation-invariant embedding of scPaLM (Algorithm 1): every measured gene of a cell, pooled into N tokens.

Each of the N tokens is a learned gene program: a distribution `a_k` over the genes of the cell's panel (the genes its
dataset measured), `a_k = softmax_panel(s cos(q_k, key(E_gene)))`, from the token's query `q_k` and the genes'
identity embeddings alone. The token pools what each expressed gene of the cell contributes:

    pool_k = sum_i a_k[i] [u_i(x_i) ; E_gene[i]],   u_i(x) = alpha_i h + MLP(h) - MLP(0),   h = leaky_relu(x P1_i)

the value path of lines 3-5 of Algorithm 1 (`gene_values`), with the gene identity beside it (line 7). A gene at zero
adds nothing: Algorithm 1 fills it with e_zero and pools the zero genes separately, and that zero pool, centred on the
panel's all-zero pool (a constant of the panel), is minus the expressed genes' share of it, which the presence term
`E_gene[i]` carries. The weights are normalised over the whole panel, never renormalised over a cell's expressed genes,
so a token says how much of its program the cell expresses as well as how. Each cell's pools are divided by their root
mean square over tokens, which keeps their ratios and removes the cell's overall depth; then
`tokens = LayerNorm(q_k + W [dose ; identity])` (line 8, the queries being the basis P').

Sums over a set: permuting the genes with their ids leaves the tokens unchanged. Keys depend on the gene alone, so
their cost is per vocabulary gene and per step; per expressed gene the embedding costs N weights and two gathered
rows. `forward_dense` computes the same function from every gene of every cell (the tests hold the sparse path to it).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_scpalm import ScPaLMConfig

MAX_POOL_LOGIT_SCALE = math.log(100.0)


class ScPaLMEmbeddings(nn.Module):
    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_genes = config.num_genes
        # Algorithm 1: P1, alpha, E_gene are per gene (P1 and alpha one row for all when shared, for Table 6).
        self.share_value_projection = config.share_value_projection
        value_rows = 1 if config.share_value_projection else config.num_genes
        self.value_projection = nn.Parameter(torch.empty(value_rows, hidden))
        self.value_scale = nn.Parameter(torch.empty(value_rows, hidden))
        self.value_mlp = nn.Sequential(nn.Linear(hidden, hidden), ACT2FN[config.hidden_act], nn.Linear(hidden, hidden))
        self.gene_embeddings = nn.Parameter(torch.empty(config.num_genes, hidden))
        # Pooling: N learned queries over the genes' identity keys, one weighting of the genes per attention head (N x
        # heads gene programs). Logits are cosine similarities times a learned per-head scale (its log, kept below
        # log(100)): every token weighs the genes its own way from the start.
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // config.num_attention_heads
        self.token_queries = nn.Parameter(torch.empty(config.num_pathway_tokens, hidden))
        self.pool_logit_scale = nn.Parameter(torch.empty(config.num_attention_heads))
        self.key = nn.Linear(hidden, hidden)
        self.pool_fusion = nn.Linear(2 * hidden, hidden)
        self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self._vocabulary_cache = None  # (weights key, keys and panel normalisers): see `_vocabulary`

    # -- per-gene parts -------------------------------------------------------------------------------------------

    def _heads(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., heads, head_dim)."""
        return rows.unflatten(-1, (self.num_heads, self.head_dim))

    def _queries(self) -> torch.Tensor:
        """(heads, N, head_dim): unit queries per head times the head's logit scale."""
        logit_scale = self.pool_logit_scale.clamp(max=MAX_POOL_LOGIT_SCALE).exp()[:, None, None]
        return F.normalize(self._heads(self.token_queries), dim=-1).transpose(0, 1) * logit_scale

    def _gene_keys(self) -> torch.Tensor:
        """(num_genes, hidden): each vocabulary gene's key, of unit length per head."""
        return F.normalize(self._heads(self.key(self.gene_embeddings)), dim=-1).flatten(-2)

    def _vocabulary(self) -> dict:
        """The genes' keys and the queries. They depend on the weights alone, so inference (eval mode, no grad) keeps
        them, and the last panels' softmax normalisers, until a weight or the autocast dtype changes (an in-place
        update bumps a tensor's version counter; moving the module gives new storage)."""
        if self.training or torch.is_grad_enabled():
            self._vocabulary_cache = None
            return {"keys": self._gene_keys(), "queries": self._queries()}
        device_type = self.gene_embeddings.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        weights_key = (autocast_dtype, *((p.data_ptr(), p._version, p.dtype) for p in self.parameters()))
        if self._vocabulary_cache is None or self._vocabulary_cache[0] != weights_key:
            self._vocabulary_cache = (weights_key, {"keys": self._gene_keys(), "queries": self._queries()})
        return self._vocabulary_cache[1]

    def _panel_normalisers(self, vocabulary: dict, panels: torch.Tensor) -> torch.Tensor:
        """(panels, heads, N): log of each token's softmax denominator over each panel's genes, in float32."""
        cached = vocabulary.get("panels")
        if cached is not None and torch.equal(cached[0], panels):
            return cached[1]
        logits = torch.einsum("hnd,ghd->hng", vocabulary["queries"].float(), self._heads(vocabulary["keys"].float()))
        # A masked logsumexp rather than boolean indexing: shapes stay static (FakeTensorMode, torch.compile).
        normalisers = logits.masked_fill(~panels[:, None, None, :], float("-inf")).logsumexp(-1)
        if not (self.training or torch.is_grad_enabled()):
            vocabulary["panels"] = (panels.clone(), normalisers)  # a clone: the caller may change its mask in place
        return normalisers

    # -- pooling --------------------------------------------------------------------------------------------------

    def _pool(
        self, weights: torch.Tensor, gene_values: torch.Tensor, gene_ids: torch.Tensor, identity: torch.Tensor
    ) -> torch.Tensor:
        """(batch, heads, N, L) weights over L genes, their (batch, L) values and ids (broadcastable) and (batch or 1,
        L, hidden) identity vectors -> (batch, N, hidden) tokens."""
        dose = self.gene_values(gene_ids, gene_values).to(identity.dtype)
        weights = weights.to(dose.dtype)
        pools = [
            torch.einsum("bhnl,blhd->bnhd", weights, self._heads(part.expand_as(dose))) for part in (dose, identity)
        ]
        pools = torch.cat(pools, dim=-1).float()  # (batch, N, heads, 2 head_dim)
        # Each cell's depth out (per head), its tokens' ratios kept; a cell with no expressed gene stays at zero.
        pools = pools * torch.rsqrt(pools.pow(2).mean((1, 3), keepdim=True).clamp_min(torch.finfo(pools.dtype).tiny))
        dose_pool, identity_pool = pools.to(self.token_queries.dtype).split(self.head_dim, dim=-1)
        merged = torch.cat([dose_pool.flatten(2), identity_pool.flatten(2)], dim=-1)
        return self.layernorm(self.token_queries + self.pool_fusion(merged))

    def gene_values(self, gene_ids: torch.Tensor, gene_values: torch.Tensor) -> torch.Tensor:
        """(..., L) gene ids and values -> (..., L, hidden) `u_i(x)`, zero at x = 0 (lines 3-5 of Algorithm 1)."""
        values = gene_values.unsqueeze(-1).to(self.value_projection.dtype)
        unit = F.leaky_relu(self._value_rows(self.value_projection, gene_ids))
        mlp = self.value_mlp(values * unit) - self.value_mlp(torch.zeros_like(self.value_projection[:1]))
        return torch.addcmul(mlp, values * unit, self._value_rows(self.value_scale, gene_ids))

    def dense_gene_vectors(self, expression: torch.Tensor) -> torch.Tensor:
        """(batch, num_genes) values in vocabulary order -> (batch, num_genes, hidden): every gene's value and identity,
        `u_i(x) + E_gene[i]`, the per-gene tokens a Geneformer-style model would attend over (Table 6)."""
        gene_ids = torch.arange(self.num_genes, device=expression.device).expand(expression.shape[0], -1)
        return self.gene_values(gene_ids, expression) + self.gene_embeddings

    def _value_rows(self, table: torch.Tensor, gene_ids: torch.Tensor) -> torch.Tensor:
        """The genes' rows of a per-gene value table, or its one shared row (broadcast)."""
        # F.embedding rather than indexing: its backward accumulates into the (num_genes, hidden) tables far faster.
        return table[0] if self.share_value_projection else F.embedding(gene_ids, table)

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
                vocabulary genes the cell's dataset measured; the others are left out.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_pathway_tokens, hidden_size)`.
        """
        panels, panel_of_cell = _gene_panels(measured_gene_mask, gene_ids.shape[0])
        expressed = attention_mask.bool() & panels[panel_of_cell[:, None], gene_ids] & (gene_values != 0)
        vocabulary = self._vocabulary()
        normalisers = self._panel_normalisers(vocabulary, panels).index_select(0, panel_of_cell)
        keys = self._heads(F.embedding(gene_ids, vocabulary["keys"]))  # (batch, L, heads, head_dim)
        logits = torch.einsum("hnd,blhd->bhnl", vocabulary["queries"].to(keys.dtype), keys).float()
        # A gene outside the cell's panel may have a logit above the panel's normaliser: masked before exp, not after.
        weights = (logits - normalisers[..., None]).masked_fill(~expressed[:, None, None, :], float("-inf")).exp()
        return self._pool(weights, gene_values, gene_ids, F.embedding(gene_ids, self.gene_embeddings))

    def forward_dense(self, expression: torch.Tensor, measured_gene_mask: torch.Tensor) -> torch.Tensor:
        """
        The reference path: every vocabulary gene of every cell, memory `batch x num_genes x hidden`.

        Args:
            expression (`torch.FloatTensor` of shape `(batch_size, num_genes)`): normalised values in vocabulary order.
            measured_gene_mask (`torch.BoolTensor` of shape `(num_genes,)` or `(batch_size, num_genes)`).
        """
        panels, panel_of_cell = _gene_panels(measured_gene_mask, expression.shape[0])
        measured = panels[panel_of_cell]
        logits = torch.einsum("hnd,ghd->hng", self._queries(), self._heads(self._gene_keys()))
        weights = logits.expand(expression.shape[0], -1, -1, -1).masked_fill(~measured[:, None, None, :], float("-inf"))
        weights = weights.softmax(-1).nan_to_num() * (measured & (expression != 0))[:, None, None, :]
        gene_ids = torch.arange(self.num_genes, device=expression.device).expand(expression.shape[0], -1)
        return self._pool(weights, expression, gene_ids, self.gene_embeddings[None])


def _gene_panels(measured_gene_mask: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct measured-gene masks `(panels, num_genes)` and each cell's panel index `(batch,)`."""
    measured_gene_mask = measured_gene_mask.bool()
    if measured_gene_mask.dim() == 1:
        panel_of_cell = torch.zeros(batch_size, dtype=torch.long, device=measured_gene_mask.device)
        return measured_gene_mask[None], panel_of_cell
    return torch.unique(measured_gene_mask, dim=0, return_inverse=True)


__all__ = ["ScPaLMEmbeddings"]
