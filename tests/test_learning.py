"""Does the system learn? A short version of `benchmarks/learn_synthetic.py` (see docs/training.md, "Proof that it
learns"): the small system of `small_config`, from scratch, on a small synthetic world, on one CPU thread.

Dense training (LISA's losses plus the benchmark's task probe on the `[SEG]` embeddings, which stands in for what a
pretrained LLaVA knows) must segment held-out images far better than the whole-image baseline and than the same model
guided by another task's `[SEG]`; after training the prune decoder, VLTP's pruning at rate 0.5 must beat random pruning
at the same rate and stay near dense.

The recipe pairs every training image with all 12 tasks and trains on the pairs with a non-empty target only (about
half of the pairs; with 3 random tasks per image and empty targets included, 350 steps sat at a tipping point where
the mask decoder either still predicted (almost) nothing or had started to find the objects). Both stages warm the
learning rate up linearly (20 and 5 steps) and then decay it to zero on a cosine (`torch.optim.lr_scheduler`): under
a constant rate dense was still rising at step 350 and the score was one step of a noisy walk (dense - whole image
spread 0.107 over the 9 runs below); with the decay every run ends on a settled model. Held-out scores are over the
~215 pairs of 30 unseen images with a non-empty target.

The wrong task: each held-out pair is guided by the `[SEG]` of another task on the same image whose target shares no
pixel with its own (the next such task with a non-empty target, else one with an empty target). The earlier
neighbour (the next task on the same image) often answers with some of the same objects (a large red circle answers
red, large and round), so even a model that follows the task perfectly kept part of its score under the wrong
guidance, and the gap mixed "the task matters" with how much the world's tasks overlap. With a disjoint target, a
model that follows the task scores about 0 under the wrong guidance and one that ignores it scores exactly dense, so
dense - wrong task is the task's whole effect; the threshold 0.05 keeps its meaning (the task moves the held-out
gIoU by more than 0.05). What it shows: under a disjoint task the model still scores ~0.3 on the true target, i.e. it
mostly segments objects and the task only modulates that; this is the weakest check.

Measured on a 2-core AMD EPYC (AVX-512), torch 2.13.0+cpu, shared with other jobs; held-out gIoU non-empty, dense /
wrong task / whole image / VLTP 0.5 / random 0.5 (`OMP_NUM_THREADS=1` gives the default's bits, since `learn` sets one
thread itself; `MKL_CBWR=COMPATIBLE` and `MKL_CBWR=AVX2` change them):

    seed  default, OMP_NUM_THREADS=1      MKL_CBWR=COMPATIBLE            MKL_CBWR=AVX2
    0     .409 .295 .063 .412 .243       .413 .316 .063 .411 .229       .412 .303 .063 .408 .243
    1     .385 .319 .071 .382 .206       .388 .303 .071 .384 .211       .381 .307 .071 .377 .206
    2     .369 .296 .067 .362 .238       .365 .282 .067 .362 .245       .368 .285 .067 .357 .243

9 runs, all pass. Spread (max - min over the 9) of each checked difference, and its smallest margin over the threshold:
dense - whole image 0.052 (margin 0.198 over 0.1, 3.8x the spread; smallest: seed 2, COMPATIBLE); dense - wrong task
0.047 (margin 0.017 over 0.05, 0.3x the spread, NOT 2x; smallest: seed 1, default); VLTP - random 0.069 (margin 0.114
over 0, 1.7x the spread, NOT 2x; smallest: seed 2, AVX2); VLTP - dense 0.013 (margin 0.140 over -0.15, 10.8x the
spread; smallest: seed 2, AVX2). Twice the spread or more: dense - whole image, VLTP - dense; not yet: dense - wrong
task, VLTP - random. One seed takes 103-107 CPU seconds (process time, one thread) in the default environment (99-101
with `MKL_CBWR=AVX2`, 126-138 with `MKL_CBWR=COMPATIBLE`, whose kernels are slower). Before this recipe (constant
learning rate, the neighbour as the wrong task), the same four spreads were 0.107, 0.052, 0.054 and 0.054 with margins
0.132, 0.007, 0.077 and 0.110.

Tried on seed 1 (default environment) and not kept, dense / wrong task: peak lr 3e-3, .364 / .289; batches of 3
images x 4 of their tasks, .387 / .323; batch 6 for 700 steps, .403 / .325 (120 CPU s); empty targets included,
.203 / .065 (the task matters more, but dense - whole image falls to 0.132). The recipe kept: .385 / .319. 80
prune-decoder steps instead of 40 (seed 2, `MKL_CBWR=COMPATIBLE`): VLTP / random .362 / .245, as with 40.

    python tests/test_learning.py --seeds 0 1 2   # the recipe on other seeds, one JSON line each
"""

import argparse
import json
import tempfile
import time

import numpy as np
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
DENSE_STEPS, DENSE_LR, DENSE_WARMUP = 350, 2e-3, 20
PRUNE_STEPS, PRUNE_LR, PRUNE_WARMUP = 40, 1e-3, 5
INPUTS = ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values", "labels", "masks", "reshaped_input_sizes")


def tensors(world, split, processor, non_empty_only=False):
    """The split's (image, task) pairs as model inputs, with `task_index`; optionally only those with a target."""
    rows = [row for row in load_rio(world, world, split) if not non_empty_only or np.asarray(row["mask"]).any()]
    batch = dict(
        processor(
            images=[row["image"].convert("RGB") for row in rows],
            tasks=[row["task"] for row in rows],
            answers=DEFAULT_ANSWER,
            masks=[row["mask"] for row in rows],
        )
    )
    batch["task_index"] = torch.tensor([TASK_INDEX[row["task"].strip()] for row in rows])
    batch["image_id"] = torch.tensor([row["image_id"] for row in rows])
    return batch


