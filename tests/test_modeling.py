"""The models: shapes of every head, save/reload and Auto round trips, stage-2 freezing, attention backends, bf16."""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from modeling_scpalm import (
    PRESETS,
    ScPaLMConfig,
    ScPaLMForCellClassification,
    ScPaLMForCellPretraining,
    ScPaLMForPathwayReconstruction,
    ScPaLMModel,
)
from modeling_scpalm.modeling_scpalm import ScPaLMLayer, cell_depth, reconstruction_mse, top_expressed_genes

from .conftest import random_cells, sparse_inputs

BATCH = 4


@pytest.fixture
def inputs(tiny_config):
    return sparse_inputs(random_cells(BATCH, tiny_config.num_genes, seed=11))


def test_model_output_shapes(tiny_config, inputs):
    output = ScPaLMModel(tiny_config).eval()(**inputs, output_hidden_states=True)
    hidden, tokens = tiny_config.hidden_size, tiny_config.num_pathway_tokens
    assert output.cell_embedding.shape == (BATCH, hidden)
    assert output.last_hidden_state.shape == (BATCH, 1 + tokens, hidden)
    assert output.pathway_codes.shape == (BATCH, tokens) and output.pathway_codes.dtype == torch.long
    assert output.pathway_tokens.shape == output.pathway_hidden_states.shape == (BATCH, tokens, hidden)
    # embedding output + every pathway-encoder layer, then cell-encoder input + every cell-encoder layer
    assert len(output.hidden_states) == 2 * (tiny_config.num_hidden_layers + 1)
    kept = torch.arange(5).expand(BATCH, -1)
    assert ScPaLMModel(tiny_config)(**inputs, kept_token_indices=kept).last_hidden_state.shape == (BATCH, 6, hidden)


def test_ablation_configs_turn_off_the_pathway_encoder_and_the_quantizer(tiny_config, inputs):
    config = copy.deepcopy(tiny_config)
    config.pathway_encoder_num_hidden_layers = 0
    config.use_quantizer = False
    torch.manual_seed(0)
    model = ScPaLMModel(config).eval()
    assert len(model.encoder.layers) == 0 and model.quantizer is None
    assert len(model.cell_encoder.transformer.layers) == config.num_hidden_layers  # h_C still aggregates
    with torch.no_grad():
        output = model(**inputs)
        tokens = model.encoder.norm(
            model.embeddings(**inputs, measured_gene_mask=torch.ones(config.num_genes, dtype=torch.bool))
        )
    torch.testing.assert_close(output.pathway_tokens, tokens)  # embedding straight to the cell encoder
    assert output.pathway_codes is None and output.cell_embedding.std(0).min() > 0


def test_stage_one_output(tiny_config, inputs):
    output = ScPaLMForPathwayReconstruction(tiny_config)(**inputs)
    assert output.reconstruction.shape == (BATCH, tiny_config.num_genes)
    assert output.loss.ndim == 0
    torch.testing.assert_close(output.loss, output.reconstruction_loss + output.commitment_loss)
    assert 1.0 <= output.codebook_perplexity <= tiny_config.codebook_size
    output.loss.backward()


def test_stage_two_output_and_masks(tiny_config, inputs):
    tiny_config.contrastive_loss_weight = 1.0  # the paper's weight; the default trains without the contrast
    model = ScPaLMForCellPretraining(tiny_config).train()
    kept = model.sample_kept_token_indices(BATCH)
    assert kept.shape == (BATCH, tiny_config.num_kept_tokens)
    assert (kept.diff(dim=1) > 0).all(), "kept indices are sorted and distinct"
    output = model(**inputs, kept_token_indices=kept)
    assert output.reconstruction.shape == (BATCH, tiny_config.num_genes)
    assert output.cell_embedding.shape == (BATCH, tiny_config.hidden_size)
    assert (output.masked_token_mask.sum(1) == tiny_config.num_pathway_tokens - tiny_config.num_kept_tokens).all()
    assert not output.masked_token_mask.gather(1, kept).any()
    torch.testing.assert_close(
        output.loss,
        output.reconstruction_loss
        + tiny_config.token_reconstruction_weight * output.token_reconstruction_loss
        + tiny_config.contrastive_loss_weight * output.contrastive_loss,
    )
    tiny_config.contrastive_loss_weight = 0.0
    tiny_config.token_reconstruction_weight = 0.0
    genes_only = ScPaLMForCellPretraining(tiny_config)(**inputs)
    assert genes_only.contrastive_loss is None and genes_only.token_reconstruction_loss is None
    torch.testing.assert_close(genes_only.loss, genes_only.reconstruction_loss)


