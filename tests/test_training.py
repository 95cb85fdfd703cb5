"""Both pretraining stages on real cells (pbmc3k): stage 1 beats the mean-expression baseline, stage 2 trains."""

import numpy as np
import pytest
import torch

from modeling_scpalm import ScPaLMConfig, ScPaLMForCellPretraining, ScPaLMForPathwayReconstruction

pytestmark = pytest.mark.slow

BATCH, STAGE_ONE_STEPS, STAGE_TWO_STEPS = 64, 150, 60


def train(model, cells, measured, steps, learning_rate, seed):
    """AdamW with warm-up and linear decay over random batches; returns the per-step outputs."""
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    model.train()
    history = []
    for _ in range(steps):
        rows = np.sort(generator.choice(cells.shape[0], BATCH, replace=False))
        output = model(**model_inputs(cells[rows], measured))
        output.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        history.append(output)
    return history


def model_inputs(cells, measured):
    from modeling_scpalm import ScPaLMProcessor

    return {**ScPaLMProcessor.pad(cells), "measured_gene_mask": torch.from_numpy(measured)}


@pytest.fixture(scope="module")
def split(pbmc3k, pbmc3k_processor):
    cells, measured = pbmc3k_processor.transform(pbmc3k.X, list(pbmc3k.var_names))
    order = np.random.default_rng(0).permutation(cells.shape[0])
    return cells[order[:2200]], cells[order[2200:]], measured


@pytest.fixture(scope="module")
def stage_one(split, pbmc3k_processor):
    train_cells, _, measured = split
    torch.manual_seed(0)
    model = ScPaLMForPathwayReconstruction(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes))
    model.decoder.initialize_gene_bias(torch.from_numpy(np.asarray(train_cells.mean(0)).ravel()))
    history = train(model, train_cells, measured, STAGE_ONE_STEPS, learning_rate=2e-3, seed=1)
    return model.eval(), history


def test_stage_one_beats_the_mean_expression_baseline(split, stage_one):
    train_cells, test_cells, measured = split
    model, _history = stage_one
    mean = np.asarray(train_cells.mean(0)).ravel()
    baseline = float(((test_cells.toarray() - mean) ** 2)[:, measured].mean())
    with torch.no_grad():
        output = model(**model_inputs(test_cells, measured))
    print(f"stage 1 held-out reconstruction {output.reconstruction_loss:.4f}, mean-expression baseline {baseline:.4f}")
    # Cell-type means reach 7.5% below this baseline and 32 principal components 10.4%: pbmc3k is mostly noise.
    assert output.reconstruction_loss < 0.97 * baseline
    distinct_codes = [len(torch.unique(slot_codes)) for slot_codes in output.pathway_codes.T]
    assert np.mean(distinct_codes) > 2, "cells get different codes, not all the same one"


def test_stage_two_trains_on_frozen_stage_one(split, stage_one, tmp_path_factory):
    train_cells, _, measured = split
    folder = tmp_path_factory.mktemp("stage_one")
    stage_one[0].save_pretrained(folder)
    model = ScPaLMForCellPretraining.from_pretrained(folder)
    frozen = {name: p.detach().clone() for name, p in model.scpalm.embeddings.named_parameters()}
    model.config.contrastive_loss_weight = 1.0  # the pseudo-label contrast on, so that its queue is checked too
    torch.manual_seed(0)
    history = train(model, train_cells, measured, STAGE_TWO_STEPS, learning_rate=2e-3, seed=2)
    first = np.mean([h.reconstruction_loss.item() for h in history[:10]])
    last = np.mean([h.reconstruction_loss.item() for h in history[-10:]])
    assert last < first, (first, last)
    assert all(torch.equal(p, model.scpalm.embeddings.get_parameter(n)) for n, p in frozen.items())
    assert bool(model.contrastive.centroids_fitted), "k-means pseudo-labels were fitted from the queue"
    assert int(model.contrastive.queue_filled) == min(model.config.contrastive_queue_size, BATCH * STAGE_TWO_STEPS)
