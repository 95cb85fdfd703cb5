"""Eq. 2 with k-means pseudo-labels: the loss by hand, the clustering, the queue and its refits."""

import torch
import torch.nn.functional as F

from modeling_scpalm import ScPaLMModel
from modeling_scpalm.modeling_scpalm import ScPaLMPseudoLabelContrast, spherical_kmeans


def make_contrast(config, **overrides):
    for key, value in overrides.items():
        setattr(config, key, value)
    contrast = ScPaLMPseudoLabelContrast(config)
    ScPaLMModel(config)._init_weights(contrast)
    return contrast


def test_loss_is_symmetric_info_nce_before_any_fit(tiny_config):
    contrast = make_contrast(tiny_config, contrastive_max_negatives=100).eval()
    first, second = torch.randn(5, tiny_config.hidden_size), torch.randn(5, tiny_config.hidden_size)
    similarity = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).T / tiny_config.contrastive_temperature
    # Without pseudo-labels every other cell is a negative: plain InfoNCE, both directions.
    expected = 0.5 * (F.cross_entropy(similarity, torch.arange(5)) + F.cross_entropy(similarity.T, torch.arange(5)))
    torch.testing.assert_close(contrast(first, second), expected)


def test_cells_of_the_same_pseudo_cluster_are_not_negatives(tiny_config):
    contrast = make_contrast(tiny_config, contrastive_num_clusters=2, contrastive_max_negatives=100).eval()
    axis = torch.zeros(2, tiny_config.hidden_size)
    axis[0, 0], axis[1, 1] = 1.0, 1.0
    contrast.centroids.copy_(axis)
    contrast.centroids_fitted.fill_(True)
    first = torch.stack([axis[0], axis[0] + 0.1 * axis[1], axis[1]])  # cells 0, 1 in cluster 0; cell 2 in cluster 1
    second = first + 0.05
    logits = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).T / tiny_config.contrastive_temperature
    negatives = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])

    def direction(logits, negatives):
        rows = [torch.cat([logits[i, i : i + 1], logits[i][negatives[i]]]) for i in range(3)]
        return torch.stack([torch.logsumexp(row, 0) - logits[i, i] for i, row in enumerate(rows)]).mean()

    expected = 0.5 * (direction(logits, negatives) + direction(logits.T, negatives.T))
    torch.testing.assert_close(contrast(first, second), expected)


def test_at_most_max_negatives_per_anchor(tiny_config):
    contrast = make_contrast(tiny_config, contrastive_max_negatives=3)
    negatives = contrast._limit_negatives(~torch.eye(10, dtype=torch.bool))
    assert (negatives.sum(1) == 3).all() and not negatives.diagonal().any()


def test_spherical_kmeans_recovers_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    labels = torch.arange(4).repeat_interleave(50)
    points = centers[labels] + 0.05 * torch.randn(200, 16, generator=generator)
    centroids = spherical_kmeans(points, 4, torch.Generator().manual_seed(1))
    assigned = (F.normalize(points, dim=-1) @ centroids.T).argmax(-1)
    # Same partition up to renaming: each planted cluster maps to one found cluster, and vice versa.
    pairs = set(zip(labels.tolist(), assigned.tolist()))
    assert len(pairs) == 4 and len({found for _, found in pairs}) == 4


def test_queue_fills_and_refits_every_interval(tiny_config):
    contrast = make_contrast(
        tiny_config, contrastive_queue_size=12, contrastive_num_clusters=2, contrastive_refit_interval=3
    ).train()
    for step in range(7):
        first = torch.randn(5, tiny_config.hidden_size)
        contrast(first, first + 0.01)
        assert int(contrast.queue_filled) == min(12, 5 * (step + 1))
        if step == 2:
            assert not contrast.centroids_fitted, "step 0 had an empty queue; the next refit is step 3"
    assert contrast.centroids_fitted and int(contrast.step) == 7
    # Ring buffer: the newest five embeddings sit just before the write position.
    newest = F.normalize(first, dim=-1)
    position = int(contrast.queue_position)
    torch.testing.assert_close(contrast.queue[(position - 5 + torch.arange(5)) % 12], newest)


def test_eval_mode_leaves_the_queue_alone(tiny_config):
    contrast = make_contrast(tiny_config).eval()
    first = torch.randn(4, tiny_config.hidden_size)
    contrast(first, first)
    assert int(contrast.queue_filled) == 0 and int(contrast.step) == 0
