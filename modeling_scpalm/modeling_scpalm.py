"""scPaLM: single-cell language model through genetic pathway learning (sections 3.1-3.3 of the paper).

Stage 1 (`ScPaLMForPathwayReconstruction`): permutation-invariant embedding -> pathway encoder -> decoder, trained to
reconstruct every measured gene (Algorithm 3); the vector quantizer learns a codebook of the encoder's token states
beside it (the commitment loss), and each token's code is its discrete pathway identity.
Stage 2 (`ScPaLMForCellPretraining`): with the stage-1 parts frozen, a cell token e_C and p% of the pathway tokens
go through the cell encoder; h_C is the mean of its outputs (or the cell token's own, the paper's), and the cell
decoder reconstructs every measured gene and every stage-1 token from h_C alone: the cell must pass through it.
The pseudo-label contrast of two views (eq. 2, Algorithm 2) is there to be weighed in.
`ScPaLMModel` gives the cell embedding h_C from all N tokens; `ScPaLMForCellClassification` fine-tunes on labels.
Where this departs from the paper, and the measurements behind each departure: docs/design.md.
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_scpalm import ScPaLMConfig
from .embedding_scpalm import ScPaLMEmbeddings
from .quantizer_scpalm import ScPaLMQuantizerOutput, ScPaLMVectorQuantizer

# `save_pretrained` records only the saved class in `auto_map`; every saved folder also names these, so that
# `AutoModel` and the classification auto class load it with `trust_remote_code=True`.
AUTO_MAP = {
    "AutoConfig": "configuration_scpalm.ScPaLMConfig",
    "AutoModel": "modeling_scpalm.ScPaLMModel",
    "AutoModelForSequenceClassification": "modeling_scpalm.ScPaLMForCellClassification",
}
KMEANS_ITERATIONS = 20


# -- outputs ----------------------------------------------------------------------------------------------------------


@dataclass
class ScPaLMModelOutput(ModelOutput):
    r"""
    cell_embedding (`(batch_size, hidden_size)`): h_C, read from the cell encoder's output
        (`config.cell_embedding_pooling`) and given its fitted readout (`ScPaLMCellEncoder.fit_whitening`).
    raw_cell_embedding (`(batch_size, hidden_size)`): h_C before that readout. Nearer neighbours, more fragmented
        clusters: the readout lifts h_C's small directions, which join Leiden's pieces of a continuum and blur the
        nearest neighbours on shallow cells (docs/design.md). In a model pretrained with batches it still holds the
        directions that tell them apart, which the readout drops.
    last_hidden_state (`(batch_size, 1 + kept_tokens, hidden_size)`): the cell encoder output, the cell token's first.
    pathway_codes (`(batch_size, num_pathway_tokens)`): each pathway token's codebook index (None without quantizer).
    pathway_tokens (`(batch_size, num_pathway_tokens, hidden_size)`): the quantized pathway tokens Z (the codes'
        vectors; the encoder output without quantizer).
    pathway_hidden_states (`(batch_size, num_pathway_tokens, hidden_size)`): the pathway encoder output before
        quantization, which the cell encoder reads.
    hidden_states (`tuple`, when `output_hidden_states`): the embedding output and every pathway encoder layer's
        output, then the cell encoder's input and every one of its layers' outputs.
    """

    cell_embedding: torch.FloatTensor | None = None
    raw_cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pathway_codes: torch.LongTensor | None = None
    pathway_tokens: torch.FloatTensor | None = None
    pathway_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ScPaLMForPathwayReconstructionOutput(ModelOutput):
    r"""
    loss (scalar): reconstruction_loss + commitment_loss.
    reconstruction_loss (scalar): MSE over every measured gene (Algorithm 3).
    commitment_loss (scalar): eq. 1 (0 without quantizer).
    reconstruction (`(batch_size, num_genes)`): the decoded expression in vocabulary order.
    pathway_codes (`(batch_size, num_pathway_tokens)`): the codes of the pathway tokens.
    codebook_perplexity (scalar): exp-entropy of this batch's code usage.
    num_dead_codes (scalar): codes unused for `dead_code_patience` steps (replaced during training).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    pathway_codes: torch.LongTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    num_dead_codes: torch.LongTensor | None = None


@dataclass
class ScPaLMForCellPretrainingOutput(ModelOutput):
    r"""
    loss (scalar): reconstruction_loss + token_reconstruction_weight * token_reconstruction_loss +
        contrastive_loss_weight * contrastive_loss.
    reconstruction_loss (scalar): MSE over every measured gene, decoded from h_C alone.
    token_reconstruction_loss (scalar): MSE of the cell decoder's states against the frozen stage-1 pathway tokens
        (None when its weight is 0).
    contrastive_loss (scalar): eq. 2 on h_C of the two views (None when its weight is 0).
    reconstruction (`(batch_size, num_genes)`): the cell decoder's output in vocabulary order.
    masked_token_mask (`(batch_size, num_pathway_tokens)`): True for the tokens the cell encoder did not see.
    cell_embedding (`(batch_size, hidden_size)`): h_C of the first view.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    token_reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    masked_token_mask: torch.BoolTensor | None = None
    cell_embedding: torch.FloatTensor | None = None


@dataclass
class ScPaLMForCellClassificationOutput(ModelOutput):
    r"""
    loss (scalar, when `labels` are given): cross-entropy (MSE for `num_labels == 1`).
    logits (`(batch_size, num_labels)`).
    cell_embedding (`(batch_size, hidden_size)`): h_C.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None