def test_stage_two_reconstructs_every_gene_from_h_c_alone(tiny_config, inputs):
    """The cell decoder reads h_C (beside e_M) and nothing else: the whole cell must pass through the cell token."""
    model = ScPaLMForCellPretraining(tiny_config).eval()
    kept = model.sample_kept_token_indices(BATCH)
    output = model(**inputs, kept_token_indices=kept)
    targets = torch.zeros(BATCH, tiny_config.num_genes).scatter_add_(
        1, inputs["gene_ids"], inputs["gene_values"] * inputs["attention_mask"]
    )
    torch.testing.assert_close(output.reconstruction_loss, ((output.reconstruction - targets) ** 2).mean())
    depth = cell_depth(
        inputs["gene_values"], inputs["attention_mask"], torch.ones(tiny_config.num_genes, dtype=torch.bool)
    )
    with torch.no_grad():
        decoder_input = (model.mask_token + output.cell_embedding[:, None]).expand(
            -1, tiny_config.num_pathway_tokens, -1
        )
        genes, decoded_tokens = model.cell_decoder(decoder_input, depth, output_hidden_states=True)
        torch.testing.assert_close(output.reconstruction, genes)
        # The second target: every stage-1 pathway token (masked or kept), from the same decoder states.
        measured = torch.ones(tiny_config.num_genes, dtype=torch.bool)
        stage_one_tokens = model.scpalm.encode_pathways(
            inputs["gene_ids"], inputs["gene_values"], inputs["attention_mask"].bool(), measured
        ).encoder_output
    assert stage_one_tokens.shape == decoded_tokens.shape
    assert decoded_tokens.shape == (BATCH, tiny_config.num_pathway_tokens, tiny_config.hidden_size)
    torch.testing.assert_close(output.token_reconstruction_loss, ((decoded_tokens - stage_one_tokens) ** 2).mean())


def test_cell_embedding_pooling(tiny_config, inputs):
    """h_C is the cell token's own output by default (the paper's), the mean of the cell encoder's outputs with
    "mean"."""
    model = ScPaLMModel(tiny_config).eval()
    output = _outputs(model, inputs)
    torch.testing.assert_close(output.cell_embedding, output.last_hidden_state[:, 0])
    model.cell_encoder.pooling = "mean"
    output = _outputs(model, inputs)
    torch.testing.assert_close(output.cell_embedding, output.last_hidden_state.mean(1))
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="cell_embedding_pooling"):
        ScPaLMConfig.from_preset("tiny", num_genes=300, cell_embedding_pooling="max")