def disjoint_partners(image_ids, masks):
    """For each pair, another pair of the same image whose target shares no pixel with its own: the next one (in
    order, cyclically) with a non-empty target if there is one, else the next with an empty target."""
    targets = masks.flatten(1) > 0.5
    partners = []
    for i in range(len(image_ids)):
        same = [(i + k) % len(image_ids) for k in range(1, len(image_ids))]
        same = [j for j in same if image_ids[j] == image_ids[i] and not (targets[i] & targets[j]).any()]
        partners.append(next((j for j in same if targets[j].any()), same[0]))
    return torch.tensor(partners)


def iou_per_sample(pred_masks, masks):
    """IoU of each low-resolution prediction (upsampled to SAM's frame) with its target; 1 where both are empty."""
    predicted = F.interpolate(pred_masks[:, None].float(), masks.shape[-2:], mode="bilinear")[:, 0] > 0
    target = masks > 0.5
    inter = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def learn(folder, seed: int) -> dict:
    """The recipe with `seed` (model init, both worlds, batch order) on one torch thread, whatever the caller's
    setting: held-out gIoU on non-empty targets of each variant, and the process CPU seconds it took."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _learn(folder, seed)
    finally:
        torch.set_num_threads(threads)


def _learn(folder, seed):
    start = time.process_time()
    num_tasks = len(synthetic.TASKS)
    synthetic.generate(folder, 150, seed=2 * seed, format="rio", split="train", tasks_per_image=num_tasks)
    synthetic.generate(folder, 30, seed=2 * seed + 1, format="rio", split="common", tasks_per_image=num_tasks)
    model, processor = small_model_and_processor(seed=seed)
    train = tensors(folder, "train", processor, non_empty_only=True)
    held_out = tensors(folder, "common", processor)
    probe = nn.Linear(model.config.vision_config.guidance_dim, num_tasks)
    generator = torch.Generator().manual_seed(seed)

    def run(steps, parameters, prune_rates, loss_fn, learning_rate, warmup, batch_size=12):
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        # Linear warmup, then cosine decay to zero: the end point is a converged model, not a step of a noisy walk.
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps - warmup, 0.0),
            ],
            [warmup],
        )
        model.train()
        for _ in range(steps):
            index = torch.randint(0, len(train["task_index"]), (batch_size,), generator=generator)
            out = model(**{name: train[name][index] for name in INPUTS}, prune_rates=prune_rates)
            loss = loss_fn(out, train["task_index"][index])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
        model.eval()

    # Dense training of every weight (the benchmark's pretraining stand-in), prune decoder left out.
    dense_parameters = [p for n, p in model.named_parameters() if "prune_decoder" not in n] + list(probe.parameters())
    run(
        DENSE_STEPS,
        dense_parameters,
        [0.0],
        lambda out, tasks: out.loss + F.cross_entropy(probe(out.seg_embeds), tasks[out.seg_sample_indices]),
        DENSE_LR,
        DENSE_WARMUP,
    )
    dense_seconds = time.process_time() - start

    non_empty = held_out["masks"].flatten(1).sum(1) > 0
    with torch.no_grad():
        seg_embeds = model(**{name: held_out[name] for name in INPUTS}, prune_rates=[0.0]).seg_embeds

        def scores(rates, guidance=seg_embeds):
            pred_masks, _, _ = model.decode_masks(held_out["sam_pixel_values"], guidance, rates)
            return iou_per_sample(pred_masks, held_out["masks"])[non_empty].mean().item()

        result = {"seed": seed, "dense": scores([0.0])}
        # Each pair guided by the [SEG] of another task on the same image whose target is disjoint from its own: a
        # model that ignores the task scores the same as dense, one that follows it scores about 0.
        partners = disjoint_partners(held_out["image_id"], held_out["masks"])
        result["wrong_task"] = scores([0.0], seg_embeds[partners])
    masks = held_out["masks"][non_empty]
    result["whole_image"] = iou_per_sample(torch.ones_like(masks), masks).mean().item()

    # Stage 2's job on the prune decoder only: L_P plus the mask losses at rate 0.5.
    decoder = list(model.vision_model.prune_decoder.parameters())
    run(
        PRUNE_STEPS,
        decoder,
        [0.5],
        lambda out, tasks: out.loss - model.config.lm_loss_weight * out.lm_loss,
        PRUNE_LR,
        PRUNE_WARMUP,
    )
    with torch.no_grad():
        result["vltp"] = scores([0.5])
        model.vision_model.prune_decoder.forward = lambda tokens, guidance: torch.rand(
            tokens.shape[0], model.vision_model.grid_size**2, generator=torch.Generator().manual_seed(seed)
        )
        result["random"] = scores([0.5])
    result["dense_seconds"] = dense_seconds
    result["cpu_seconds"] = time.process_time() - start
    return result


def test_dense_training_and_vltp_pruning_learn(tmp_path):
    result = learn(tmp_path, seed=0)
    print(result)
    dense, vltp = result["dense"], result["vltp"]
    assert dense > result["whole_image"] + 0.1, result
    assert dense > result["wrong_task"] + 0.05, result
    assert vltp > result["random"], result
    assert vltp > dense - 0.15, result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the learning test's recipe on several seeds.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for seed in parser.parse_args().seeds:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps({name: round(value, 4) for name, value in learn(folder, seed).items()}), flush=True)
