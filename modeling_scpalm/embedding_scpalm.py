"""Permutation-invariant embedding of scPaLM (Algorithm 1): every measured gene of a cell, pooled into N tokens.

A gene's vector is `LayerNorm(W [v_i ; E_gene[i]])` with `v_i = alpha[i] * u_i + MLP(u_i)`,
`u_i = leaky_relu(x_i * P1[i])` for an expressed gene and `v_i = e_zero` for a gene measured at zero. N learned
queries (the basis P') attend over the genes twice, once over the expressed ones and once over the zero ones
(hierarchical pooling); the two pools are fused by a linear layer. Attention sums over a set, so permuting the genes
(with their ids) leaves the tokens unchanged.

The pooling attention compares queries and keys by cosine similarity times a learned per-head scale (starting at
10), not by their dot product. With dot products, queries and keys start small and the logits stayed flat through
pretraining: measured on pbmc3k after 300 tiny stage-1 steps, the attention was uniform to 1% (entropy 0.99999 of
its maximum) and the N tokens varied across cells along one direction (mean cosine 0.9999 between slots), N copies
of one mean pool. Cosine logits of scale 10 give each query its own weighting of the genes from the start (slots'
cosine 0.11 after the same training, and pbmc3k's cell types told apart by the tokens at 0.74 rather than 0.55 in
`benchmarks/probe.py`).

Each pool is centred on a reference pool of the cell's gene panel and RMS-normalised per head. A softmax pool
averages hundreds of genes, so without centring what all cells share dwarfs what tells them apart (measured: 3% of
the token variance across pbmc3k cells, and stage 1 never left the mean-expression baseline). The references are
exact functions of the current weights and of the panel, never of other cells, so a cell's embedding does not depend
on its batch. The expressed pool is centred on the panel's genes as if all were expressed at x = 1; the zero pool on
the panel's genes all at zero.

Cost grows with the non-zero genes of a cell, not with the vocabulary. With P, D the softmax sums of the panel pool
(all measured genes at zero) and c, d those of the cell's expressed genes at zero, the zero pool is
Z = (P - c) / (D - d), so `Z - P/D = d / (D - d) * (P/D - c/d)`: after the per-head RMS normalisation the positive
factor drops out and the centred zero pool is the panel pool minus an ordinary attention pool over the cell's
expressed genes (their zero-gene vectors). No sum over the cell's zero genes. The two pools differ only by the zero
genes' share of the panel's softmax, which can be small (a cell expressing nearly all of its panel): where their
difference is under 1% of the pools in the model's dtype, that cell's zero pool is recomputed in float64. Real
cells rarely need it (the smallest ratio over pbmc3k's cells: 0.022 at initialisation, 0.012 after 300 tiny steps),
and float32 keeps the training step cheap.
The panel pools depend on the weights only (once per batch and panel). `forward_dense` computes the same function
from every gene of every cell, the zero pool literally over the zero genes; the tests hold the sparse path to it.

Inference folds the value path into per-gene tables: leaky_relu is positively homogeneous, so for x > 0
`u_i = x leaky_relu(P1[i])`, and with `l_i = leaky_relu(P1[i])` the value half of the fusion layer is
`W_v v_i = x W_v (alpha[i] * l_i) + (W_v W_2) act(x W_1 l_i + b_1) + W_v b_2`. The vectors in brackets are per-gene
tables and `W_v W_2` one matrix, computed with the cached vocabulary: three GEMMs per expressed gene (this one, the
key and the value) instead of five. Training, and cells with a negative value, take the unfolded path.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_scpalm import ScPaLMConfig

MAX_POOL_LOGIT_SCALE = math.log(100.0)
# Below this ratio of the zero-pool deviation to the pools it is a difference of, float32 leaves too few digits.
ZERO_POOL_CANCELLATION_LIMIT = 1e-2


class ScPaLMEmbeddings(nn.Module):
    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_genes = config.num_genes
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // config.num_attention_heads
        # Algorithm 1: P1, alpha, E_gene are per gene (P1 and alpha one row for all when shared, for Table 6);
        # e_zero and the value MLP are shared.
        self.share_value_projection = config.share_value_projection
        value_rows = 1 if config.share_value_projection else config.num_genes
        self.value_projection = nn.Parameter(torch.empty(value_rows, hidden))
        self.value_scale = nn.Parameter(torch.empty(value_rows, hidden))
        self.value_mlp = nn.Sequential(
            nn.Linear(hidden, hidden), ACT2FN[config.hidden_act], nn.Linear(hidden, hidden)
        )
        self.zero_value = nn.Parameter(torch.empty(hidden))
        self.gene_embeddings = nn.Parameter(torch.empty(config.num_genes, hidden))
        self.gene_fusion = nn.Linear(2 * hidden, hidden)
        self.gene_layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        # Pooling: N learned queries over the genes' keys and values, plus the null gene. Attention logits are
        # cosine similarities times a learned per-head scale (its log, kept below log(100)): see the module docstring.
        self.token_queries = nn.Parameter(torch.empty(config.num_pathway_tokens, hidden))
        self.pool_logit_scale = nn.Parameter(torch.empty(config.num_attention_heads))
        self.null_gene = nn.Parameter(torch.empty(hidden))
        self.key = nn.Linear(hidden, hidden)
        # No value bias: every pool is compared with a reference pool over the same kind of values and softmax
        # weights sum to one, so a bias cancels (it only took Adam steps on rounding noise).
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.pool_fusion = nn.Linear(2 * hidden, hidden)
        self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self._vocabulary_cache = None  # (weights key, vocabulary tensors): see `_vocabulary`

    # -- gene vectors ---------------------------------------------------------------------------------------------

    def _gene_projections(self) -> torch.Tensor:
        """(num_genes, hidden): `W_gene E_gene[i] + b`, the gene half of the fusion layer. It depends on the gene alone,
        so it is computed once per vocabulary gene rather than once for every expressed gene of every cell."""
        hidden = self.gene_embeddings.shape[-1]
        return F.linear(self.gene_embeddings, self.gene_fusion.weight[:, hidden:], self.gene_fusion.bias)

    def _fuse(self, value_part: torch.Tensor, gene_projections: torch.Tensor) -> torch.Tensor:
        """`LayerNorm(W [value ; E_gene] + b)`, with the gene half already projected."""
        hidden = value_part.shape[-1]
        value_weight = self.gene_fusion.weight[:, :hidden]
        if value_part.shape == gene_projections.shape:  # one pass: the product accumulates onto the projections
            fused = torch.addmm(gene_projections.flatten(0, -2), value_part.flatten(0, -2), value_weight.T)
            return self.gene_layernorm(fused.view_as(gene_projections))
        return self.gene_layernorm(F.linear(value_part, value_weight) + gene_projections)

    def _expressed_gene_vectors(self, gene_ids: torch.Tensor, gene_values: torch.Tensor, gene_projections: torch.Tensor):
        """(..., L) gene ids and values, and (..., L, hidden) those genes' projections -> (..., L, hidden): lines 3-7
        of Algorithm 1."""
        projection = self._value_rows(self.value_projection, gene_ids)
        projected = F.leaky_relu(gene_values.unsqueeze(-1).to(projection.dtype) * projection)
        value_part = torch.addcmul(self.value_mlp(projected), self._value_rows(self.value_scale, gene_ids), projected)
        return self._fuse(value_part, gene_projections)

    def _folded_value_path(self, gene_projections: torch.Tensor) -> dict[str, torch.Tensor]:
        """The value path's per-gene tables and its one matrix for x > 0 (module docstring): the MLP's first layer
        at x = 1, `W_v (alpha * l)`, the gene projections plus `W_v b_2`, and `W_v W_2`."""
        hidden = gene_projections.shape[-1]
        value_weight = self.gene_fusion.weight[:, :hidden]
        first_layer, _, second_layer = self.value_mlp
        unit_values = F.leaky_relu(self.value_projection)
        return {
            "first_layer": F.linear(unit_values, first_layer.weight),
            "value_direction": F.linear(self.value_scale * unit_values, value_weight),
            "offset": gene_projections + F.linear(second_layer.bias, value_weight),
            "second_layer": value_weight @ second_layer.weight,
        }

    def _folded_gene_vectors(self, folded: dict[str, torch.Tensor], gene_ids: torch.Tensor, gene_values: torch.Tensor):
        """`_expressed_gene_vectors` from the `_folded_value_path` tables, for x > 0. Inference alone takes this path
        (no autograd), so both terms accumulate in place into the gathered offsets: three (cells x genes x hidden)
        tensors live at once rather than four."""
        first_layer, activation, _ = self.value_mlp
        values = gene_values.unsqueeze(-1).to(folded["offset"].dtype)
        fused = F.embedding(gene_ids, folded["offset"])
        fused.addcmul_(values, self._value_rows(folded["value_direction"], gene_ids))
        hidden_states = activation(torch.addcmul(first_layer.bias, values, self._value_rows(folded["first_layer"], gene_ids)))
        fused.flatten(0, -2).addmm_(hidden_states.flatten(0, -2).to(fused.dtype), folded["second_layer"].T)
        return self.gene_layernorm(fused)

    def _value_rows(self, table: torch.Tensor, gene_ids: torch.Tensor) -> torch.Tensor:
        """The genes' rows of a per-gene value table, or its one shared row (broadcast)."""
        if self.share_value_projection:
            return table[0]
        # F.embedding rather than indexing: its backward accumulates into the (num_genes, hidden) tables far faster.
        return F.embedding(gene_ids, table)

    def dense_gene_vectors(self, expression: torch.Tensor) -> torch.Tensor:
        """(batch, num_genes) values in vocabulary order -> (batch, num_genes, hidden): every gene's vector, a gene at
        zero getting `e_zero`'s. The per-gene tokens a Geneformer-style model would attend over."""
        return self._dense_gene_vectors(expression, self._gene_projections())

    def _dense_gene_vectors(self, expression: torch.Tensor, gene_projections: torch.Tensor) -> torch.Tensor:
        gene_ids = torch.arange(self.num_genes, device=expression.device).expand(expression.shape[0], -1)
        expressed = self._expressed_gene_vectors(gene_ids, expression, gene_projections.expand(expression.shape[0], -1, -1))
        return torch.where((expression != 0).unsqueeze(-1), expressed, self._fuse(self.zero_value, gene_projections))

    # -- pooling --------------------------------------------------------------------------------------------------

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """(..., L, hidden) -> (..., heads, L, head_dim)."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _key_rows(self, states: torch.Tensor) -> torch.Tensor:
        """(..., L, hidden) gene vectors -> (..., L, hidden) keys of unit length per head (cosine logits)."""
        keys = self.key(states).unflatten(-1, (self.num_heads, self.head_dim))
        return F.normalize(keys, dim=-1).flatten(-2)

    def _queries(self) -> torch.Tensor:
        """(heads, N, head_dim): the N unit queries per head times the head's logit scale (which multiplies the N
        queries rather than the many keys)."""
        logit_scale = self.pool_logit_scale.clamp(max=MAX_POOL_LOGIT_SCALE).exp()[:, None, None]
        return F.normalize(self._heads(self.token_queries), dim=-1) * logit_scale

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool (batch, L, hidden) unit keys and values where `mask` (batch, L) holds with the (heads, N, head_dim)
        `_queries`: (batch, heads, N, head_dim)."""
        return F.scaled_dot_product_attention(
            queries.to(keys.dtype).expand(keys.shape[0], -1, -1, -1), self._heads(keys), self._heads(values),
            attn_mask=mask[:, None, None, :], scale=1.0,
        )

    def _with_null_gene(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., L, hidden) gene vectors -> (..., 1 + L, hidden): the null gene in slot 0, where every pool over genes
        reads it (`_null_slot_mask`). The sparse path writes it into a slot of its own vectors instead, saving a copy."""
        null_gene = self.null_gene.to(vectors.dtype).expand(*vectors.shape[:-2], 1, -1)
        return torch.cat([null_gene, vectors], dim=-2)

    def _vocabulary(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """The gene projections, and the keys and values (1 + num_genes, hidden) of the null gene (row 0) and of every
        vocabulary gene at zero and expressed at x = 1.

        They cost O(vocabulary x hidden^2) and depend on the weights alone, so inference (eval mode, no grad) computes
        them once and reuses them until a weight or the autocast dtype changes: any in-place update bumps a tensor's
        version counter, and moving the module gives new storage. The cached vocabulary also keeps its panel pools
        (`_panel_pool`) and the folded value path's tables (`_folded_value_path`).
        """
        if self.training or torch.is_grad_enabled():
            self._vocabulary_cache = None
            return self._compute_vocabulary()
        # Under autocast the tables come out in its dtype: a cache made there must not serve a call outside it.
        device_type = self.gene_embeddings.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        weights_key = (autocast_dtype, *((p.data_ptr(), p._version, p.dtype) for p in self.parameters()))
        if self._vocabulary_cache is None or self._vocabulary_cache[0] != weights_key:
            vocabulary = self._compute_vocabulary()
            vocabulary |= {"panel_pools": {}, "folded_value_path": self._folded_value_path(vocabulary["gene_projections"])}
            self._vocabulary_cache = (weights_key, vocabulary)
        return self._vocabulary_cache[1]

    def _compute_vocabulary(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        gene_projections = self._gene_projections()
        gene_ids = torch.arange(self.num_genes, device=gene_projections.device)
        vectors = {
            "zero": self._fuse(self.zero_value, gene_projections),
            "reference": self._expressed_gene_vectors(gene_ids, torch.ones_like(gene_projections[:, 0]), gene_projections),
        }
        vectors = {name: self._with_null_gene(rows) for name, rows in vectors.items()}
        return {"gene_projections": gene_projections} | {
            name: (self._key_rows(v), self.value(v)) for name, v in vectors.items()
        }

    def _panel_pool(self, vocabulary: dict, name: str, panels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Each panel's pool (panels, heads, N, head_dim) of its genes' vocabulary keys and values (`name`: "zero" or
        "reference"). A pool over the whole panel costs as much as a batch's expressed pool (measured: 5% of tiny
        inference), so a cached vocabulary keeps the last panels' pools: inference batches share their panels.
        Callers pick each cell's pool with `index_select`, whose backward sums the cells' gradients in a fixed order;
        indexing's backward sums them in thread order, and two seeded runs trained to different weights."""
        cached = vocabulary.get("panel_pools", {}).get((name, queries.dtype))
        if cached is not None and torch.equal(cached[0], panels):
            return cached[1]
        keys, values = (tensor.to(queries.dtype).expand(panels.shape[0], -1, -1) for tensor in vocabulary[name])
        pool = self._attend(queries, keys, values, _null_slot_mask(panels))
        if "panel_pools" in vocabulary:
            # A clone: the caller may change its mask in place.
            vocabulary["panel_pools"][name, queries.dtype] = (panels.clone(), pool)
        return pool

    def _tokens(self, expressed_deviation: torch.Tensor, zero_deviation: torch.Tensor) -> torch.Tensor:
        """Merge the heads of the two normalised deviations, fuse into the N tokens (line 8 of Algorithm 1)."""
        pools = [deviation.transpose(1, 2).flatten(2).to(self.token_queries.dtype)
                 for deviation in (expressed_deviation, zero_deviation)]
        return self.layernorm(self.token_queries + self.pool_fusion(torch.cat(pools, dim=-1)))

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
        vocabulary = self._vocabulary()
        # Slot 0 of every cell's gene vectors is the null gene's (`_with_null_gene`), computed as a gene at zero and
        # then overwritten: no copy of the keys and values to put it in.
        slot_ids, slot_values = F.pad(gene_ids, (1, 0)), F.pad(gene_values, (1, 0))
        if "folded_value_path" in vocabulary and not ((gene_values < 0) & expressed).any():
            vectors = self._folded_gene_vectors(vocabulary["folded_value_path"], slot_ids, slot_values)
        else:
            gene_projections = F.embedding(slot_ids, vocabulary["gene_projections"])
            vectors = self._expressed_gene_vectors(slot_ids, slot_values, gene_projections)
        vectors[:, 0] = self.null_gene
        queries = self._queries().to(vectors.dtype)
        expressed_pool = self._attend(queries, self._key_rows(vectors), self.value(vectors), _null_slot_mask(expressed))
        del vectors  # not needed by the zero pool, whose gathered rows would otherwise add to it at inference's peak
        reference_pool = self._panel_pool(vocabulary, "reference", panels, queries).index_select(0, panel_of_cell)
        zero_deviation = self._zero_deviation(vocabulary, queries, gene_ids, expressed, panels, panel_of_cell)
        return self._tokens(_normalise_heads(expressed_pool - reference_pool), zero_deviation)

    def _zero_deviation(self, vocabulary, queries, gene_ids, expressed, panels, panel_of_cell) -> torch.Tensor:
        """The centred zero pool, normalised per head, from the cell's expressed genes alone (module docstring).

        It is a difference of two pools that agree but for the zero genes' share of the panel's softmax. Where that
        difference is under `ZERO_POOL_CANCELLATION_LIMIT` of the pools' size in the model's dtype (a cell expressing
        nearly all of its panel), the cell is recomputed in float64. The queries and zero-gene rows are cast to float64
        once, so that the two pools' large, nearly opposite gradients meet and cancel in float64 (cast separately, they
        met in float32 at the parameters and left gradient errors of up to 2.7% over 20 seeds).
        """
        has_expressed = expressed.any(1)

        def normalised_deviation(cells, zero_vocabulary, pool_queries):
            # A cell with no expressed gene keeps its softmax off an empty set; its deviation is zeroed below.
            mask = expressed[cells] | ~has_expressed[cells, None]
            # The genes' zero keys and values (rows[1:]: without the null gene), gathered for the call alone.
            keys_and_values = (F.embedding(gene_ids[cells], rows[1:]).to(pool_queries.dtype) for rows in zero_vocabulary["zero"])
            expressed_as_zero = self._attend(pool_queries, *keys_and_values, mask)
            panel_zero_pool = self._panel_pool(zero_vocabulary, "zero", panels, pool_queries)
            panel_zero_pool = panel_zero_pool.index_select(0, panel_of_cell[cells])
            deviation = panel_zero_pool - expressed_as_zero
            cancelled = deviation.norm(dim=-1) < ZERO_POOL_CANCELLATION_LIMIT * panel_zero_pool.norm(dim=-1)
            return _normalise_heads(deviation), cancelled.flatten(1).any(1) & has_expressed[cells]

        all_cells = torch.arange(gene_ids.shape[0], device=gene_ids.device)
        deviation, cancelled = normalised_deviation(all_cells, vocabulary, queries)
        if cancelled.any():
            precise_cells = all_cells[cancelled]
            zero_rows = tuple(rows.to(torch.float64) for rows in vocabulary["zero"])
            precise, _ = normalised_deviation(precise_cells, {"zero": zero_rows}, queries.to(torch.float64))
            deviation = deviation.index_put((precise_cells,), precise.to(deviation.dtype))
        return torch.where(has_expressed[:, None, None, None], deviation, 0.0)

    # -- dense reference path -------------------------------------------------------------------------------------

    def forward_dense(self, expression: torch.Tensor, measured_gene_mask: torch.Tensor) -> torch.Tensor:
        """
        The reference path: every vocabulary gene of every cell gets its vector, memory `batch x num_genes x hidden`.

        Args:
            expression (`torch.FloatTensor` of shape `(batch_size, num_genes)`): normalised values in vocabulary order.
            measured_gene_mask (`torch.BoolTensor` of shape `(num_genes,)` or `(batch_size, num_genes)`).
        """
        panels, panel_of_cell = _gene_panels(measured_gene_mask, expression.shape[0])
        measured = panels[panel_of_cell]
        expressed = measured & (expression != 0)
        vocabulary = self._vocabulary()
        vectors = self._with_null_gene(self._dense_gene_vectors(expression, vocabulary["gene_projections"]))
        keys, values, queries = self._key_rows(vectors), self.value(vectors), self._queries().to(vectors.dtype)
        expressed_pool = self._attend(queries, keys, values, _null_slot_mask(expressed))
        zero_pool = self._attend(queries, keys, values, _null_slot_mask(measured & ~expressed))
        reference_pool, panel_zero_pool = (
            self._panel_pool(vocabulary, name, panels, queries).index_select(0, panel_of_cell)
            for name in ("reference", "zero")
        )
        return self._tokens(
            _normalise_heads(expressed_pool - reference_pool), _normalise_heads(zero_pool - panel_zero_pool)
        )


def _normalise_heads(deviation: torch.Tensor) -> torch.Tensor:
    """RMS-normalise each head's (..., head_dim) deviation, in float32 at least (squares of small float16 deviations
    fall below its range); an all-zero one stays zero."""
    deviation = deviation.to(torch.promote_types(deviation.dtype, torch.float32))
    floor = torch.finfo(deviation.dtype).tiny
    return deviation * torch.rsqrt(deviation.pow(2).mean(-1, keepdim=True).clamp_min(floor))


def _null_slot_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (..., L) gene mask -> (..., 1 + L), the null gene's slot 0 always attended."""
    return F.pad(mask, (1, 0), value=True)


def _gene_panels(measured_gene_mask: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct measured-gene masks `(panels, num_genes)` and each cell's panel index `(batch,)`."""
    measured_gene_mask = measured_gene_mask.bool()
    if measured_gene_mask.dim() == 1:
        panel_of_cell = torch.zeros(batch_size, dtype=torch.long, device=measured_gene_mask.device)
        return measured_gene_mask[None], panel_of_cell
    return torch.unique(measured_gene_mask, dim=0, return_inverse=True)


__all__ = ["ScPaLMEmbeddings"]