def test_h_c_readout_takes_the_square_root_of_the_training_spectrum(tiny_config, inputs):
    """After `fit_whitening` the model's h_C is the cell token's output centred and rotated onto its principal
    directions, each variance v turned into one proportional to sqrt(v) (power 0.25), the total kept; the pretraining
    head still reads the output before it, and the model gives it as `raw_cell_embedding`. Power 0 leaves h_C as it
    is."""
    model = ScPaLMForCellPretraining(tiny_config).eval()
    encoder = model.scpalm.cell_encoder
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -3, tiny_config.hidden_size)
    raw = torch.randn(4000, tiny_config.hidden_size, generator=generator) * scales + 5
    encoder.fit_whitening(raw)
    whitened = encoder.whiten(raw).double()
    variances = torch.linalg.eigvalsh(torch.cov(whitened.T)).flip(0)
    expected = torch.linalg.eigvalsh(torch.cov(raw.double().T)).flip(0).sqrt()
    torch.testing.assert_close(variances / variances.sum(), expected / expected.sum(), rtol=1e-3, atol=1e-6)
    assert variances.sum() == pytest.approx(torch.cov(raw.double().T).trace().item(), rel=1e-3)
    assert whitened.mean(0).abs().max() < 1e-3
    with torch.no_grad():
        base = model.scpalm(**inputs)
        torch.testing.assert_close(base.raw_cell_embedding, base.last_hidden_state[:, 0])
        torch.testing.assert_close(base.cell_embedding, encoder.whiten(base.raw_cell_embedding))
        assert not torch.allclose(base.cell_embedding, base.raw_cell_embedding, atol=1e-2)
        every_token = torch.arange(tiny_config.num_pathway_tokens).expand(BATCH, -1)
        pretraining = model(**inputs, kept_token_indices=every_token)
    torch.testing.assert_close(pretraining.cell_embedding, base.last_hidden_state[:, 0])
    identity = ScPaLMModel(tiny_config).cell_encoder
    identity.whitening_power = 0
    identity.fit_whitening(raw)
    torch.testing.assert_close(identity.whiten(raw), raw)
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="cell_embedding_whitening_power"):
        ScPaLMConfig.from_preset("tiny", num_genes=300, cell_embedding_whitening_power=1.0)
    with pytest.raises(StrictDataclassError, match="expression_read_gene_scaling"):
        ScPaLMConfig.from_preset("tiny", num_genes=300, expression_read_gene_scaling=-0.1)


def test_h_c_readout_projects_out_the_batch_directions(tiny_config):
    """Given the directions along which the training cells' batches differ, the readout removes them before the
    rescaling: cells shifted by their batch along them embed at the same point, which needs no batch to embed."""
    encoder = ScPaLMModel(tiny_config).cell_encoder
    generator = torch.Generator().manual_seed(0)
    hidden = tiny_config.hidden_size
    directions, _ = torch.linalg.qr(torch.randn(hidden, 2, generator=generator, dtype=torch.float64))
    raw = torch.randn(3000, hidden, generator=generator) * torch.logspace(0, -1, hidden)
    encoder.fit_whitening(raw, directions)
    assert torch.linalg.matrix_rank(encoder.whitening_matrix, rtol=1e-4) == hidden - 2
    shifted = raw + (torch.randn(3000, 2, generator=generator, dtype=torch.float64) * 5) @ directions.T
    torch.testing.assert_close(encoder.whiten(shifted.float()), encoder.whiten(raw), atol=1e-4, rtol=0)
    # What varies outside them keeps the readout without batches: the same square-rooted spectrum.
    projection = torch.eye(hidden, dtype=torch.float64) - directions @ directions.T
    plain = ScPaLMModel(tiny_config).cell_encoder
    plain.fit_whitening((raw.double() @ projection).float())
    torch.testing.assert_close(encoder.whiten(raw), plain.whiten(raw @ projection.float()), atol=1e-4, rtol=1e-3)
    power_zero = ScPaLMModel(tiny_config).cell_encoder
    power_zero.whitening_power = 0
    power_zero.fit_whitening(raw, directions)
    centred = (raw.double() - raw.double().mean(0)) @ projection
    torch.testing.assert_close(power_zero.whiten(raw), centred.float(), atol=1e-5, rtol=0)


