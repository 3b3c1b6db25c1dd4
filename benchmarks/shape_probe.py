"""Can the small SAM ViT learn shape at all? The ViT of `modeling_vltp.testing.small_config` alone, trained to name
the shape of the object under each of its 16x16 tokens (7 shapes or background; cross-entropy on the neck's output
through a 1x1 convolution) on synthetic scenes: the most direct supervision of shape there is. `learn_synthetic.py`
finds the full system segmenting every object for the world's shape tasks; this separates the ViT's ability from the
rest of the system.

It prints, every `--eval-every` steps, the token accuracy on the foreground tokens of held-out images (an unseen seed)
and of 200 training images (equal figures mean the ViT underfits rather than memorises), per shape on the held-out
images, and per shape *trait* (round, flat-sided, pointed: what the world's tasks ask to tell apart).

    python benchmarks/shape_probe.py --out /tmp/shape_probe
    python benchmarks/shape_probe.py --out /tmp/shape_probe --hidden-size 64 --num-heads 4   # a wider ViT
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from modeling_vltp import VLTPSamVisionModel
from modeling_vltp.data import synthetic
from modeling_vltp.data.masks import segmentation_to_rle
from modeling_vltp.testing import small_model_and_processor

SHAPES = tuple(synthetic.SHAPE_TRAITS)  # class k + 1 is SHAPES[k]; class 0 is the background
COARSE_TRAITS = ("round", "flat-sided", "pointed")  # every shape has exactly one of them
# The coarse trait of each class (-1 for the background).
TRAIT_OF_CLASS = torch.tensor(
    [-1]
    + [
        COARSE_TRAITS.index(next(t for t in traits if t in COARSE_TRAITS))
        for traits in synthetic.SHAPE_TRAITS.values()
    ]
)


def scenes(folder: Path, num_images: int, seed: int, split: str, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's pixels (N, 3, S, S) and each pixel's shape class (N, S, S) of `num_images` generated scenes, read
    back from the COCO-Tasks files (`COCO_category_id` is an object's shape; the segmentations are the visible parts,
    so they do not overlap)."""
    synthetic.generate(folder, num_images, seed=seed, format="coco_tasks", split=split)
    coco = json.loads((folder / f"task_1_{split}.json").read_text())
    image_folder = "train2014" if split == "train" else "val2014"
    labels = {image["id"]: np.zeros((image["height"], image["width"]), np.int64) for image in coco["images"]}
    for annotation in coco["annotations"]:
        label = labels[annotation["image_id"]]
        rle = segmentation_to_rle(annotation["segmentation"], *label.shape)
        label[mask_utils.decode(rle).astype(bool)] = annotation["COCO_category_id"]
    images = [Image.open(folder / image_folder / image["file_name"]).convert("RGB") for image in coco["images"]]
    pixels = processor.sam_image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(np.stack([labels[image["id"]] for image in coco["images"]]))


def token_labels(pixel_labels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The class covering most of each patch (N, S / patch, S / patch)."""
    one_hot = nn.functional.one_hot(pixel_labels, len(SHAPES) + 1).permute(0, 3, 1, 2).float()
    return nn.functional.avg_pool2d(one_hot, patch_size).argmax(1)


def vision_model(args) -> VLTPSamVisionModel:
    """The small system's ViT, initialised as `small_model_and_processor` does, at the width and depth asked for."""
    model, _ = small_model_and_processor(
        seed=args.seed,
        hidden_size=args.hidden_size,
        mlp_dim=2 * args.hidden_size,
        num_attention_heads=args.num_heads,
        num_hidden_layers=args.num_layers,
        global_attn_indexes=list(range(1, args.num_layers, 2)),
    )
    return model.vision_model


def accuracies(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Foreground token accuracy, per shape and per coarse trait (a shape predicted with the right trait counts)."""
    foreground = labels > 0
    result = {"accuracy": (predicted[foreground] == labels[foreground]).float().mean().item()}
    for k, shape in enumerate(SHAPES, start=1):
        result[shape] = (predicted[labels == k] == k).float().mean().item()
    for k, trait in enumerate(COARSE_TRAITS):
        where = foreground & (TRAIT_OF_CLASS[labels] == k)
        result[trait] = (TRAIT_OF_CLASS[predicted[where]] == k).float().mean().item()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the generated scenes")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    _, processor = small_model_and_processor(seed=args.seed)
    out = Path(args.out)
    train_pixels, train_labels = scenes(out / "train", args.train_images, 2 * args.seed, "train", processor)
    eval_pixels, eval_labels = scenes(out / "test", args.eval_images, 2 * args.seed + 1, "test", processor)
    vision = vision_model(args)
    patch = vision.config.patch_size
    train_tokens, eval_tokens = token_labels(train_labels, patch), token_labels(eval_labels, patch)
    head = nn.Conv2d(vision.config.output_channels, len(SHAPES) + 1, 1)
    parameters = [p for name, p in vision.named_parameters() if "prune_decoder" not in name] + [*head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 50), args.steps)
    generator = torch.Generator().manual_seed(args.seed)

    def predict(pixels):
        vision.eval()
        with torch.no_grad():
            logits = torch.cat([head(vision(chunk).last_hidden_state) for chunk in pixels.split(50)])
        vision.train()
        return logits.argmax(1)

    vision.train()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(train_pixels), (args.batch_size,), generator=generator)
        logits = head(vision(train_pixels[index]).last_hidden_state)
        loss = nn.functional.cross_entropy(logits, train_tokens[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            held_out = accuracies(predict(eval_pixels), eval_tokens)
            seen = accuracies(predict(train_pixels[:200]), train_tokens[:200])
            row = {"step": step, "train": seen["accuracy"], **held_out, "seconds": time.monotonic() - start}
            print(json.dumps({key: round(value, 3) for key, value in row.items()}), flush=True)


if __name__ == "__main__":
    main()