@dataclass
class ScPaLMPathwayOutput:
    """Internal: what the stage-1 parts (embedding, pathway encoder, quantizer) make of a batch."""

    tokens: torch.Tensor
    encoder_output: torch.Tensor
    quantizer: ScPaLMQuantizerOutput | None
    hidden_states: tuple[torch.Tensor, ...] | None


# -- transformer blocks -----------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ScPaLMSelfAttention(nn.Module):
    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (states.view(shape).transpose(1, 2) for states in self.qkv(hidden_states).chunk(3, dim=-1))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attended, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.output(attended.reshape(*hidden_states.shape[:-1], -1))


class ScPaLMLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ScPaLMSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            ACT2FN[config.hidden_act],
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.attention(self.attention_norm(hidden_states)))
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class ScPaLMTransformer(nn.Module):
    """A stack of layers and a final LayerNorm; with 0 layers only the LayerNorm (the encoder-off ablation)."""

    def __init__(self, config: ScPaLMConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([ScPaLMLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_states += (hidden_states,)
        return self.norm(hidden_states), all_states


class ScPaLMCellEncoder(nn.Module):
    """Stage 2's encoder: the cell token e_C, then the kept pathway tokens with their slot embeddings. h_C is read from
    its output by `config.cell_embedding_pooling`.

    With `config.cell_token_from_expression`, e_C is the learned token plus a read of the cell's whole expression,
    LayerNorm(sum_g x_g w_g) with one learned vector w_g per gene: a sum over the cell's genes, so permutation
    invariant like the embedding, and it sees every gene of the cell, which the masked pathway tokens do not.
    Pretraining starts the w_g at the training cells' principal axes (`initialize_expression_read`)."""

    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.pooling = config.cell_embedding_pooling
        self.cell_token = nn.Parameter(torch.empty(config.hidden_size))
        self.slot_embeddings = nn.Parameter(torch.empty(config.num_pathway_tokens, config.hidden_size))
        self.transformer = ScPaLMTransformer(config, config.num_hidden_layers)
        if config.cell_token_from_expression:
            self.expression_weight = nn.Parameter(torch.empty(config.num_genes, config.hidden_size))
            self.expression_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.expression_weight = self.expression_norm = None
        # h_C's readout transform, fitted on the training cells after stage 2 (`fit_whitening`); identity until then.
        self.register_buffer("whitening_mean", torch.empty(config.hidden_size))
        self.register_buffer("whitening_matrix", torch.empty(config.hidden_size, config.hidden_size))
        self.whitening_power = config.cell_embedding_whitening_power
        self.initializer_range = config.initializer_range

    @torch.no_grad()
    def initialize_expression_read(self, principal_axes: torch.Tensor):
        """Start the expression read at `principal_axes` (`(num_genes, hidden)`: the training cells' first principal
        axes, orthonormal unless their genes were scaled), scaled so that an orthonormal column's entries are the size
        the initializer gives them. From a random start the few hundred steps of stage 2 leave the read close to a
        random projection, which places cells unlike the training cells far worse than a PCA does (docs/design.md)."""
        if self.expression_weight is None:
            return
        if principal_axes.shape != self.expression_weight.shape:
            raise ValueError(
                f"`principal_axes` has shape {tuple(principal_axes.shape)}; the read needs "
                f"{tuple(self.expression_weight.shape)} (genes x hidden)."
            )
        scale = self.initializer_range * self.expression_weight.shape[0] ** 0.5
        self.expression_weight.copy_(principal_axes.to(self.expression_weight) * scale)

    def read_expression(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor,
        measured_gene_mask: torch.Tensor,
    ) -> torch.Tensor | None:
        """(batch, hidden) read of the whole cell added to e_C, or None when the config leaves it out. Genes outside
        the measured panel are left out, as the embedding leaves them out."""
        if self.expression_weight is None:
            return None
        measured = measured_gene_mask.expand(gene_ids.shape[0], -1).gather(1, gene_ids.long())
        weights = (gene_values * (attention_mask & measured)).to(self.expression_weight.dtype)
        summed = F.embedding_bag(gene_ids.long(), self.expression_weight, per_sample_weights=weights, mode="sum")
        return self.expression_norm(summed)

    def forward(
        self,
        pathway_tokens: torch.Tensor,
        kept_token_indices: torch.Tensor | None,
        expression_read: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        tokens = pathway_tokens + self.slot_embeddings
        if kept_token_indices is not None:
            tokens = tokens.gather(1, kept_token_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cell_token = self.cell_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        if expression_read is not None:
            cell_token = cell_token + expression_read.to(tokens.dtype)[:, None, :]
        return self.transformer(torch.cat([cell_token, tokens], dim=1), output_hidden_states)

    def cell_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """h_C from the encoder's output `(batch, 1 + tokens, hidden)`: the cell token's own output (the paper's),
        or with `pooling="mean"` the mean over the cell token and the pathway tokens."""
        return hidden[:, 0] if self.pooling == "cell_token" else hidden.mean(1)

    def whiten(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        """The h_C that the model gives: centred, and each principal direction rescaled (`fit_whitening`)."""
        return (cell_embedding - self.whitening_mean.to(cell_embedding.dtype)) @ self.whitening_matrix.to(
            cell_embedding.dtype
        )

    @torch.no_grad()
    def fit_whitening(self, cell_embeddings: torch.Tensor, batch_directions: torch.Tensor | None = None):
        """Fits `whiten` to `(cells, hidden)` raw h_C of training cells: each principal direction of variance v is
        scaled by v**-power, so the variances become v**(1 - 2 power) (square roots at the default 0.25), then all
        by one factor that keeps their total. A few directions of large variance no longer stand for the whole
        cell in distances (docs/design.md). Power 0 leaves h_C as it is.

        `batch_directions` (`(hidden, r)`, orthonormal), the directions along which the training cells' batches
        differ, are projected out first, so that h_C no longer places a cell by its batch; a cell of any batch,
        seen or not, still embeds without one."""
        if self.whitening_power == 0 and batch_directions is None:
            return
        embeddings = cell_embeddings.double()
        mean = embeddings.mean(0)
        readout = torch.eye(embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        if batch_directions is not None:
            batch_directions = batch_directions.to(readout)
            readout = readout - batch_directions @ batch_directions.T
        if self.whitening_power != 0:
            variances, directions = torch.linalg.eigh(torch.cov(((embeddings - mean) @ readout).T))
            variances = variances.clamp_min(variances.max() * 1e-8)
            scales = variances.pow(-self.whitening_power)
            scales = scales * (variances.sum() / (variances * scales.square()).sum()).sqrt()
            readout = readout @ (directions * scales)
        self.whitening_mean.copy_(mean.to(self.whitening_mean.dtype))
        self.whitening_matrix.copy_(readout.to(self.whitening_matrix.dtype))


class ScPaLMGeneDecoder(nn.Module):
    """Decodes N tokens into the expression of every vocabulary gene (Algorithm 3): slot k gives genes
    [k*s, (k+1)*s)."""

    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.num_genes = config.num_genes
        self.slot_embeddings = nn.Parameter(torch.empty(config.num_pathway_tokens, config.hidden_size))
        self.transformer = ScPaLMTransformer(config, config.decoder_num_hidden_layers)
        # Slot k's own readout: every gene has its own loading on its slot's state (a grouped linear layer).
        self.head_weight = nn.Parameter(
            torch.empty(config.num_pathway_tokens, config.hidden_size, config.genes_per_token)
        )
        # Each gene's mean expression is not the tokens' business; a per-gene bias carries it.
        self.gene_bias = nn.Parameter(torch.empty(config.num_genes))
        # Nor is the cell's sequencing depth: the decoder is told it (as scVI's decoder is told the library size), so
        # the tokens and h_C need not spend their largest direction on it.
        self.depth_projection = nn.Linear(CELL_DEPTH_FEATURES, config.hidden_size) if config.decode_with_depth else None
        # And, with batches, the cell's batch (scVI's decoder is given it too): what differs between batches alone
        # need not be carried by the tokens or h_C. The encoders never see the batch, so embedding needs none.
        batches = config.num_batches
        self.batch_embeddings = nn.Parameter(torch.empty(batches, config.hidden_size)) if batches else None

    @torch.no_grad()
    def initialize_gene_bias(self, mean_expression: torch.Tensor):
        """Start the per-gene bias at the training data's mean expression, so the decoder's tokens learn the rest."""
        if mean_expression.shape != self.gene_bias.shape:
            raise ValueError(
                f"`mean_expression` has shape {tuple(mean_expression.shape)}; "
                f"the vocabulary has {self.num_genes} genes."
            )
        self.gene_bias.copy_(mean_expression.to(self.gene_bias))

    def forward(
        self,
        tokens: torch.Tensor,
        depth: torch.Tensor,
        batch_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(batch, N, hidden) tokens, (batch, 2) depth and, with batches, (batch,) batch ids -> (batch, num_genes)
        expression, and with `output_hidden_states` also the slots' final states (batch, N, hidden) that the genes are
        read from."""
        tokens = tokens + self.slot_embeddings
        if self.depth_projection is not None:
            tokens = tokens + self.depth_projection(depth.to(tokens.dtype))[:, None, :]
        if self.batch_embeddings is not None:
            tokens = tokens + self.batch_embeddings.to(tokens.dtype)[batch_ids][:, None, :]
        hidden_states, _ = self.transformer(tokens)
        genes = torch.einsum("bkd,kds->bks", hidden_states, self.head_weight.to(hidden_states.dtype))
        genes = genes.flatten(1)[:, : self.num_genes] + self.gene_bias
        return (genes, hidden_states) if output_hidden_states else genes


def sample_kept_token_indices(
    batch_size: int,
    num_tokens: int,
    num_kept: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(batch, num_kept) random pathway-token indices, sorted (section 3.3), drawn afresh for every cell."""
    return kept_token_indices_from_noise(
        torch.rand(batch_size, num_tokens, generator=generator, device=device), num_kept
    )


def kept_token_indices_from_noise(noise: torch.Tensor, num_kept: int) -> torch.Tensor:
    """The sorted indices of the `num_kept` smallest noise values of each row: a uniform draw of p% of the tokens."""
    return noise.argsort(dim=1)[:, :num_kept].sort(dim=1).values


# -- pseudo-label contrastive loss ------------------------------------------------------------------------------------


def spherical_kmeans(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations on unit vectors (cosine similarity); returns unit centroids."""
    points = F.normalize(points.float(), dim=-1)
    centroids = points[torch.randint(points.shape[0], (1,), generator=generator, device=points.device)]
    for _ in range(1, num_clusters):
        distance = (1 - (points @ centroids.T).amax(-1)).clamp_min(0)
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, points[pick]])
    for _ in range(KMEANS_ITERATIONS):
        assignment = (points @ centroids.T).argmax(-1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=num_clusters)
        # An empty cluster keeps its centroid.
        centroids = torch.where(sizes[:, None] > 0, F.normalize(sums, dim=-1), centroids)
    return centroids


class ScPaLMPseudoLabelContrast(nn.Module):
    """
    Eq. 2 as InfoNCE with cosine similarity over tau: the two views of a cell are the positive pair; cells of other
    k-means pseudo-clusters (at most `contrastive_max_negatives`, drawn at random) are the negatives. A queue of recent
    cell embeddings is refitted every `contrastive_refit_interval` steps; before the first fit every other cell is a
    negative. Under torch.distributed the queue holds every process's embeddings in rank order and k-means is seeded
    by the step, so every process computes the same pseudo-labels.
    """

    def __init__(self, config: ScPaLMConfig):
        super().__init__()
        self.temperature = config.contrastive_temperature
        self.max_negatives = config.contrastive_max_negatives
        self.num_clusters = config.contrastive_num_clusters
        self.refit_interval = config.contrastive_refit_interval
        self.register_buffer("queue", torch.empty(config.contrastive_queue_size, config.hidden_size))
        self.register_buffer("queue_filled", torch.empty((), dtype=torch.long))
        self.register_buffer("queue_position", torch.empty((), dtype=torch.long))
        self.register_buffer("centroids", torch.empty(config.contrastive_num_clusters, config.hidden_size))
        self.register_buffer("centroids_fitted", torch.empty((), dtype=torch.bool))
        self.register_buffer("step", torch.empty((), dtype=torch.long))

    def forward(self, cell_embedding: torch.Tensor, second_view_embedding: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._maybe_refit()
        anchors = F.normalize(cell_embedding.float(), dim=-1)
        others = F.normalize(second_view_embedding.float(), dim=-1)
        negatives = ~torch.eye(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        if self.centroids_fitted:
            labels = (anchors.detach() @ self.centroids.T).argmax(-1)
            negatives &= labels[:, None] != labels[None, :]
        negatives = self._limit_negatives(negatives)
        logits = anchors @ others.T / self.temperature
        loss = 0.5 * (_info_nce(logits, negatives) + _info_nce(logits.T, negatives.T))
        if self.training:
            self._enqueue(anchors.detach())
        return loss

    def _limit_negatives(self, negatives: torch.Tensor) -> torch.Tensor:
        if negatives.shape[1] <= self.max_negatives:
            return negatives
        priority = torch.rand(negatives.shape, device=negatives.device).masked_fill(~negatives, -1.0)
        chosen = priority.topk(self.max_negatives, dim=1).indices
        return negatives & torch.zeros_like(negatives).scatter_(1, chosen, True)

    @torch.no_grad()
    def _maybe_refit(self):
        step = int(self.step)
        self.step += 1
        if step % self.refit_interval or int(self.queue_filled) < self.num_clusters:
            return
        generator = torch.Generator(device=self.queue.device).manual_seed(step)
        self.centroids.copy_(spherical_kmeans(self.queue[: int(self.queue_filled)], self.num_clusters, generator))
        self.centroids_fitted.fill_(True)

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(embeddings) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, embeddings.contiguous())
            embeddings = torch.cat(gathered)
        size = self.queue.shape[0]
        embeddings = embeddings[-size:]
        slots = (int(self.queue_position) + torch.arange(embeddings.shape[0], device=embeddings.device)) % size
        self.queue[slots] = embeddings.to(self.queue.dtype)
        self.queue_position.fill_((int(self.queue_position) + embeddings.shape[0]) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + embeddings.shape[0]))


def _info_nce(logits: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of -log(exp(pos) / (exp(pos) + sum exp(neg))); positives on the diagonal."""
    positives = logits.diagonal()
    candidates = torch.cat([positives[:, None], logits.masked_fill(~negatives, float("-inf"))], dim=1)
    return (torch.logsumexp(candidates, dim=1) - positives).mean()


# -- models -----------------------------------------------------------------------------------------------------------


# The pretraining heads' weights: a pretrained folder keeps them (as BERT's keep the MLM head); the encoder and the
# classifier load from it without them, silently.
PRETRAINING_HEAD_KEYS = [r"^decoder\.", r"cell_decoder\.", r"mask_token", r"contrastive\."]


class ScPaLMPreTrainedModel(PreTrainedModel):
    config: ScPaLMConfig
    config_class = ScPaLMConfig
    base_model_prefix = "scpalm"
    main_input_name = "gene_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScPaLMLayer", "ScPaLMEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A folder saved before h_C's readout existed loads with the identity readout, the h_C it was saved with.
    _keys_to_ignore_on_load_missing = [r"whitening_(mean|matrix)$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ScPaLMEmbeddings):
            # Value and gene identity enter the pools at comparable scales.
            init.normal_(module.value_projection, std=1.0)
            init.ones_(module.value_scale)
            init.normal_(module.gene_embeddings, std=1.0)
            # Queries are directions for the cosine pooling logits, and each token's own part (LayerNorm(query +
            # pool)), so they start as distinct as the genes; the logits start at 10 x cosine.
            init.normal_(module.token_queries, std=1.0)
            init.constant_(module.pool_logit_scale, math.log(10.0))
        elif isinstance(module, ScPaLMVectorQuantizer):
            # Codes start on the scale of the LayerNorm-ed encoder output.
            init.normal_(module.codebook, std=1.0)
            init.zeros_(module.codebook_mean)
            init.ones_(module.codebook_std)
            init.zeros_(module.steps_since_used)
        elif isinstance(module, ScPaLMCellEncoder):
            init.normal_(module.cell_token, std=std)
            init.normal_(module.slot_embeddings, std=std)
            if module.expression_weight is not None:
                init.normal_(module.expression_weight, std=std)
            init.zeros_(module.whitening_mean)
            init.eye_(module.whitening_matrix)
        elif isinstance(module, ScPaLMGeneDecoder):
            init.normal_(module.slot_embeddings, std=std)
            init.normal_(module.head_weight, std=std)
            init.zeros_(module.gene_bias)
            if module.batch_embeddings is not None:
                init.normal_(module.batch_embeddings, std=std)
        elif isinstance(module, ScPaLMPseudoLabelContrast):
            for buffer in (module.queue, module.queue_filled, module.queue_position, module.centroids, module.step):
                init.zeros_(buffer)
            init.constant_(module.centroids_fitted, False)
        elif isinstance(module, ScPaLMForCellPretraining):
            init.normal_(module.mask_token, std=std)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules this head keeps fixed while it trains (none by default)."""
        return []

    def freeze_frozen_modules(self):
        for module in self.frozen_modules():
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading puts in new parameters that require grad: freeze this head's fixed parts again.
        model.freeze_frozen_modules()
        saved_as = (model.config.architectures or [None])[0]
        pretraining_head = cls.__name__.startswith(("ScPaLMForPathwayReconstruction", "ScPaLMForCellPretraining"))
        if saved_as == "ScPaLMForPathwayReconstruction" and not pretraining_head:
            warnings.warn(
                "This folder holds a stage-1 model (ScPaLMForPathwayReconstruction): its cell encoder was never "
                "trained, so `cell_embedding` (h_C) carries nothing yet. Train stage 2 on it "
                "(`ScPaLMForCellPretraining.from_pretrained(folder)`, or `scpalm pretrain --stage 2`), or read the "
                "stage-1 representation (`embed_anndata(..., representation='encoder_mean')`).",
                stacklevel=2,
            )
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _check_inputs(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        measured_gene_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and type checks (no device sync); returns the attention and measured-gene masks with defaults."""
        if gene_ids.dim() != 2 or gene_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"`gene_ids` must be an integer tensor of shape (batch, max_nonzero), got {tuple(gene_ids.shape)} "
                f"{gene_ids.dtype}: make inputs with `ScPaLMProcessor`."
            )
        if gene_ids.shape[0] == 0:
            raise ValueError("The batch holds no cells (`gene_ids` has 0 rows): pass at least one cell.")
        if gene_values.shape != gene_ids.shape or not gene_values.is_floating_point():
            raise ValueError(
                f"`gene_values` must be a float tensor shaped like `gene_ids` {tuple(gene_ids.shape)}, got "
                f"{tuple(gene_values.shape)} {gene_values.dtype}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(gene_ids, dtype=torch.bool)
        elif attention_mask.shape != gene_ids.shape:
            raise ValueError(
                f"`attention_mask` {tuple(attention_mask.shape)} must have the shape of "
                f"`gene_ids` {tuple(gene_ids.shape)}."
            )
        num_genes = self.config.num_genes
        if measured_gene_mask is None:
            measured_gene_mask = torch.ones(num_genes, dtype=torch.bool, device=gene_ids.device)
        elif (
            measured_gene_mask.shape[-1] != num_genes
            or measured_gene_mask.dim() not in (1, 2)
            or (measured_gene_mask.dim() == 2 and measured_gene_mask.shape[0] != gene_ids.shape[0])
        ):
            raise ValueError(
                f"`measured_gene_mask` {tuple(measured_gene_mask.shape)} must be ({num_genes},) or "
                f"(batch, {num_genes}): this model's vocabulary has {num_genes} genes (`config.num_genes`). "
                "Use the processor saved with this model."
            )
        return attention_mask.bool(), measured_gene_mask.bool()

    def _check_batch_ids(self, batch_ids: torch.Tensor | None, batch_size: int):
        """A batch-conditioned decoder needs each cell's batch id; a batch-unaware one takes none."""
        num_batches = self.config.num_batches
        if num_batches and batch_ids is None:
            raise ValueError(
                f"This model decodes with the cell's batch (`num_batches={num_batches}`): pass `batch_ids`, which "
                "`ScPaLMDataCollator` makes from a dataset built with a `batch_key`."
            )
        if not num_batches and batch_ids is not None:
            raise ValueError(
                "`batch_ids` were given, but this model was configured without batches (`num_batches=0`): build the "
                "model with `num_batches` set to the dataset's number of batches, or drop the batch column."
            )
        if batch_ids is not None and tuple(batch_ids.shape) != (batch_size,):
            shape = tuple(batch_ids.shape)
            raise ValueError(f"`batch_ids` must be one id per cell, shape ({batch_size},), not {shape}.")


class ScPaLMModel(ScPaLMPreTrainedModel):
    """Embedding, pathway encoder and quantizer (stage 1) and the cell encoder (stage 2); gives h_C."""

    _auto_class = "AutoModel"
    _keys_to_ignore_on_load_unexpected = PRETRAINING_HEAD_KEYS

    def __init__(self, config: ScPaLMConfig):
        super().__init__(config)
        self.embeddings = ScPaLMEmbeddings(config)
        self.encoder = ScPaLMTransformer(config, config.pathway_encoder_num_hidden_layers)
        self.quantizer = ScPaLMVectorQuantizer(config) if config.use_quantizer else None
        self.cell_encoder = ScPaLMCellEncoder(config)
        self.post_init()

    def pathway_modules(self) -> list[nn.Module]:
        """The modules trained in stage 1 and frozen in stage 2."""
        return [module for module in (self.embeddings, self.encoder, self.quantizer) if module is not None]

    def encode_pathways(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor,
        measured_gene_mask: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> ScPaLMPathwayOutput:
        # A deep cell enters through its most expressed genes, in training and at inference alike: a model trained on
        # them and applied to every gene embedded deep cells out of distribution (docs/design.md).
        gene_ids, gene_values, attention_mask = top_expressed_genes(
            gene_ids, gene_values, attention_mask, self.config.max_genes_per_cell, random_ties=self.training
        )
        embedded = self.embeddings(gene_ids, gene_values, attention_mask, measured_gene_mask)
        encoded, hidden_states = self.encoder(embedded, output_hidden_states)
        quantized = self.quantizer(encoded) if self.quantizer is not None else None
        return ScPaLMPathwayOutput(
            tokens=quantized.quantized if quantized is not None else encoded,
            encoder_output=encoded,
            quantizer=quantized,
            hidden_states=hidden_states,
        )

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        measured_gene_mask: torch.Tensor | None = None,
        kept_token_indices: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ScPaLMModelOutput | tuple:
        r"""
        gene_ids (`(batch_size, max_nonzero)`): vocabulary ids of each cell's non-zero genes, padded.
        gene_values (`(batch_size, max_nonzero)`): their log-normalised values.
        attention_mask (`(batch_size, max_nonzero)`, *optional*): True for real entries, False for padding.
        measured_gene_mask (`(num_genes,)` or `(batch_size, num_genes)`, *optional*): vocabulary genes the data
            measured; the rest are left out. Defaults to all.
        kept_token_indices (`(batch_size, kept_tokens)`, *optional*): sorted pathway-token indices for the cell
            encoder; all N tokens by default, which is how cell embeddings are computed.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        attention_mask, measured_gene_mask = self._check_inputs(
            gene_ids, gene_values, attention_mask, measured_gene_mask
        )
        pathway = self.encode_pathways(gene_ids, gene_values, attention_mask, measured_gene_mask, output_hidden_states)
        # The cell encoder reads the pathway encoder's output, not its codes (docs/design.md: the codes lose cells).
        expression_read = self.cell_encoder.read_expression(gene_ids, gene_values, attention_mask, measured_gene_mask)
        hidden, cell_hidden_states = self.cell_encoder(
            pathway.encoder_output, kept_token_indices, expression_read, output_hidden_states
        )
        raw_cell_embedding = self.cell_encoder.cell_embedding(hidden)
        output = ScPaLMModelOutput(
            cell_embedding=self.cell_encoder.whiten(raw_cell_embedding),
            raw_cell_embedding=raw_cell_embedding,
            last_hidden_state=hidden,
            pathway_codes=pathway.quantizer.codes if pathway.quantizer is not None else None,
            pathway_tokens=pathway.tokens,
            pathway_hidden_states=pathway.encoder_output,
            hidden_states=pathway.hidden_states + cell_hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


class ScPaLMForPathwayReconstruction(ScPaLMPreTrainedModel):
    """Stage 1: reconstruct every measured gene from the pathway tokens, plus the quantizer's commitment loss."""

    _auto_class = "AutoModelForPreTraining"
    _keys_to_ignore_on_load_unexpected = [r"cell_decoder\.", r"mask_token", r"contrastive\."]

    def __init__(self, config: ScPaLMConfig):
        super().__init__(config)
        self.scpalm = ScPaLMModel(config)
        self.decoder = ScPaLMGeneDecoder(config)
        self.post_init()
        self.freeze_frozen_modules()

    def frozen_modules(self) -> list[nn.Module]:
        # The cell encoder is stage 2's; freezing it keeps it out of the optimizer and of DDP's unused-parameter check.
        return [self.scpalm.cell_encoder]

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        measured_gene_mask: torch.Tensor | None = None,
        batch_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ScPaLMForPathwayReconstructionOutput | tuple:
        r"""Inputs as [`ScPaLMModel`]; the loss is always computed (the inputs are their own targets).

        batch_ids (`(batch_size,)`, *optional*): each cell's batch, for a model with `config.num_batches` > 0.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        attention_mask, measured_gene_mask = self._check_inputs(
            gene_ids, gene_values, attention_mask, measured_gene_mask
        )
        self._check_batch_ids(batch_ids, gene_ids.shape[0])
        pathway = self.scpalm.encode_pathways(gene_ids, gene_values, attention_mask, measured_gene_mask)
        # The decoder reads the encoder's output; the quantizer learns its codes beside it (commitment loss, codebook
        # side) and costs the representation nothing. Decoding the codes (the paper) lost cells: docs/design.md.
        depth = cell_depth(gene_values, attention_mask, measured_gene_mask)
        reconstruction = self.decoder(pathway.encoder_output, depth, batch_ids).float()
        reconstruction_loss = reconstruction_mse(
            reconstruction, gene_ids, gene_values, attention_mask, measured_gene_mask
        )
        quantized = pathway.quantizer
        commitment_loss = quantized.commitment_loss if quantized is not None else reconstruction_loss.new_zeros(())
        output = ScPaLMForPathwayReconstructionOutput(
            loss=reconstruction_loss + commitment_loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment_loss,
            reconstruction=reconstruction,
            pathway_codes=quantized.codes if quantized is not None else None,
            codebook_perplexity=quantized.perplexity if quantized is not None else None,
            num_dead_codes=quantized.num_dead_codes if quantized is not None else None,
        )
        return output if return_dict else output.to_tuple()


class ScPaLMForCellPretraining(ScPaLMPreTrainedModel):
    """Stage 2 (section 3.3, Algorithm 2): h_C over masked views, reconstruction through it, pseudo-label
    contrast."""

    _auto_class = "AutoModelForPreTraining"
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: ScPaLMConfig):
        super().__init__(config)
        self.scpalm = ScPaLMModel(config)
        self.mask_token = nn.Parameter(torch.empty(config.hidden_size))
        self.cell_decoder = ScPaLMGeneDecoder(config)
        self.contrastive = ScPaLMPseudoLabelContrast(config)
        self.post_init()
        self.freeze_frozen_modules()

    def frozen_modules(self) -> list[nn.Module]:
        return self.scpalm.pathway_modules()

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stage-1 parts stay in eval mode: no dropout, fixed normalisation statistics, no code replacement.
        for module in self.frozen_modules():
            module.eval()
        return self

    def sample_kept_token_indices(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        return sample_kept_token_indices(
            batch_size, self.config.num_pathway_tokens, self.config.num_kept_tokens, device=device
        )

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        measured_gene_mask: torch.Tensor | None = None,
        kept_token_indices: torch.Tensor | None = None,
        contrastive_kept_token_indices: torch.Tensor | None = None,
        batch_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ScPaLMForCellPretrainingOutput | tuple:
        r"""
        kept_token_indices (`(batch_size, kept_tokens)`, *optional*): sorted indices of the pathway tokens the cell
            encoder sees in the reconstructed view; drawn at random when not given (the collator makes them).
        contrastive_kept_token_indices (`(batch_size, kept_tokens)`, *optional*): the second, independent view.
        batch_ids (`(batch_size,)`, *optional*): each cell's batch, for a model with `config.num_batches` > 0.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        attention_mask, measured_gene_mask = self._check_inputs(
            gene_ids, gene_values, attention_mask, measured_gene_mask
        )
        self._check_batch_ids(batch_ids, gene_ids.shape[0])
        batch_size, device = gene_ids.shape[0], gene_ids.device
        with torch.no_grad():
            tokens = self.scpalm.encode_pathways(
                gene_ids, gene_values, attention_mask, measured_gene_mask
            ).encoder_output
        if kept_token_indices is None:
            kept_token_indices = self.sample_kept_token_indices(batch_size, device)
        cell_encoder = self.scpalm.cell_encoder
        expression_read = cell_encoder.read_expression(gene_ids, gene_values, attention_mask, measured_gene_mask)
        hidden, _ = cell_encoder(tokens, kept_token_indices, expression_read)
        cell_embedding = cell_encoder.cell_embedding(hidden)

        # The cell decoder reads h_C alone, in every slot beside e_M: the whole cell, seen through p% of its tokens,
        # must pass through h_C (the paper decodes the kept tokens' outputs and leaves h_C out; docs/design.md).
        decoder_input = self.mask_token.to(hidden.dtype) + cell_embedding[:, None, :]
        depth = cell_depth(gene_values, attention_mask, measured_gene_mask)
        reconstruction, decoded_tokens = self.cell_decoder(
            decoder_input.expand(-1, self.config.num_pathway_tokens, -1), depth, batch_ids, output_hidden_states=True
        )
        reconstruction = reconstruction.float()
        masked_token_mask = torch.ones(batch_size, self.config.num_pathway_tokens, dtype=torch.bool, device=device)
        masked_token_mask.scatter_(1, kept_token_indices, False)
        reconstruction_loss = reconstruction_mse(
            reconstruction, gene_ids, gene_values, attention_mask, measured_gene_mask
        )
        loss = reconstruction_loss

        token_reconstruction_loss = None
        if self.config.token_reconstruction_weight > 0:
            # Algorithm 2 reconstructs the excluded tokens: h_C also predicts every stage-1 token. The genes' MSE is
            # led by a few high-variance directions; the tokens, on one scale per dimension, spread h_C over more of
            # the cell's directions (docs/design.md).
            token_reconstruction_loss = F.mse_loss(decoded_tokens.float(), tokens.float())
            loss = loss + self.config.token_reconstruction_weight * token_reconstruction_loss

        contrastive_loss = None
        if self.config.contrastive_loss_weight > 0:
            if contrastive_kept_token_indices is None:
                contrastive_kept_token_indices = self.sample_kept_token_indices(batch_size, device)
            second_view, _ = cell_encoder(tokens, contrastive_kept_token_indices, expression_read)
            contrastive_loss = self.contrastive(cell_embedding, cell_encoder.cell_embedding(second_view))
            loss = loss + self.config.contrastive_loss_weight * contrastive_loss

        output = ScPaLMForCellPretrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            token_reconstruction_loss=token_reconstruction_loss,
            contrastive_loss=contrastive_loss,
            reconstruction=reconstruction,
            masked_token_mask=masked_token_mask,
            cell_embedding=cell_embedding,
        )
        return output if return_dict else output.to_tuple()


class ScPaLMForCellClassification(ScPaLMPreTrainedModel):
    """A linear classifier on h_C, for fine-tuning with `Trainer`."""

    _auto_class = "AutoModelForSequenceClassification"
    _keys_to_ignore_on_load_unexpected = PRETRAINING_HEAD_KEYS

    def __init__(self, config: ScPaLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.scpalm = ScPaLMModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        measured_gene_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ScPaLMForCellClassificationOutput | tuple:
        r"""labels (`(batch_size,)`, *optional*): class indices (float targets when `num_labels == 1`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cell_embedding = self.scpalm(gene_ids, gene_values, attention_mask, measured_gene_mask).cell_embedding
        logits = self.classifier(self.dropout(cell_embedding))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        output = ScPaLMForCellClassificationOutput(loss=loss, logits=logits, cell_embedding=cell_embedding)
        return output if return_dict else output.to_tuple()


CELL_DEPTH_FEATURES = 2


def cell_depth(
    gene_values: torch.Tensor, attention_mask: torch.Tensor, measured_gene_mask: torch.Tensor
) -> torch.Tensor:
    """(batch, 2) depth of each cell, from all its genes: the log of the share of its panel it expresses, and the mean
    of its expressed values."""
    expressed = (attention_mask & (gene_values != 0)).float()
    num_expressed = expressed.sum(1)
    panel_size = measured_gene_mask.float().sum(-1).expand_as(num_expressed)
    detected = torch.log((num_expressed + 1.0) / (panel_size + 1.0))
    mean_value = (gene_values.float() * expressed).sum(1) / num_expressed.clamp_min(1.0)
    return torch.stack([detected, mean_value], dim=-1)


def top_expressed_genes(
    gene_ids: torch.Tensor, gene_values: torch.Tensor, attention_mask: torch.Tensor, max_genes: int, random_ties: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each cell's `max_genes` most expressed entries, or all of them when it has fewer. Ties (common at one or two
    counts) are broken at random with torch's generator when `random_ties` (training sees every choice), else by
    vocabulary order, so that a cell's embedding depends neither on the order of its genes nor on its batch."""
    if not max_genes or gene_ids.shape[1] <= max_genes:
        return gene_ids, gene_values, attention_mask
    expressed = attention_mask & (gene_values != 0)
    if random_ties:
        # Near the cut, values are a few counts apart, steps far larger than the tie-break.
        priority = gene_values.float().abs() + torch.rand(gene_ids.shape, device=gene_ids.device) * 1e-3
        chosen = priority.masked_fill(~expressed, -1.0).topk(max_genes, dim=1).indices
    else:
        # Exact and on any device: order by gene id, then stably by value, so equal values keep vocabulary order.
        by_gene = gene_ids.masked_fill(~expressed, torch.iinfo(gene_ids.dtype).max).argsort(dim=1, stable=True)
        priority = gene_values.float().abs().masked_fill(~expressed, -1.0).gather(1, by_gene)
        chosen = by_gene.gather(1, priority.argsort(dim=1, descending=True, stable=True)[:, :max_genes])
    chosen = chosen.sort(dim=1).values
    return (
        gene_ids.gather(1, chosen),
        gene_values.gather(1, chosen),
        attention_mask.gather(1, chosen) & expressed.gather(1, chosen),
    )


def reconstruction_mse(
    prediction: torch.Tensor,
    gene_ids: torch.Tensor,
    gene_values: torch.Tensor,
    attention_mask: torch.Tensor,
    measured_gene_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of `prediction` (`(batch, num_genes)`, or `(num_genes,)` for every cell alike) against the
    cells' expression over each cell's measured genes (Algorithm 3: ||o - x||^2 / ||m||_1)."""
    values = (gene_values * attention_mask).float()
    targets = torch.zeros(gene_ids.shape[0], prediction.shape[-1], device=gene_ids.device)
    targets.scatter_add_(1, gene_ids.long(), values)
    mask = measured_gene_mask.expand_as(targets).to(targets.dtype)
    return ((prediction.float() - targets).pow(2) * mask).sum() / mask.sum().clamp_min(1.0)


__all__ = [
    "ScPaLMPreTrainedModel",
    "ScPaLMModel",
    "ScPaLMForPathwayReconstruction",
    "ScPaLMForCellPretraining",
    "ScPaLMForCellClassification",
    "ScPaLMModelOutput",
    "ScPaLMForPathwayReconstructionOutput",
    "ScPaLMForCellPretrainingOutput",
    "ScPaLMForCellClassificationOutput",
]
