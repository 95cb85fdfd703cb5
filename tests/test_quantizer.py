"""The vector quantizer: eq. 1 by hand, straight-through gradients, dead-code replacement, usage statistics."""

import pytest
import torch

from modeling_scpalm import ScPaLMModel
from modeling_scpalm.quantizer_scpalm import ScPaLMVectorQuantizer


@pytest.fixture
def quantizer(tiny_config):
    tiny_config.commitment_beta = 0.3  # both terms of eq. 1 at work
    torch.manual_seed(0)
    quantizer = ScPaLMVectorQuantizer(tiny_config)
    ScPaLMModel(tiny_config)._init_weights(quantizer)
    with torch.no_grad():
        quantizer.codebook_mean.normal_(std=0.1)
        quantizer.codebook_std.uniform_(0.5, 1.5)
    return quantizer


def test_codes_are_the_nearest_affine_codebook_entries(quantizer, tiny_config):
    encoded = torch.randn(3, 5, tiny_config.hidden_size)
    output = quantizer.eval()(encoded)
    vectors = quantizer.codebook_mean + quantizer.codebook_std * quantizer.codebook
    expected = torch.cdist(encoded.flatten(0, 1), vectors).argmin(-1).view(3, 5)
    assert torch.equal(output.codes, expected)
    torch.testing.assert_close(output.quantized, vectors[expected])


def test_commitment_loss_is_equation_one(quantizer, tiny_config):
    beta = tiny_config.commitment_beta
    encoded = torch.randn(2, 4, tiny_config.hidden_size, requires_grad=True)
    output = quantizer.eval()(encoded)
    z = (quantizer.codebook_mean + quantizer.codebook_std * quantizer.codebook)[output.codes]
    squared = ((z - encoded) ** 2).sum(-1)  # per token ||z_i - e_i||^2
    # Eq. 1, averaged over the tokens and dimensions: both terms have the same value, beta + (1 - beta) = 1.
    expected = squared.sum() / encoded[..., 0].numel() / tiny_config.hidden_size
    torch.testing.assert_close(output.commitment_loss, expected)

    # ...and the gradients split as eq. 1 says: beta to the encoder, 1 - beta to the code.
    output.commitment_loss.backward()
    n = encoded.numel()
    torch.testing.assert_close(encoded.grad, beta * 2 * (encoded - z).detach() / n)
    code_grad = torch.zeros_like(quantizer.codebook)
    code_grad.index_add_(0, output.codes.flatten(), ((1 - beta) * 2 * (z - encoded) / n).detach().flatten(0, 1))
    torch.testing.assert_close(quantizer.codebook.grad, code_grad * quantizer.codebook_std.detach())


def test_straight_through_gradient_reaches_the_encoder(quantizer, tiny_config):
    encoded = torch.randn(2, 4, tiny_config.hidden_size, requires_grad=True)
    weights = torch.randn(2, 4, tiny_config.hidden_size)
    (quantizer.eval()(encoded).quantized * weights).sum().backward()
    torch.testing.assert_close(encoded.grad, weights)


def test_a_dead_code_is_replaced_by_an_encoder_output(tiny_config):
    tiny_config.dead_code_patience = 2
    torch.manual_seed(0)
    quantizer = ScPaLMVectorQuantizer(tiny_config)
    ScPaLMModel(tiny_config)._init_weights(quantizer)
    with torch.no_grad():
        quantizer.codebook[3] = 1000.0  # far from everything: never chosen
    quantizer.train()
    encoded = torch.randn(4, 8, tiny_config.hidden_size)
    first, second = quantizer(encoded), quantizer(encoded)
    assert (first.codes != 3).all() and (second.codes != 3).all()
    assert int(quantizer.steps_since_used[3]) == 2
    third = quantizer(encoded)  # dead for `patience` steps: replaced before this step's assignment
    assert int(third.num_dead_codes) >= 1
    replaced = quantizer.code_vectors()[3].detach()
    distances = (encoded.flatten(0, 1) - replaced).norm(dim=-1)
    assert distances.min() < 1e-4, "the dead code should now sit on one of the batch's encoder outputs"
    assert (third.codes == 3).any()


def test_no_replacement_in_eval_mode_or_when_frozen(tiny_config):
    tiny_config.dead_code_patience = 1
    quantizer = ScPaLMVectorQuantizer(tiny_config)
    ScPaLMModel(tiny_config)._init_weights(quantizer)
    before = quantizer.codebook.detach().clone()
    quantizer.eval()
    for _ in range(3):
        quantizer(torch.randn(2, 4, tiny_config.hidden_size))
    quantizer.train().requires_grad_(False)
    for _ in range(3):
        quantizer(torch.randn(2, 4, tiny_config.hidden_size))
    assert torch.equal(before, quantizer.codebook)


def test_perplexity_counts_used_codes(quantizer, tiny_config):
    vectors = quantizer.code_vectors().detach()
    # Every token on its own code, each code once: perplexity = number of codes used.
    encoded = vectors[:8].unsqueeze(0)
    assert quantizer.eval()(encoded).perplexity.item() == pytest.approx(8.0, rel=1e-4)
    assert quantizer(vectors[[0] * 8].unsqueeze(0)).perplexity.item() == pytest.approx(1.0, rel=1e-4)


def test_bf16_autocast_keeps_distances_in_float32(quantizer, tiny_config):
    encoded = torch.randn(2, 4, tiny_config.hidden_size)
    reference = quantizer.eval()(encoded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = quantizer(encoded.bfloat16())
    assert mixed.quantized.dtype == torch.bfloat16
    assert torch.isfinite(mixed.commitment_loss)
    assert (mixed.codes == reference.codes).float().mean() > 0.9