def test_cell_token_from_expression_reads_every_gene_in_any_order(tiny_config, inputs, tmp_path):
    """e_C + LayerNorm(sum_g x_g w_g): the read sees every gene (the top-k cut is the pathway side's), ignores
    padding and gene order, reaches h_C in both stage-2 views, and round-trips through save/load."""
    tiny_config.cell_token_from_expression = True
    model = ScPaLMForCellPretraining(tiny_config).eval()
    encoder = model.scpalm.cell_encoder
    ids, values, mask = inputs["gene_ids"], inputs["gene_values"], inputs["attention_mask"].bool()
    measured = torch.ones(tiny_config.num_genes, dtype=torch.bool)
    dense = torch.zeros(BATCH, tiny_config.num_genes).scatter_add_(1, ids, values * mask)
    with torch.no_grad():
        read = encoder.read_expression(ids, values, mask, measured)
        torch.testing.assert_close(read, encoder.expression_norm(dense @ encoder.expression_weight))
        order = torch.randperm(ids.shape[1])
        shuffled = (ids[:, order], values[:, order], mask[:, order])
        torch.testing.assert_close(encoder.read_expression(*shuffled, measured), read)
        padded = [torch.cat([t, t[:, :3]], 1) for t in (ids, values)]
        padded_mask = torch.cat([mask, torch.zeros(BATCH, 3, dtype=torch.bool)], 1)
        torch.testing.assert_close(encoder.read_expression(*padded, padded_mask, measured), read)
        # A gene outside the measured panel is left out, per cell too.
        measured[ids[0, 0]] = False
        dense[:, ids[0, 0]] = 0
        expected = encoder.expression_norm(dense @ encoder.expression_weight)
        torch.testing.assert_close(encoder.read_expression(ids, values, mask, measured), expected)
        torch.testing.assert_close(encoder.read_expression(ids, values, mask, measured.expand(BATCH, -1)), expected)
        kept = model.sample_kept_token_indices(BATCH)
        with_read = model(**inputs, kept_token_indices=kept).cell_embedding
        encoder.expression_weight.zero_()
        assert not torch.allclose(model(**inputs, kept_token_indices=kept).cell_embedding, with_read)
    model.train()
    model(**inputs).loss.backward()
    assert encoder.expression_weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    base = ScPaLMModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(base.cell_encoder.expression_weight, encoder.expression_weight)
    tiny_config.cell_token_from_expression = False  # the paper's constant e_C
    assert ScPaLMModel(tiny_config).cell_encoder.expression_weight is None


def test_batch_conditioned_decoders_need_the_batch_and_use_it(tiny_config, inputs):
    """With `num_batches`, both decoders add the cell's batch vector; the embedding never sees the batch."""
    tiny_config.num_batches = 3
    batch_ids = torch.tensor([0, 1, 2, 1])
    for head in (ScPaLMForPathwayReconstruction, ScPaLMForCellPretraining):
        model = head(tiny_config).eval()
        stage_two = head is ScPaLMForCellPretraining
        kept = {"kept_token_indices": model.sample_kept_token_indices(BATCH)} if stage_two else {}
        with torch.no_grad():
            output = model(**inputs, **kept, batch_ids=batch_ids)
            other = model(**inputs, **kept, batch_ids=torch.tensor([2, 0, 1, 1]))
        changed = (output.reconstruction - other.reconstruction).abs().amax(1) > 0
        assert changed.tolist() == [True, True, True, False]
        with pytest.raises(ValueError, match="decodes with the cell's batch .*pass `batch_ids`"):
            model(**inputs, **kept)
        with pytest.raises(ValueError, match="one id per cell"):
            model(**inputs, **kept, batch_ids=batch_ids[:2])
    tiny_config.num_batches = 0
    with pytest.raises(ValueError, match="configured without batches"):
        ScPaLMForPathwayReconstruction(tiny_config)(**inputs, batch_ids=batch_ids)


