"""Does the system learn? A short version of `benchmarks/learn_synthetic.py` (see docs/training.md, "Proof that it
learns"): the small system of `small_config`, from scratch, on a small synthetic world, on one CPU thread.

Dense training (LISA's losses plus the benchmark's task probe on the `[SEG]` embeddings, which stands in for what a
pretrained LLaVA knows) must segment held-out images far better than the whole-image baseline, and after training
the prune decoder, VLTP's pruning at rate 0.5 must beat random pruning at the same rate.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_vltp.data import load_rio, synthetic
from modeling_vltp.processing_vltp import DEFAULT_ANSWER
from modeling_vltp.testing import small_model_and_processor

TASK_INDEX = {
    phrasing: index
    for index, task in enumerate(synthetic.TASKS)
    for phrasing in (*task.phrasings, *task.heldout_phrasings)
}
INPUTS = ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values", "labels", "masks", "reshaped_input_sizes")


pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(world, split, processor):
    rows = list(load_rio(world, world, split))
    batch = dict(
        processor(
            images=[row["image"].convert("RGB") for row in rows],
            tasks=[row["task"] for row in rows],
            answers=DEFAULT_ANSWER,
            masks=[row["mask"] for row in rows],
        )
    )
    batch["task_index"] = torch.tensor([TASK_INDEX[row["task"].strip()] for row in rows])
    return batch


def iou_per_sample(pred_masks, masks):
    """IoU of each low-resolution prediction (upsampled to SAM's frame) with its target; 1 where both are empty."""
    predicted = F.interpolate(pred_masks[:, None].float(), masks.shape[-2:], mode="bilinear")[:, 0] > 0
    target = masks > 0.5
    inter = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_dense_training_and_vltp_pruning_learn(tmp_path):
    start = time.monotonic()
    synthetic.generate(tmp_path, 150, seed=0, format="rio", split="train")
    synthetic.generate(tmp_path, 30, seed=1, format="rio", split="common")
    model, processor = small_model_and_processor(seed=0)
    train, held_out = tensors(tmp_path, "train", processor), tensors(tmp_path, "common", processor)
    probe = nn.Linear(model.config.vision_config.guidance_dim, len(synthetic.TASKS))
    generator = torch.Generator().manual_seed(0)

    def run(steps, parameters, prune_rates, loss_fn, learning_rate=2e-3, batch_size=12):
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            index = torch.randint(0, len(train["task_index"]), (batch_size,), generator=generator)
            out = model(**{name: train[name][index] for name in INPUTS}, prune_rates=prune_rates)
            loss = loss_fn(out, train["task_index"][index])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
        model.eval()

    # Dense training of every weight (the benchmark's pretraining stand-in), prune decoder left out.
    dense_parameters = [p for n, p in model.named_parameters() if "prune_decoder" not in n] + list(probe.parameters())
    run(
        350,
        dense_parameters,
        [0.0],
        lambda out, tasks: out.loss + F.cross_entropy(probe(out.seg_embeds), tasks[out.seg_sample_indices]),
    )

    non_empty = held_out["masks"].flatten(1).sum(1) > 0
    with torch.no_grad():
        seg_embeds = model(**{name: held_out[name] for name in INPUTS}, prune_rates=[0.0]).seg_embeds

        def scores(rates, guidance=seg_embeds):
            pred_masks, _, _ = model.decode_masks(held_out["sam_pixel_values"], guidance, rates)
            return iou_per_sample(pred_masks, held_out["masks"])[non_empty].mean().item()

        dense = scores([0.0])
        # Each sample guided by its neighbour's [SEG] (mostly the same image, another task): a model that ignores
        # the task scores the same.
        wrong_task = scores([0.0], seg_embeds.roll(1, 0))
    whole_image = iou_per_sample(torch.ones_like(held_out["masks"]), held_out["masks"])[non_empty].mean().item()
    assert dense > whole_image + 0.1, (dense, whole_image)
    assert dense > wrong_task + 0.05, (dense, wrong_task)

    # Stage 2's job on the prune decoder only: L_P plus the mask losses at rate 0.5.
    decoder = list(model.vision_model.prune_decoder.parameters())
    run(40, decoder, [0.5], lambda out, tasks: out.loss - model.config.lm_loss_weight * out.lm_loss, 1e-3)
    with torch.no_grad():
        vltp = scores([0.5])
        model.vision_model.prune_decoder.forward = lambda tokens, guidance: torch.rand(
            tokens.shape[0], model.vision_model.grid_size**2, generator=torch.Generator().manual_seed(0)
        )
        random_pruning = scores([0.5])
    print(
        f"non-empty gIoU: whole image {whole_image:.3f}, dense {dense:.3f}, wrong task {wrong_task:.3f}, "
        f"VLTP 0.5 {vltp:.3f}, random 0.5 {random_pruning:.3f}; {time.monotonic() - start:.0f} s"
    )
    assert vltp > random_pruning, (vltp, random_pruning)
    assert vltp > dense - 0.15, (vltp, dense)
