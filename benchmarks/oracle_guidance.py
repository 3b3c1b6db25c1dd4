"""How well does the small system's SAM side segment when it is told the task? The SAM side of
`modeling_vltp.testing.small_config` (ViT, neck, prompt encoder, mask decoder; `VLTPSamModel`), from scratch, guided
by a learned embedding per task in place of LLaVA's projected `[SEG]` (an oracle guidance: nothing on the language
side to learn), trained densely as `learn_synthetic.py`'s pretraining stand-in trains it: the mask losses and SAM's
IoU loss (the config's weights) and the two `TaskMapProbe`s, over rows with a target (12 a step), 4000 steps at
2e-3. `learn_synthetic.py`'s dense model falls short of the issue's 0.70; this separates what the SAM side reaches
in as many steps from what the guidance through LLaVA costs.

It prints, every `--eval-every` steps, the mean IoU on the rows with a target of held-out images (an unseen seed), per
task, and once the resolution ceiling: the IoU of each target pooled to SAM's low-resolution mask grid and brought
back bilinearly, as the model's masks are (what a mask decoder with perfect boundaries would score).

    python benchmarks/oracle_guidance.py --out /tmp/oracle_guidance
    python benchmarks/oracle_guidance.py --out /tmp/oracle_guidance --mlp-dim 128   # a wider ViT MLP
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from learn_synthetic import prepare  # benchmarks/ is the script's folder, first on the path
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from modeling_vltp import VLTPSamModel
from modeling_vltp.data import LISA_ANSWERS, VLTPDataCollator, load_rio, synthetic
from modeling_vltp.testing import TaskMapProbe, small_model_and_processor, task_maps


def generated_rows_with_target(world: Path, split: str, num_images: int, seed: int, processor) -> dict:
    """SAM's pixels once per image, and per row with a non-empty target: its image (`image_of_row`), its task's
    index in `synthetic.TASKS` and its target (boolean, SAM's frame), for `num_images` generated images with all
    the world's tasks."""
    synthetic.generate(world, num_images, seed=seed, format="rio", split=split, tasks_per_image=len(synthetic.TASKS))
    rows = list(load_rio(world, world, split))
    data = prepare(rows, VLTPDataCollator(processor, LISA_ANSWERS))
    targeted = data["masks"].flatten(1).any(1)
    task_index = torch.tensor([synthetic.TASK_OF_SENTENCE[row["task"].strip()] for row in rows])
    return {
        "pixels": data["sam_pixel_values"],
        "image_of_row": data["image_of_row"][targeted],
        "task_index": task_index[targeted],
        "masks": data["masks"][targeted],
    }


def sample_ious(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of each low-resolution mask (S, h, w), brought to the targets' size bilinearly and cut at logit 0, with
    its target (S, H, W)."""
    predicted = nn.functional.interpolate(logits[:, None], targets.shape[-2:], mode="bilinear", align_corners=False)
    predicted = predicted[:, 0] > 0
    return (predicted & targets).flatten(1).sum(1) / (predicted | targets).flatten(1).sum(1)


def per_task(ious: torch.Tensor, task_index: torch.Tensor) -> dict:
    """Mean of `ious` per task name, and over all rows (`"all"`)."""
    means = {
        synthetic.TASKS[task].name: round(ious[task_index == task].mean().item(), 3)
        for task in task_index.unique().tolist()
    }
    return {**means, "all": round(ious.mean().item(), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the generated worlds")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument(
        "--batch-size", type=int, default=12, help="rows a step (the pretraining stand-in: 12 with a target)"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--map-weight", type=float, default=1.0, help="the neck's TaskMapProbe (0: none)")
    parser.add_argument("--layer-map-weight", type=float, default=1.0, help="the prune layer's TaskMapProbe")
    parser.add_argument("--mlp-dim", type=int, default=None, help="the ViT's MLP width (default: small_config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    overrides = {} if args.mlp_dim is None else {"mlp_dim": args.mlp_dim}
    full_model, processor = small_model_and_processor(seed=args.seed, **overrides)
    with tempfile.TemporaryDirectory() as folder:
        full_model.save_pretrained(folder)
        model = VLTPSamModel.from_pretrained(folder)  # the SAM side alone, initialised as the small system is
    out = Path(args.out)
    train = generated_rows_with_target(out / "train", "train", args.train_images, 2 * args.seed, processor)
    held_out = generated_rows_with_target(out / "held_out", "common", args.eval_images, 2 * args.seed + 1, processor)
    low_resolution = 4 * model.vision_model.grid_size  # SAM's mask decoder upscales the embedding grid 4 times
    targets = held_out["masks"][:, None].float()
    pooled = nn.functional.adaptive_avg_pool2d(targets, low_resolution)
    ceiling = sample_ious(torch.logit(pooled[:, 0].clamp(1e-4, 1 - 1e-4)), held_out["masks"])
    print(json.dumps({"resolution ceiling": per_task(ceiling, held_out["task_index"])}), flush=True)

    num_tasks = len(synthetic.TASKS)
    guidance = nn.Embedding(num_tasks, model.config.vision_config.guidance_dim)
    # The pretraining stand-in's probes; a task without a row of an image covers none of it, so the rows with a
    # target give the whole maps.
    maps = task_maps(
        train["masks"], train["image_of_row"], train["task_index"], num_tasks, model.vision_model.grid_size
    )
    probes = [
        (args.map_weight, TaskMapProbe(model.config, num_tasks)),
        (args.layer_map_weight, TaskMapProbe(model.config, num_tasks, model.config.vision_config.prune_layers[0] - 1)),
    ]
    for _, probe in probes:
        probe.watch(model)
    parameters = [p for name, p in model.named_parameters() if "prune_decoder" not in name]
    parameters += [*guidance.parameters(), *(p for _, probe in probes for p in probe.parameters())]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 50), args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    dense = [0.0] * len(model.config.vision_config.prune_layers)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            ious = torch.cat(
                [
                    sample_ious(
                        model.decode_masks(
                            held_out["pixels"][held_out["image_of_row"][rows]],
                            guidance(held_out["task_index"][rows]),
                            dense,
                        )[0],
                        held_out["masks"][rows],
                    )
                    for rows in torch.arange(len(held_out["masks"])).split(64)
                ]
            )
        model.train()
        return per_task(ious, held_out["task_index"])

    model.train()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train["masks"]), (args.batch_size,), generator=generator)
        outputs = model(
            train["pixels"][train["image_of_row"][rows]],
            guidance(train["task_index"][rows]),
            masks=train["masks"][rows].float(),
            prune_rates=dense,
        )
        batch_maps = maps[train["image_of_row"][rows]]
        loss = outputs.loss + sum(weight * probe(outputs, batch_maps) for weight, probe in probes)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            report = {"step": step, "seconds": round(time.monotonic() - start), "held-out mean IoU": evaluate()}
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