def test_decoders_are_told_the_cell_depth(tiny_config, inputs):
    """The depth features are the log share of the panel a cell expresses and its mean expressed value, and they reach
    the reconstruction; `decode_with_depth=False` leaves them out."""
    panel = torch.zeros(tiny_config.num_genes, dtype=torch.bool)
    panel[:100] = True
    values = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = torch.tensor([[math.log(3 / 101), 2.0], [math.log(2 / 101), 2.0]])
    torch.testing.assert_close(cell_depth(values, mask, panel), expected)

    model = ScPaLMForPathwayReconstruction(tiny_config).eval()
    tokens = torch.randn(2, tiny_config.num_pathway_tokens, tiny_config.hidden_size)
    with torch.no_grad():
        assert not torch.allclose(model.decoder(tokens, expected), model.decoder(tokens, expected + 1.0))
    tiny_config.decode_with_depth = False
    assert ScPaLMForPathwayReconstruction(tiny_config).decoder.depth_projection is None


def test_classification_head(tiny_config, inputs):
    tiny_config.num_labels = 3
    model = ScPaLMForCellClassification(tiny_config)
    labels = torch.tensor([0, 2, 1, 2])
    output = model(**inputs, labels=labels)
    assert output.logits.shape == (BATCH, 3)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))


def test_stage_two_training_leaves_stage_one_weights_unchanged(tiny_config, inputs, tmp_path):
    stage_one = ScPaLMForPathwayReconstruction(tiny_config)
    stage_one.save_pretrained(tmp_path)
    model = ScPaLMForCellPretraining.from_pretrained(tmp_path)
    frozen = {
        name: p.detach().clone() for name, p in model.scpalm.named_parameters() if not name.startswith("cell_encoder")
    }
    frozen_buffers = {name: b.clone() for name, b in model.scpalm.named_buffers()}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, before in frozen.items():
        assert torch.equal(before, model.scpalm.get_parameter(name)), name
    for name, before in frozen_buffers.items():
        assert torch.equal(before, model.scpalm.get_buffer(name)), name
    assert not any(name.startswith("scpalm.embeddings") for name in trainable)
    assert any(not torch.equal(before, model.get_parameter(name)) for name, before in trainable.items())


def _outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs)


def test_save_and_reload_give_identical_outputs(tiny_config, inputs, tmp_path):
    model = ScPaLMForPathwayReconstruction(tiny_config)
    with torch.no_grad():
        model.scpalm.quantizer.steps_since_used.random_(0, 5)  # buffers must round-trip too
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded, info = ScPaLMForPathwayReconstruction.from_pretrained(tmp_path, output_loading_info=True)
    assert torch.equal(reloaded.scpalm.quantizer.steps_since_used, model.scpalm.quantizer.steps_since_used)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(_outputs(reloaded, inputs).reconstruction, _outputs(model, inputs).reconstruction)


def test_deep_cells_enter_through_their_most_expressed_genes_but_are_reconstructed_whole(tiny_config, inputs):
    """Training and inference read a cell's `max_genes_per_cell` most expressed genes (a model trained on them must
    not embed every gene); the loss still covers every gene."""
    tiny_config.max_genes_per_cell = 3
    model = ScPaLMForPathwayReconstruction(tiny_config).train()
    read = []
    original = model.scpalm.embeddings.forward
    model.scpalm.embeddings.forward = lambda *args, **kwargs: read.append(args) or original(*args, **kwargs)
    output = model(**inputs)
    model.eval()(**inputs)
    for gene_ids, gene_values, attention_mask, _ in read:
        assert gene_ids.shape[1] == 3 and attention_mask.all() and (gene_values != 0).all()
        for cell in range(BATCH):
            real = inputs["attention_mask"][cell]
            values, ids = inputs["gene_values"][cell][real], inputs["gene_ids"][cell][real]
            assert set(gene_ids[cell].tolist()) == set(ids[values.topk(3).indices].tolist())
    targets = torch.zeros(BATCH, tiny_config.num_genes).scatter_add_(
        1, inputs["gene_ids"], inputs["gene_values"] * inputs["attention_mask"]
    )
    torch.testing.assert_close(output.reconstruction_loss, ((output.reconstruction - targets) ** 2).mean())


