"""Does the system learn? A short version of `benchmarks/learn_synthetic.py` (see docs/training.md, "Proof that it
learns"): the small system of `small_config`, from scratch, on a small synthetic world, on one CPU thread.

Dense training (LISA's losses, SAM's IoU loss and the benchmark's `PretrainingProbes`, which stand in for what a
pretrained LLaVA knows) must segment held-out images far better than the whole-image baseline and than the same model
guided by another task's `[SEG]`; it must answer "nothing fits" far more often when nothing fits than when something
does, and SAM's predicted IoU must rank the masks the right way round. After stage 2 (the prune decoder and the mask
decoder at rate 0.5, VLTP@Finetune), VLTP's pruning must stay near dense and beat the paper's random baseline (Table 7:
the dense model keeping a random half of the tokens).

The recipe: 150 training images, each paired with the world's six colour and size tasks (`TRAITS`); each dense batch
draws 12 pairs with a target (answered "Sure, [SEG].") and 6 without (answered "There is nothing in the image that
fits.", the LM loss only); 350 dense steps, then 100 stage-2 steps on pairs with a target; AdamW with beta2 0.95, the
learning rate warmed up linearly (20 and 5 steps) and then decayed to zero on a cosine. Held out: 80 unseen images.
Scores are mean IoU over their ~300 non-empty pairs (each image's SAM side run once for all its tasks, with
`image_indices`); "nothing" is the share of pairs whose answer starts as the "nothing fits" sentence does (the first
token greedy generation would pick, read from one teacher-forced pass), on the empty and on the non-empty targets;
the score's Spearman correlation is over the dense masks of the non-empty pairs.

Why six tasks, not the world's twelve: the SAM side learns to pick objects by trait slowly, and by shape not at all
within the benchmark's 4000 steps (for the shape tasks it segments every object; see docs/training.md), so on all
twelve the test would mostly measure the other tasks. On the colour and size tasks the decoder picks by trait within
350 steps.

The wrong task: each held-out pair is guided by the `[SEG]` of another task on the same image whose target shares no
pixel with its own (the next such task with a non-empty target, else one with an empty target). A model that follows
the task scores about 0 under the wrong guidance and one that ignores it scores exactly dense, so dense - wrong task is
the task's whole effect.

Measured on a 2-core AMD EPYC (AVX-512), torch 2.13.0+cpu, two or three runs sharing the cores; held-out, dense /
wrong task / whole image / VLTP 0.5 / random 0.5 (mean IoU non-empty), "nothing" on empty / on non-empty targets,
Spearman (`OMP_NUM_THREADS=1` gives the default's bits, since `learn` sets one thread itself; `MKL_CBWR=COMPATIBLE` and
`MKL_CBWR=AVX2` change them):

    seed 0  default     .414 .195 .065 .448 .244  .550 .064  .831
            COMPATIBLE  .486 .141 .065 .526 .245  .581 .071  .787
            AVX2        .486 .169 .065 .513 .255  .581 .071  .710
    seed 1  default     .570 .101 .069 .582 .340  .603 .114  .669
            COMPATIBLE  .571 .094 .069 .577 .340  .579 .126  .686
            AVX2        .575 .096 .069 .582 .325  .584 .111  .680
    seed 2  default     .403 .205 .065 .418 .271  .591 .101  .790
            COMPATIBLE  .383 .213 .065 .390 .272  .596 .101  .768
            AVX2        .403 .205 .065 .424 .274  .575 .098  .796

9 runs, all pass. Each check's spread (max - min over the 9) and its smallest margin over the threshold: dense - whole
image 0.189 (margin 0.218 over 0.1, 1.2x the spread); dense - wrong task 0.309 (margin 0.120 over 0.05, 0.4x);
VLTP - random 0.164 (margin 0.118 over 0, 0.7x); VLTP - dense 0.034 (margin 0.156 over -0.15, 4.5x); nothing on empty
- nothing on non-empty 0.057 (margin 0.303 over 0.15, 5.4x); Spearman 0.162 (margin 0.369 over 0.3, 2.3x). The
smallest margins come from seed 2 (dense .38-.40 on every setting, where seed 1 reaches .57); on seed 0, the test's,
the smallest is dense - wrong task, 0.169 over 0.05 against a spread of 0.126 over the three settings. LLaVA's CLIP
at 64 px (`small_processor`) took "nothing" on non-empty targets from .14-.23 to .06-.13; at 32 px the same runs gave
dense .41-.53. One seed takes about 80 CPU seconds (process time, one thread) in the default environment and with
`MKL_CBWR=AVX2`, about 120 with `MKL_CBWR=COMPATIBLE`, whose kernels are slower.

    python tests/test_learning.py --seeds 0 1 2   # the recipe on other seeds, one JSON line each
"""

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from modeling_vltp.data import load_rio, synthetic
from modeling_vltp.data.collator import NO_TARGET_ANSWERS, group_rows_by_image
from modeling_vltp.metrics import spearman_correlation
from modeling_vltp.processing_vltp import DEFAULT_ANSWER
from modeling_vltp.testing import PretrainingProbes, small_model_and_processor, tasks_present
from modeling_vltp.training import random_token_selection

