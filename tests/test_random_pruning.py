"""The random-pruning baseline (paper Table 7): `random_token_selection` and `evaluate_rates(selection="random")`."""

import pytest
import torch

from modeling_vltp.data import load_rio, synthetic
from modeling_vltp.testing import tiny_model_and_processor
from modeling_vltp.training import evaluate_rates, random_token_selection

pytestmark = pytest.mark.usefixtures("one_thread")


def kept_tokens(model, pixel_values, guidance):
    with torch.no_grad():
        return model.vision_model(pixel_values, guidance_embeds=guidance, prune_rates=[0.5]).keep_indices[0]


def test_random_selection_keeps_as_many_tokens_at_random_and_restores_the_prune_decoder():
    model, _ = tiny_model_and_processor()
    prune_decoder = model.vision_model.prune_decoder
    generator = torch.Generator().manual_seed(0)
    pixel_values, guidance = torch.randn(2, 3, 128, 128, generator=generator), torch.randn(2, 32, generator=generator)
    chosen = kept_tokens(model, pixel_values, guidance)
    with random_token_selection(model, seed=1):
        first = kept_tokens(model, pixel_values, guidance)
    with random_token_selection(model, seed=1):
        again = kept_tokens(model, pixel_values, guidance)
    with random_token_selection(model, seed=2):
        other = kept_tokens(model, pixel_values, guidance)
    assert model.vision_model.prune_decoder is prune_decoder
    assert torch.equal(kept_tokens(model, pixel_values, guidance), chosen)
    assert first.shape == chosen.shape == (2, 32)  # 8x8 tokens, half kept
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, chosen)
    assert not torch.equal(first[0], first[1])  # drawn for each image


def test_evaluate_rates_with_random_selection_matches_at_rate_0_and_differs_when_pruning(tmp_path):
    synthetic.generate(tmp_path, num_images=3, seed=0, image_size=64, format="rio", split="common")
    dataset = load_rio(tmp_path, tmp_path, "common")
    model, processor = tiny_model_and_processor()
    rates = [[0.0], [0.75]]
    chosen = evaluate_rates(model, processor, dataset, rates, batch_size=9)
    random = evaluate_rates(model, processor, dataset, rates, batch_size=9, selection="random")
    assert random[0] == chosen[0]
    assert random[1]["gmacs"] == chosen[1]["gmacs"]
    assert (random[1]["gIoU"], random[1]["cIoU"]) != (chosen[1]["gIoU"], chosen[1]["cIoU"])
    with pytest.raises(ValueError, match="selection must be"):
        evaluate_rates(model, processor, dataset, rates, selection="topk")