def test_reconstruction_loss_is_the_squared_error_over_each_cells_measured_genes():
    """Both heads' loss and the mean-expression floor: a per-cell prediction or one for every cell alike, scored
    on the genes each cell's panel measured (an unmeasured gene's zero is no observation)."""
    dense = random_cells(BATCH, 12, seed=5)
    inputs = sparse_inputs(dense)
    measured = torch.ones(BATCH, 12, dtype=torch.bool)
    measured[:2, 8:] = False  # two cells from a panel without the last four genes
    prediction = np.random.default_rng(6).normal(size=(BATCH, 12)).astype(np.float32)
    mean = dense.mean(0)
    for predicted, expected_error in ((prediction, prediction - dense), (mean, mean[None, :] - dense)):
        expected = (expected_error**2)[measured.numpy()].mean()
        loss = reconstruction_mse(torch.from_numpy(predicted), **inputs, measured_gene_mask=measured)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_inference_breaks_ties_at_the_cut_by_vocabulary_order_not_by_input_order():
    gene_ids = torch.tensor([[9, 4, 7, 2, 5]])
    gene_values = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0]])
    mask = torch.ones_like(gene_ids, dtype=torch.bool)
    chosen = [
        set(top_expressed_genes(gene_ids[:, order], gene_values[:, order], mask, 3, random_ties=False)[0][0].tolist())
        for order in (torch.arange(5), torch.tensor([3, 0, 4, 2, 1]), torch.tensor([2, 4, 1, 3, 0]))
    ]
    assert chosen == [{4, 2, 7}] * 3  # 3.0, then the two lowest ids of the 1.0s; the zero never
    drawn = {
        frozenset(top_expressed_genes(gene_ids, gene_values, mask, 2, random_ties=True)[0][0].tolist())
        for _ in range(50)
    }
    assert drawn == {frozenset({4, 9}), frozenset({4, 7}), frozenset({4, 2})}


def test_auto_classes_load_a_saved_folder(tiny_config, inputs, tmp_path):
    stage_two = ScPaLMForCellPretraining(tiny_config)
    stage_two.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ScPaLMConfig)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, ScPaLMModel)
    torch.testing.assert_close(
        _outputs(model, inputs).cell_embedding, _outputs(stage_two.scpalm, inputs).cell_embedding
    )
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert isinstance(classifier, ScPaLMForCellClassification)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_scpalm.ScPaLMModel"
    for module in ("configuration_scpalm.py", "modeling_scpalm.py", "embedding_scpalm.py", "quantizer_scpalm.py"):
        assert (tmp_path / module).exists(), module


