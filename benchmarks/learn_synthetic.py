"""Does the training loop learn? The small system of `modeling_vltp.testing.small_config` (16x16 ViT tokens, pruned
after layer 1 of 4), from scratch, on the synthetic task world (all 12 tasks), on the CPU, for several seeds at once
(see docs/training.md, "Proof that it learns").

1. Pretraining stand-in: every weight of the small system but the prune decoder is trained densely on the training
   split (in the real system this is what the pretrained SAM and LLaVA bring), with `PretrainingProbes` standing in
   for a pretrained LLaVA's knowledge of what a task asks for and of what is in the image, and two `TaskMapProbe`s
   for what a pretrained SAM's features hold (after the neck, and on the layer the prune decoder reads). Empty
   targets are answered "nothing fits", as the package's stage 1 does by default.
2. Stage 1 (`train`, stage 1): LISA's recipe on top, LoRA + projection + mask decoder + new-token rows, with the IoU
   loss and the "nothing fits" answers.
3. Stage 2 (`train`, stage 2): VLTP@Finetune, one model per rate (0.5 and 0.8) from one `[SEG]` cache; at 0.8 with
   a softer smoothed mask (`prune_temperature` 3) and five times the steps, which the harder choice needs (see
   docs/training.md).

Then, on held-out images of an unseen seed: mean IoU on the samples with a non-empty target for the dense (stage-1)
model, VLTP at 0.5 and 0.8, and the paper's random baseline (Table 7: the dense model keeping a random half of the
tokens); with generated answers (the model decides whether there is a mask), gIoU over all samples, the share of
empty targets answered "nothing fits", and the Spearman correlation of SAM's predicted IoU (the `score`) with the
true IoU over the masks the model gave (what `segment` returns); for comparison, the same correlation teacher-forced
on every sample, which includes masks for empty targets that the model answers "nothing fits" and so never shows.
It prints one JSON line per seed and a table of mean, min and max over the seeds, each figure next to the issue's
target.

    python benchmarks/learn_synthetic.py --out /tmp/learn_synthetic   # seeds 0 1 2, 3 processes
    # the measured variant with cheaper pretraining steps (the ViT once per image for 3 of its tasks; 32 minutes):
    python benchmarks/learn_synthetic.py --out /tmp/learn_synthetic --images-per-step 4 --pretrain-steps 6000
"""

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.data import LISA_ANSWERS, NO_TARGET_ANSWERS, VLTPDataCollator, load_rio, synthetic
from modeling_vltp.data.collator import group_rows_by_image
from modeling_vltp.testing import (
    PretrainingProbes,
    TaskMapProbe,
    small_config,
    small_model_and_processor,
    task_maps,
    tasks_present,
)
from modeling_vltp.training import (
    STAGE1_INPUTS,
    TrainConfig,
    evaluate_rates,
    train,
    with_targets,
)


