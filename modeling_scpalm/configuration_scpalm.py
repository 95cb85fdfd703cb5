"""scPaLM model configuration."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

# Named sizes. "paper" is Table 4 of the paper (N = 256, K = 128, 60,664 genes); "tiny" pretrains both stages on
# pbmc3k in minutes on two CPU cores. Every preset keeps the paper's K = 128 (docs/design.md, "Presets").
PRESETS = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "num_pathway_tokens": 32,
        "codebook_size": 128,
        "contrastive_queue_size": 1024,
        "contrastive_refit_interval": 25,
        "contrastive_num_clusters": 8,
        "contrastive_max_negatives": 32,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "num_pathway_tokens": 64,
        "codebook_size": 128,
    },
    "paper": {
        "num_genes": 60664,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "intermediate_size": 3072,
        "num_pathway_tokens": 256,
        "codebook_size": 128,
    },
}


@strict(accept_kwargs=True)
class ScPaLMConfig(PreTrainedConfig):
    r"""
    Configuration of an scPaLM model (Permutation-invariant embedding -> pathway encoder -> vector quantizer ->
    decoder for stage 1; cell encoder + cell decoder with a contrastive loss for stage 2).

    Args:
        num_genes (`int`): size of the gene vocabulary (the processor's vocabulary length).
        num_pathway_tokens (`int`): N, the number of tokens the embedding pools all genes of a cell into.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob,
        attention_probs_dropout_prob, layer_norm_eps, initializer_range: transformer sizes (Table 4 of the paper).
            `num_hidden_layers` is the depth of the cell encoder (and by default of the others).
        pathway_encoder_num_hidden_layers (`int`, *optional*): depth of the pathway encoder; defaults to
            `num_hidden_layers`; 0 turns it off (the Table 3 ablation: tokens go from the embedding to the quantizer).
        decoder_num_hidden_layers (`int`, *optional*): depth of both decoders; defaults to `num_hidden_layers`.
        share_value_projection (`bool`): one value projection P1 and scale alpha for all genes instead of one per
            gene (the "shared first layer" of Table 6; the gene identity still enters through E_gene).
        codebook_size (`int`): K, the number of pathway codes.
        use_quantizer (`bool`): quantize the pathway tokens (turn off for the Table 3 ablation).
        commitment_beta (`float`): beta of eq. 1; the encoder is pulled to its code with weight beta and the code to
            the encoder output with weight 1 - beta. Default 0: on pbmc3k any encoder-side pull (0.01, 0.05, 0.25
            measured) drew every token onto one code within 25 steps, before the reconstruction could spread them.
        dead_code_patience (`int`): a code unused for this many training steps is replaced by a recent encoder
            output (0 disables replacement).
        token_keep_ratio (`float`): p, the fraction of pathway tokens the cell encoder sees in stage 2.
        token_reconstruction_weight (`float`): weight of stage 2's second reconstruction target, the stage-1 pathway
            tokens (all N, the masked ones too), which the cell decoder's states predict from h_C beside the genes;
            0 decodes genes alone.
        contrastive_loss_weight (`float`): weight of the eq. 2 loss in stage 2; 0 (the default) trains h_C by the
            reconstruction through it alone, which measured better at the CPU budget (docs/design.md); 1 is the paper's.
        contrastive_temperature (`float`): tau of eq. 2.
        contrastive_queue_size (`int`): length of the queue of recent cell embeddings that k-means is fitted on.
        contrastive_refit_interval (`int`): T_r, training steps between k-means refits.
        contrastive_num_clusters (`int`): number of k-means pseudo-labels.
        contrastive_max_negatives (`int`): at most this many negatives (other pseudo-clusters) per anchor.
        max_genes_per_cell (`int`): a cell with more expressed genes enters the embedding through its
            `max_genes_per_cell` most expressed genes, in training and at inference alike (the reconstruction target
            stays the whole cell); 0 reads them all. A deep cell's step then costs what a shallow one's does.
        decode_with_depth (`bool`): give both decoders the cell's depth (the share of its panel it expresses and its
            mean expressed value), so that the tokens and h_C need not encode it.
        cell_embedding_pooling (`str`): how h_C is read from the cell encoder's output: `"cell_token"`, the cell
            token's own output (the paper's; the default), or `"mean"` over the cell token and the pathway tokens it
            saw.
        cell_token_from_expression (`bool`): add to the cell token e_C a learned linear read of the cell's whole
            expression (one vector per gene, summed with the cell's values, then LayerNorm); h_C then sees every
            gene, not only the pathway tokens left after masking. False gives the paper's constant e_C.
        expression_read_gene_scaling (`float`, 0 to 1): pretraining starts the expression read at the principal axes
            of the training cells with each gene's values divided by its standard deviation to this power (then
            rescaled to keep the cells' total variance): 0 (the default) takes the log-normalised values as they
            are, 1 z-scores the genes. Genes of little variance then count for more in where the read places a cell.
        cell_embedding_whitening_power (`float`, 0 to 0.5): the h_C the model gives is the cell token's output
            centred and each principal direction of variance v (over the training cells, fitted after stage 2)
            scaled by v**-power: 0.25 (the default) takes the square root of the spectrum, 0.5 whitens it fully,
            0 leaves the cell token's output as it is. Pretraining losses read the output before it.
        num_batches (`int`): batch-conditioned decoding: both decoders add a learned vector for each cell's batch
            (`batch_ids`), so that the pathway tokens and h_C need not carry what only tells batches apart, and h_C's
            readout leaves out the directions along which the training batches' cells differ. The encoders never
            see the batch, so cells of any batch, new ones too, embed without one. 0 (the default) is
            batch-unaware; `scpalm pretrain --batch_key` sets it from the data.

    Example:

    ```python
    >>> from modeling_scpalm import ScPaLMConfig, ScPaLMModel
    >>> config = ScPaLMConfig.from_preset("tiny", num_genes=2000)
    >>> model = ScPaLMModel(config)
    ```"""

    model_type = "scpalm"

    num_genes: int = 60664
    num_pathway_tokens: int = 256
    hidden_size: int = 768
    num_hidden_layers: int = 12
    pathway_encoder_num_hidden_layers: int | None = None
    decoder_num_hidden_layers: int | None = None
    num_attention_heads: int = 8
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    share_value_projection: bool = False
    codebook_size: int = 128
    use_quantizer: bool = True
    commitment_beta: float = 0.0
    dead_code_patience: int = 20
    token_keep_ratio: float = 0.5
    token_reconstruction_weight: float | int = 0.03
    contrastive_loss_weight: float | int = 0.0
    contrastive_temperature: float = 0.2
    contrastive_queue_size: int = 4096
    contrastive_refit_interval: int = 100
    contrastive_num_clusters: int = 16
    contrastive_max_negatives: int = 128
    max_genes_per_cell: int = 1024
    decode_with_depth: bool = True
    cell_embedding_pooling: str = "cell_token"
    cell_token_from_expression: bool = True
    expression_read_gene_scaling: float | int = 0.0
    cell_embedding_whitening_power: float | int = 0.25
    num_batches: int = 0

    def __post_init__(self, **kwargs):
        if self.pathway_encoder_num_hidden_layers is None:
            self.pathway_encoder_num_hidden_layers = self.num_hidden_layers
        if self.decoder_num_hidden_layers is None:
            self.decoder_num_hidden_layers = self.num_hidden_layers
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ScPaLMConfig":
        """A named size (`"tiny"`, `"small"` or `"paper"`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def genes_per_token(self) -> int:
        """s of Algorithm 3: each pathway token decodes this many consecutive vocabulary genes."""
        return -(-self.num_genes // self.num_pathway_tokens)

    @property
    def num_kept_tokens(self) -> int:
        """N' of section 3.3: how many pathway tokens the cell encoder sees in stage 2."""
        return max(1, round(self.token_keep_ratio * self.num_pathway_tokens))

    def validate_scpalm(self):
        """Part of `@strict` validation: every value in range, with the fix in the message."""
        positive = (
            "num_genes",
            "num_pathway_tokens",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "codebook_size",
            "contrastive_queue_size",
            "contrastive_refit_interval",
            "contrastive_num_clusters",
            "contrastive_max_negatives",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in (
            "num_hidden_layers",
            "pathway_encoder_num_hidden_layers",
            "decoder_num_hidden_layers",
            "dead_code_patience",
            "max_genes_per_cell",
            "num_batches",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}): pick a head count that divides it."
            )
        if self.num_pathway_tokens > self.num_genes:
            raise ValueError(
                f"`num_pathway_tokens` ({self.num_pathway_tokens}) exceeds `num_genes` ({self.num_genes}): "
                "pool into fewer tokens than there are genes."
            )
        if not 0.0 <= self.commitment_beta <= 1.0:
            raise ValueError(
                f"`commitment_beta` weighs two terms of eq. 1 and must be in [0, 1], got {self.commitment_beta}."
            )
        if not 0.0 < self.token_keep_ratio < 1.0 or self.num_kept_tokens >= self.num_pathway_tokens:
            raise ValueError(
                f"`token_keep_ratio` ({self.token_keep_ratio}) must keep at least one and mask at least one of the "
                f"{self.num_pathway_tokens} pathway tokens: use a value in (0, 1), e.g. 0.5."
            )
        if self.cell_embedding_pooling not in ("mean", "cell_token"):
            raise ValueError(
                "`cell_embedding_pooling` must be 'mean' or 'cell_token' (the paper's), "
                f"got {self.cell_embedding_pooling!r}."
            )
        if not 0 <= self.cell_embedding_whitening_power <= 0.5:
            raise ValueError(
                "`cell_embedding_whitening_power` must be within [0, 0.5] (0 leaves h_C as it is, 0.5 whitens it), "
                f"got {self.cell_embedding_whitening_power}."
            )
        if not 0 <= self.expression_read_gene_scaling <= 1:
            raise ValueError(
                "`expression_read_gene_scaling` must be within [0, 1] (0 reads the log-normalised values as they "
                f"are, 1 z-scores each gene), got {self.expression_read_gene_scaling}."
            )
        if self.token_reconstruction_weight < 0:
            raise ValueError(
                "`token_reconstruction_weight` must be >= 0 (0 decodes genes alone), "
                f"got {self.token_reconstruction_weight}."
            )
        if self.contrastive_loss_weight < 0:
            raise ValueError(
                f"`contrastive_loss_weight` must be >= 0 (0 disables the loss), got {self.contrastive_loss_weight}."
            )
        if self.contrastive_temperature <= 0:
            raise ValueError(f"`contrastive_temperature` must be > 0, got {self.contrastive_temperature}.")
        if self.contrastive_num_clusters > self.contrastive_queue_size:
            raise ValueError(
                f"`contrastive_num_clusters` ({self.contrastive_num_clusters}) exceeds `contrastive_queue_size` "
                f"({self.contrastive_queue_size}): k-means needs at least one queued cell per cluster."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")


__all__ = ["PRESETS", "ScPaLMConfig"]