def test_trust_remote_code_without_the_package(tiny_config, tmp_path):
    """The Hub path: a process that cannot import `modeling_scpalm` loads the folder's own code, the processor's too."""
    from modeling_scpalm import ScPaLMProcessor

    model = ScPaLMForPathwayReconstruction(tiny_config)
    processor = ScPaLMProcessor([f"GENE{index}" for index in range(tiny_config.num_genes)])
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    counts = random_cells(6, 40, seed=3).round()
    np.save(tmp_path / "counts.npy", counts)
    with torch.no_grad():
        expected = model.scpalm(**processor(counts, gene_names=[f"GENE{index}" for index in range(40)])).cell_embedding
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_scpalm"] = None  # the package is not installed here
        import numpy as np, torch
        from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(AutoFeatureExtractor.from_pretrained({str(folder)!r}, trust_remote_code=True)) is type(processor)
        for loaded in (model, processor):
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        inputs = processor(np.load({str(tmp_path / "counts.npy")!r}), gene_names=[f"GENE{{i}}" for i in range(40)])
        with torch.no_grad():
            torch.save(model(**inputs).cell_embedding, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_sdpa_and_eager_attention_agree(tiny_config, inputs):
    torch.manual_seed(0)
    sdpa = ScPaLMModel(tiny_config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = ScPaLMModel(tiny_config)
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    torch.testing.assert_close(
        _outputs(sdpa, inputs).cell_embedding, _outputs(eager, inputs).cell_embedding, atol=1e-5, rtol=1e-4
    )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, inputs):
    torch.manual_seed(0)
    model = ScPaLMForPathwayReconstruction(tiny_config).eval()  # eval: no dead-code replacement between runs
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.modules() if isinstance(layer, ScPaLMLayer))
    model.train()
    model.scpalm.quantizer.eval()
    model(**inputs).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_forward_and_backward(tiny_config, inputs):
    model = ScPaLMForCellPretraining(tiny_config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_input_shape_errors_name_the_fix(tiny_config, inputs):
    model = ScPaLMModel(tiny_config)
    with pytest.raises(ValueError, match="must be \\(300,\\)"):
        model(**inputs, measured_gene_mask=torch.ones(299, dtype=torch.bool))
    with pytest.raises(ValueError, match="shaped like `gene_ids`"):
        model(inputs["gene_ids"], inputs["gene_values"][:, :-1])
    with pytest.raises(ValueError, match="integer tensor"):
        model(inputs["gene_values"], inputs["gene_values"])


def test_config_validation_names_the_fix():
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="divisible by `num_attention_heads`"):
        ScPaLMConfig(hidden_size=100, num_attention_heads=8)
    with pytest.raises(StrictDataclassError, match="token_keep_ratio"):
        ScPaLMConfig(token_keep_ratio=1.0)
    with pytest.raises(StrictDataclassError, match="token_reconstruction_weight"):
        ScPaLMConfig(token_reconstruction_weight=-1.0)
    with pytest.raises(StrictDataclassError, match="exceeds `num_genes`"):
        ScPaLMConfig(num_genes=10, num_pathway_tokens=32)
    with pytest.raises(StrictDataclassError, match="expected int"):
        ScPaLMConfig(hidden_size="768")
    with pytest.raises(ValueError, match="Unknown preset"):
        ScPaLMConfig.from_preset("huge")


def test_paper_preset_is_table_four():
    config = ScPaLMConfig.from_preset("paper")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 8)
    assert (config.intermediate_size, config.num_pathway_tokens, config.codebook_size) == (3072, 256, 128)
    assert config.num_genes == 60664 and set(PRESETS) == {"tiny", "small", "paper"}
    with torch.device("meta"):
        model = ScPaLMForCellPretraining(config)  # paper scale is configuration, not new code
    assert sum(p.numel() for p in model.parameters()) > 300e6


@pytest.mark.slow
def test_compiled_model_computes_what_the_eager_model_does(tiny_config, inputs):
    """torch.compile (inductor) as a fast path: the same embeddings in inference, the same loss and gradients."""
    encoder = ScPaLMModel(tiny_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(encoder)(**inputs).cell_embedding, encoder(**inputs).cell_embedding, atol=1e-5, rtol=1e-4
        )
    torch.manual_seed(0)
    eager = ScPaLMForPathwayReconstruction(tiny_config).train()
    compiled = copy.deepcopy(eager)
    losses = [eager(**inputs).loss, torch.compile(compiled)(**inputs).loss]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, parameter), compiled_parameter in zip(eager.named_parameters(), compiled.parameters()):
        if parameter.grad is not None:
            torch.testing.assert_close(compiled_parameter.grad, parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_loading_a_stage_one_folder_for_its_cell_embedding_warns(tiny_config, tmp_path):
    import warnings

    ScPaLMForPathwayReconstruction(tiny_config).save_pretrained(tmp_path / "stage_1")
    with pytest.warns(UserWarning, match="stage-1 model .* cell encoder was never trained"):
        ScPaLMModel.from_pretrained(tmp_path / "stage_1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stage 2 starts from it, as it should: no warning
        ScPaLMForCellPretraining.from_pretrained(tmp_path / "stage_1").save_pretrained(tmp_path / "stage_2")
        ScPaLMModel.from_pretrained(tmp_path / "stage_2")