# The world's tasks this short recipe trains and evaluates on: the colour and size ones (see the module docstring).
TRAITS = ("red", "green", "yellow", "blue", "large", "small")
TRAIN_IMAGES, HELD_OUT_IMAGES = 150, 80
DENSE_STEPS, DENSE_LR, DENSE_WARMUP = 350, 2e-3, 20
PRUNE_STEPS, PRUNE_LR, PRUNE_WARMUP = 100, 1e-3, 5
BATCH_SIZE, EMPTY_ROWS, ADAM_BETAS = 12, 6, (0.9, 0.95)
INPUTS = ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values", "labels", "masks", "reshaped_input_sizes")


def tensors(world, split, processor, answer_nothing: bool):
    """The split's (image, task) pairs of the tasks of `TRAITS` as model inputs, with `task_index`, `image_id`,
    `has_target` and `tasks_present` (which of the world's 12 tasks the pair's image answers). Each pair is answered
    "Sure, [SEG]." or, with `answer_nothing`, `NO_TARGET_ANSWERS[0]` when its target is empty."""
    dataset = load_rio(world, world, split)
    present = tasks_present(dataset)
    rows = [row for row in dataset if synthetic.TASKS[synthetic.TASK_OF_SENTENCE[row["task"].strip()]].trait in TRAITS]
    nothing = NO_TARGET_ANSWERS[0] if answer_nothing else DEFAULT_ANSWER
    batch = dict(
        processor(
            images=[row["image"].convert("RGB") for row in rows],
            tasks=[row["task"] for row in rows],
            answers=[DEFAULT_ANSWER if row["mask"].any() else nothing for row in rows],
            masks=[row["mask"] for row in rows],
        )
    )
    batch["task_index"] = torch.tensor([synthetic.TASK_OF_SENTENCE[row["task"].strip()] for row in rows])
    batch["image_id"] = torch.tensor([row["image_id"] for row in rows])
    batch["has_target"] = batch["masks"].flatten(1).any(1)
    batch["tasks_present"] = torch.stack([present[row["image_id"]] for row in rows])
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