def training_settings(steps: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The `training` block of every stage: warmup then cosine decay to zero, AdamW with beta2 0.95, one process."""
    return {
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 50),
        "adam_beta2": 0.95,
        "weight_decay": 0.0,
        "save_strategy": "no",
        "logging_steps": max(1, steps // 10),
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": seed,
    }


TASK_MAP_PROBES = "task_map_probes.pt"  # the pretraining's task-map probes, beside the model it saves
PER_IMAGE = ("sam_pixel_values", "original_sizes", "reshaped_input_sizes")  # what `prepare` keeps once per image


def prepare(rows: list, collator: VLTPDataCollator, chunk: int = 240) -> dict:
    """All `rows` through `collator`, `chunk` rows at a time: each row's text tensors (padded to one length), CLIP
    pixels and target mask (boolean), SAM's pixels and sizes once per image of a chunk, and `image_of_row`. Holding
    SAM's pixels once per image instead of once per row takes a twelfth of the memory."""
    parts, images = [], 0
    for start in range(0, len(rows), chunk):
        part = collator(rows[start : start + chunk])
        first_rows, image_of_row = group_rows_by_image([row["image_id"] for row in rows[start : start + chunk]])
        part.update({name: part[name][first_rows] for name in PER_IMAGE}, masks=part["masks"] > 0.5)
        part["image_of_row"] = images + torch.tensor(image_of_row)
        images += len(first_rows)
        parts.append(part)
    length = max(part["input_ids"].shape[1] for part in parts)
    padding = {"input_ids": collator.processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    return {
        name: torch.cat(
            [torch.nn.functional.pad(p[name], (0, length - p[name].shape[1]), value=padding[name]) for p in parts]
            if name in padding
            else [p[name] for p in parts]
        )
        for name in parts[0]
    }


def rows_with_target(targeted_rows: list, with_target: torch.Tensor, args, generator) -> torch.Tensor:
    """A pretraining batch's rows with a target: `args.batch_size` drawn from `with_target` (all of them), or with
    `args.images_per_step` that many images drawn and `batch_size / images_per_step` rows from each (`targeted_rows`:
    the rows with a target of each image that has one), so that SAM's ViT runs once per image for several of its
    tasks."""
    if not args.images_per_step:
        return with_target[torch.randint(0, len(with_target), (args.batch_size,), generator=generator)]
    images = torch.randint(0, len(targeted_rows), (args.images_per_step,), generator=generator).tolist()
    per_image = args.batch_size // args.images_per_step
    return torch.cat(
        [
            targeted_rows[image][torch.randint(0, len(targeted_rows[image]), (per_image,), generator=generator)]
            for image in images
        ]
    )


def vision_overrides(args) -> dict:
    """The fields of `small_config`'s ViT that the command line replaces."""
    return {} if args.prune_layer is None else {"prune_layers": [args.prune_layer]}


def pretrain(world: Path, output: Path, args, seed: int) -> None:
    """Train every weight of the small system but the prune decoder densely for `args.pretrain_steps`, on LISA's
    losses plus `args.probe_weight` times the losses of `PretrainingProbes` (its task probe weighted by
    `args.task_probe_weight`) and of two `TaskMapProbe`s, on the neck (weighted by `args.map_weight`) and on the ViT
    layer the prune decoder reads (`args.layer_map_weight`): the stand-in for pretrained SAM and LLaVA.
    Empty targets are answered "nothing fits", as in stage 1. Each batch draws `args.batch_size` rows with a target
    (those train the mask losses) and `args.empty_rows` without (those train the "nothing fits" answers; the default,
    7 of 19, is the world's share of empty targets, 37%). Every training row is prepared once (one drawn answer each),
    and batches are drawn from those tensors: preparing the images batch by batch would take most of the time. The
    task-map probes are saved beside the model (`TASK_MAP_PROBES`), for `benchmarks/task_map_auc.py`."""
    model, processor = small_model_and_processor(seed=seed, **vision_overrides(args))
    num_tasks = len(synthetic.TASKS)
    probes = PretrainingProbes(model.config, num_tasks, args.task_probe_weight)
    dataset = load_rio(world, world, "train")
    rows = list(dataset)
    data = prepare(rows, VLTPDataCollator(processor, LISA_ANSWERS, seed, no_target_answers=NO_TARGET_ANSWERS))
    present = tasks_present(dataset)
    data["task_index"] = torch.tensor([synthetic.TASK_OF_SENTENCE[row["task"].strip()] for row in rows])
    data["tasks_present"] = torch.stack([present[row["image_id"]] for row in rows])

    map_probe = TaskMapProbe(model.config, num_tasks)
    watching = map_probe.watch(model)
    layer_map_probe = TaskMapProbe(model.config, num_tasks, layer=model.config.vision_config.prune_layers[0] - 1)
    watching_layer = layer_map_probe.watch(model)
    grid = model.vision_model.grid_size
    maps = task_maps(data["masks"], data["image_of_row"], data["task_index"], num_tasks, grid)

    parameters = [p for name, p in model.named_parameters() if "prune_decoder" not in name]
    parameters += [*probes.parameters(), *map_probe.parameters(), *layer_map_probe.parameters()]
    steps = args.pretrain_steps
    optimizer = torch.optim.AdamW(parameters, lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 50), steps)
    generator = torch.Generator().manual_seed(seed)
    dense = [0.0] * len(model.config.vision_config.prune_layers)
    model.train()
    targeted = data["masks"].flatten(1).any(1)
    with_target, without = targeted.nonzero()[:, 0], (~targeted).nonzero()[:, 0]
    image_of_targeted = data["image_of_row"][with_target]
    targeted_rows = [with_target[image_of_targeted == image] for image in image_of_targeted.unique()]
    for _ in tqdm(range(steps), desc=f"pretraining (seed {seed})", mininterval=30):
        index = torch.cat(
            [
                rows_with_target(targeted_rows, with_target, args, generator),
                without[torch.randint(0, len(without), (args.empty_rows,), generator=generator)],
            ]
        )
        inputs = {name: value[index] for name, value in data.items() if name not in PER_IMAGE}
        if args.images_per_step:  # each image once: SAM's dense ViT and neck run once per image for all its rows
            images, image_indices = data["image_of_row"][index].unique(return_inverse=True)
        else:
            images, image_indices = data["image_of_row"][index], None
        inputs.update({name: data[name][images] for name in PER_IMAGE}, masks=inputs["masks"].float())
        model_inputs = {name: inputs[name] for name in STAGE1_INPUTS if name in inputs}
        outputs = model(**model_inputs, prune_rates=dense, image_indices=image_indices, output_hidden_states=True)
        probe_loss = probes(outputs, inputs["input_ids"], inputs["task_index"], inputs["tasks_present"])
        batch_maps = maps[images]
        map_loss = args.map_weight * map_probe(outputs, batch_maps, image_indices)
        map_loss = map_loss + args.layer_map_weight * layer_map_probe(outputs, batch_maps, image_indices)
        loss = outputs.loss + args.probe_weight * (probe_loss + map_loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    watching.remove()
    watching_layer.remove()
    model.eval().save_pretrained(output)
    processor.save_pretrained(output)
    probe_states = {
        name: {"layer": probe.layer, "weights": probe.state_dict()}
        for name, probe in (("neck", map_probe), ("layer", layer_map_probe))
    }
    torch.save(probe_states, output / TASK_MAP_PROBES)


STAGE2_RATES = (0.5, 0.8)


def stage_config(model: Path, output: Path, data: dict, steps: int, args, seed: int) -> dict:
    """A stage's `TrainConfig` fields (learning rate 1e-3, the `training_settings`)."""
    training = training_settings(steps, args.batch_size, 1e-3, seed)
    return {"model": str(model), "output_dir": str(output), "data": data, "training": training}


def run_seed(args, seed: int) -> dict:
    """The whole recipe with `seed` (world, initialisation, batches) in `args.out/seed<seed>`: the held-out figures
    of `FIGURES`, and the seconds it took."""
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    out = Path(args.out) / f"seed{seed}"
    world = out / "world"
    num_tasks = len(synthetic.TASKS)
    if not (world / "RIO_train_all_thing.json").exists():
        synthetic.generate(
            world, args.train_images, seed=2 * seed, format="rio", split="train", tasks_per_image=num_tasks
        )
        synthetic.generate(
            world, args.eval_images, seed=2 * seed + 1, format="rio", split="common", tasks_per_image=num_tasks
        )
    data = {"format": "rio", "annotations": str(world), "images": str(world), "eval_split": "common"}
    pretrain(world, out / "pretrained", args, seed)
    train(
        TrainConfig.from_dict(stage_config(out / "pretrained", out / "stage1", data, args.stage1_steps, args, seed), 1)
    )
    # Stage 2 once per rate (the paper trains a model per rate), from one [SEG] cache.
    for rate, steps, temperature in zip(STAGE2_RATES, args.stage2_steps, args.stage2_temperatures):
        stage2 = stage_config(out / "stage1", out / f"stage2_r{rate:g}", data, steps, args, seed)
        cache = str(out / "seg_cache")
        stage2.update(seg_cache=cache, prune_rates=[rate], prune_temperature=temperature)
        train(TrainConfig.from_dict(stage2, 2))

    evaluation = load_rio(world, world, "common")
    targeted = with_targets(evaluation)
    processor = VLTPProcessor.from_pretrained(out / "stage1")
    dense = VLTPForTaskSegmentation.from_pretrained(out / "stage1")
    vltp = {rate: VLTPForTaskSegmentation.from_pretrained(out / f"stage2_r{rate:g}") for rate in STAGE2_RATES}
    (dense_targeted,) = evaluate_rates(dense, processor, targeted, [[0.0]])
    vltp_targeted = {rate: evaluate_rates(vltp[rate], processor, targeted, [[rate]])[0] for rate in STAGE2_RATES}
    (random_targeted,) = evaluate_rates(dense, processor, targeted, [[0.5]], selection="random", seed=seed)
    (vltp_generated,) = evaluate_rates(vltp[0.5], processor, evaluation, [[0.5]], answers="generated")
    (vltp_forced,) = evaluate_rates(vltp[0.5], processor, evaluation, [[0.5]])
    return {
        "seed": seed,
        "dense": dense_targeted["gIoU"],
        "vltp_0.5": vltp_targeted[0.5]["gIoU"],
        "vltp_0.8": vltp_targeted[0.8]["gIoU"],
        "random_0.5": random_targeted["gIoU"],
        "gIoU_all": vltp_generated["gIoU"],
        "nothing_on_empty": vltp_generated["nothing_on_empty"],
        "score_spearman": vltp_generated["score_spearman"],
        "score_spearman_forced": vltp_forced["score_spearman"],
        "samples": len(evaluation),
        "non_empty": len(targeted),
        "seconds": time.monotonic() - start,
    }


# The held-out figures, with the target for each (a threshold, or a margin against another figure).
FIGURES = (
    ("dense", "dense, mean IoU non-empty", ">= 0.70"),
    ("vltp_0.5", "VLTP 0.5, mean IoU non-empty", "dense - 0.01"),
    ("vltp_0.8", "VLTP 0.8, mean IoU non-empty", "dense - 0.03"),
    ("random_0.5", "random 0.5, mean IoU non-empty", "VLTP 0.5 - 0.15"),
    ("gIoU_all", "gIoU all, generated answers (VLTP 0.5)", ">= 0.70"),
    ("nothing_on_empty", "empty targets answered nothing", ">= 0.70"),
    ("score_spearman", "Spearman(score, IoU), generated answers (VLTP 0.5)", ">= 0.5"),
    ("score_spearman_forced", "Spearman(score, IoU), teacher-forced, every sample", "(none)"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="working folder (worlds, models, caches), one subfolder a seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3, help="seeds run at once, each in its own process")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--pretrain-steps", type=int, default=4000)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--probe-weight", type=float, default=1.0, help="the probes of the pretraining stand-in")
    parser.add_argument(
        "--task-probe-weight",
        type=float,
        default=1.0,
        help="the task probe's loss, relative to the image probe's; 0 leaves it out (see benchmarks/seg_guidance.py)",
    )
    parser.add_argument(
        "--map-weight", type=float, default=1.0, help="TaskMapProbe's loss on the neck, relative to the other probes'"
    )
    parser.add_argument(
        "--layer-map-weight", type=float, default=1.0, help="TaskMapProbe's loss on the layer the prune decoder reads"
    )
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, nargs=2, default=[200, 1000], help="at rate 0.5, then at 0.8")
    parser.add_argument(
        "--stage2-temperatures", type=float, nargs=2, default=[1.0, 3.0], help="prune_temperature at 0.5, then 0.8"
    )
    parser.add_argument("--batch-size", type=int, default=12, help="rows a batch (in pretraining, rows with a target)")
    parser.add_argument(
        "--images-per-step",
        type=int,
        default=0,
        help="draw a pretraining batch's rows with a target from this many images, batch-size / images-per-step "
        "each, SAM's ViT running once per image (0: from all rows, the ViT once per row)",
    )
    parser.add_argument(
        "--prune-layer",
        type=int,
        default=None,
        help="the ViT layer after which stage 2 prunes (default: small_config's)",
    )
    parser.add_argument("--empty-rows", type=int, default=7, help="rows without a target in a pretraining batch")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads a seed (the tiny model is fastest on few)"
    )
    args = parser.parse_args()
    if args.images_per_step < 0 or (args.images_per_step and args.batch_size % args.images_per_step):
        parser.error(
            f"--images-per-step must be 0 or divide --batch-size {args.batch_size}, got {args.images_per_step}"
        )
    try:
        small_config(**vision_overrides(args))
    except ValueError as error:
        parser.error(f"--prune-layer: {error}")
    start = time.monotonic()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_seed, [args] * len(args.seeds), args.seeds))
    for result in results:
        print(json.dumps(result))
    first = results[0]
    print(
        f"\nSynthetic world, seeds {args.seeds}: {first['samples']} held-out samples a seed ({args.eval_images} "
        f"unseen images), {first['non_empty']} non-empty for seed {first['seed']}; {time.monotonic() - start:.0f} s"
    )
    print("| figure | target | mean | min | max | per seed |\n|---|---|---|---|---|---|")
    for key, name, target in FIGURES:
        values = np.array([np.nan if r[key] is None else r[key] for r in results], dtype=float)
        seeds = " ".join(f"{value:.3f}" for value in values)
        print(f"| {name} | {target} | {values.mean():.3f} | {values.min():.3f} | {values.max():.3f} | {seeds} |")


if __name__ == "__main__":
    main()
