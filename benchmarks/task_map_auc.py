"""Do the pretraining stand-in's image features tell the objects apart by each task's trait? For a pretrained model of
`benchmarks/learn_synthetic.py` (its `pretrained` folder keeps the two `TaskMapProbe`s in `task_map_probes.pt`), on
the images of a split of its world: per task, the AUC with which each probe's logit separates the object tokens that
task's target covers from the other object tokens (0.5: the features do not tell them apart; 1: perfectly). A token
counts as an object's, and as covered, when more than half of its patch is (see `modeling_vltp.testing.task_maps`).
Run on the training split too, it tells a trait the ViT never learned from one it learned but does not generalise
(see docs/training.md, "Proof that it learns").

    python benchmarks/task_map_auc.py OUT/seed0/pretrained --world OUT/seed0/world --splits common train
"""

import argparse
from pathlib import Path

import torch
from learn_synthetic import TASK_MAP_PROBES  # benchmarks/ is the script's folder, first on the path

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.data import LISA_ANSWERS, VLTPDataCollator, load_rio, synthetic
from modeling_vltp.data.collator import group_rows_by_image
from modeling_vltp.testing import TaskMapProbe, task_maps


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The probability that a positive scores above a negative (ties count half): the area under the ROC curve; NaN
    when `labels` are all of one class."""
    positives, negatives = scores[labels], scores[~labels].sort().values
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    below = torch.searchsorted(negatives, positives, right=False)
    tied = torch.searchsorted(negatives, positives, right=True) - below
    return float((below + 0.5 * tied).sum() / (len(positives) * len(negatives)))


def probe_logits(model, pixels: torch.Tensor, probes: dict, batch_size: int = 20) -> dict:
    """Each probe's logits (N, num_tasks, grid, grid) on every image of `pixels`, from one dense ViT pass an image."""
    handles = [probe.watch(model) for probe in probes.values()]
    logits = {name: [] for name in probes}
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            model.vision_model(pixels[start : start + batch_size], prune_rates=[0.0])
            for name, probe in probes.items():
                logits[name].append(probe.logits())
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in logits.items()}


def measure(model_dir: Path, world: Path, split: str, max_images: int) -> dict:
    """Per probe, per task: the AUC of the module docstring on the first `max_images` images of `split`."""
    model = VLTPForTaskSegmentation.from_pretrained(model_dir).eval()
    processor = VLTPProcessor.from_pretrained(model_dir)
    num_tasks = len(synthetic.TASKS)
    states = torch.load(model_dir / TASK_MAP_PROBES)
    probes = {}
    for name, state in states.items():
        probes[name] = TaskMapProbe(model.config, num_tasks, layer=state["layer"])
        probes[name].load_state_dict(state["weights"])
    dataset = load_rio(world, world, split)
    image_ids = dataset["image_id"]
    kept_images = set(list(dict.fromkeys(image_ids))[:max_images])
    rows = [row for row, image in zip(dataset, image_ids) if image in kept_images]
    batch = VLTPDataCollator(processor, LISA_ANSWERS, seed=0)(rows)
    first_rows, image_of_row = group_rows_by_image([row["image_id"] for row in rows])
    task_index = torch.tensor([synthetic.TASK_OF_SENTENCE[row["task"].strip()] for row in rows])
    maps = task_maps(
        batch["masks"] > 0.5, torch.tensor(image_of_row), task_index, num_tasks, model.vision_model.grid_size
    )
    logits = probe_logits(model, batch["sam_pixel_values"][first_rows], probes)
    objects = maps.amax(1) > 0.5  # (images, grid, grid): tokens more than half covered by some task's target
    return {
        name: [auc(values[:, task][objects], maps[:, task][objects] > 0.5) for task in range(num_tasks)]
        for name, values in logits.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a `pretrained` folder of benchmarks/learn_synthetic.py")
    parser.add_argument("--world", type=Path, required=True, help="that seed's world folder")
    parser.add_argument("--splits", nargs="+", default=["common", "train"])
    parser.add_argument("--images", type=int, default=60, help="images of each split (the first ones)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.images < 1:
        parser.error(f"--images must be at least 1, got {args.images}")
    if not (args.model / TASK_MAP_PROBES).exists():
        parser.error(f"{args.model} has no {TASK_MAP_PROBES}: pretrain it with benchmarks/learn_synthetic.py")
    names = [task.name for task in synthetic.TASKS]
    print("| probe | split | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for split in args.splits:
        for probe, aucs in measure(args.model, args.world, split, args.images).items():
            print(f"| {probe} | {split} | " + " | ".join(f"{value:.2f}" for value in aucs) + " |")


if __name__ == "__main__":
    main()