def nothing_token(batch) -> int:
    """The first answer token of the pairs answered "nothing fits" (the same for all: one sentence)."""
    empty = (~batch["has_target"]).nonzero()[0, 0]
    labels = batch["labels"][empty]
    return int(labels[labels != -100][0])


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
    synthetic.generate(folder, TRAIN_IMAGES, seed=2 * seed, format="rio", split="train", tasks_per_image=num_tasks)
    synthetic.generate(
        folder, HELD_OUT_IMAGES, seed=2 * seed + 1, format="rio", split="common", tasks_per_image=num_tasks
    )
    model, processor = small_model_and_processor(seed=seed)
    train = tensors(folder, "train", processor, answer_nothing=True)
    held_out = tensors(folder, "common", processor, answer_nothing=False)  # teacher-forced "Sure, [SEG]."
    probes = PretrainingProbes(model.config, num_tasks)
    generator = torch.Generator().manual_seed(seed)
    with_target, without = train["has_target"].nonzero()[:, 0], (~train["has_target"]).nonzero()[:, 0]

    def draw(rows, size):
        return rows[torch.randint(0, len(rows), (size,), generator=generator)]

    def run(steps, parameters, prune_rates, loss_fn, learning_rate, warmup, empty_rows=0):
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=ADAM_BETAS, weight_decay=0.0)
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
            index = torch.cat([draw(with_target, BATCH_SIZE), draw(without, empty_rows)])
            out = model(
                **{name: train[name][index] for name in INPUTS}, prune_rates=prune_rates, output_hidden_states=True
            )
            loss = loss_fn(out, index)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
        model.eval()

    # Dense training of every weight (the benchmark's pretraining stand-in), prune decoder left out; the pairs with an
    # empty target answered "nothing fits".
    dense_parameters = [p for n, p in model.named_parameters() if "prune_decoder" not in n] + [*probes.parameters()]
    run(
        DENSE_STEPS,
        dense_parameters,
        [0.0],
        lambda out, index: (
            out.loss
            + probes(out, train["input_ids"][index], train["task_index"][index], train["tasks_present"][index])
        ),
        DENSE_LR,
        DENSE_WARMUP,
        empty_rows=EMPTY_ROWS,
    )
    dense_seconds = time.process_time() - start

    # Held out: the pairs with a target, each image's SAM side run once for all its tasks (`image_indices`).
    rows = held_out["has_target"].nonzero()[:, 0]
    first_rows, image_of_row = group_rows_by_image(held_out["image_id"][rows].tolist())
    pixels, image_indices = held_out["sam_pixel_values"][rows[first_rows]], torch.tensor(image_of_row)
    targets = held_out["masks"][rows]
    with torch.no_grad():
        llm, seg_embeds, _ = model.seg_embeddings(
            held_out["input_ids"], held_out["attention_mask"], held_out["pixel_values"]
        )

        def scores(rates, guidance=seg_embeds[rows]):
            pred_masks, _, _ = model.decode_masks(pixels, guidance, rates, image_indices)
            return iou_per_sample(pred_masks, targets).mean().item()

        # Dense: each mask's IoU, and SAM's predicted IoU against it.
        pred_masks, iou_scores, _ = model.decode_masks(pixels, seg_embeds[rows], [0.0], image_indices)
        dense_ious = iou_per_sample(pred_masks, targets)
        result = {"seed": seed, "dense": dense_ious.mean().item()}
        result["score_spearman"] = spearman_correlation(iou_scores, dense_ious)
        # The answer's first token as greedy generation picks it: "Sure" ([SEG]) or that of "There is nothing...".
        first = (held_out["labels"] != -100).int().argmax(1)
        says_nothing = llm.logits[torch.arange(len(first)), first - 1].argmax(-1) == nothing_token(train)
        result["nothing_on_empty"] = says_nothing[~held_out["has_target"]].float().mean().item()
        result["nothing_on_target"] = says_nothing[held_out["has_target"]].float().mean().item()
        # Each pair guided by the [SEG] of another task on the same image whose target is disjoint from its own: a
        # model that ignores the task scores the same as dense, one that follows it scores about 0.
        partners = disjoint_partners(held_out["image_id"], held_out["masks"])
        result["wrong_task"] = scores([0.0], seg_embeds[partners[rows]])
        # The paper's random baseline (Table 7): the dense model keeping a random half of the tokens.
        with random_token_selection(model, seed):
            result["random"] = scores([0.5])
    result["whole_image"] = iou_per_sample(torch.ones_like(targets), targets).mean().item()

    # Stage 2 (VLTP@Finetune): the prune decoder and SAM's mask decoder, on L_P plus the mask losses at rate 0.5.
    stage2_parameters = [*model.vision_model.prune_decoder.parameters(), *model.mask_decoder.parameters()]
    run(
        PRUNE_STEPS,
        stage2_parameters,
        [0.5],
        lambda out, tasks: out.loss - model.config.lm_loss_weight * out.lm_loss,
        PRUNE_LR,
        PRUNE_WARMUP,
    )
    with torch.no_grad():
        result["vltp"] = scores([0.5])
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
    # Empty targets are answered "nothing fits" far more often than targets that are there, and SAM's predicted IoU
    # ranks the masks the right way round.
    assert result["nothing_on_empty"] > result["nothing_on_target"] + 0.15, result
    assert result["score_spearman"] > 0.3, result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the learning test's recipe on several seeds.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for seed in parser.parse_args().seeds:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps({name: round(value, 4) for name, value in learn(folder, seed).items()}), flush=True)
