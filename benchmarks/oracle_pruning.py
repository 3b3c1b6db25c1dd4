"""How much of VLTP's loss at a pruning rate is the prune decoder's choice of tokens? On the models that
`learn_synthetic.py` trained (its `--out` folder), on the same held-out samples with a target (teacher-forced), mean
IoU of:

- dense: the stage-1 model, nothing pruned;
- VLTP: the stage-2 model of the rate, keeping the prune decoder's choice;
- oracle: the same model keeping the tokens the target covers first (by the share of each token's patch it covers),
  then the prune decoder's choice: what pruning at that rate costs when the choice is right.

VLTP - oracle is what a better choice could win back; oracle - dense is what pruning at that rate costs anyway (the
pruned tokens keep their features from before the pruning stage).

    python benchmarks/oracle_pruning.py --out /tmp/learn_synthetic
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.data import VLTPDataCollator, load_rio
from modeling_vltp.processing_vltp import DEFAULT_ANSWER
from modeling_vltp.training import mask_overlaps, with_targets


class OracleTokenScores(nn.Module):
    """In place of the prune decoder: the tokens `covered` (share of each token's patch the target covers, (1, N))
    rank first, by that share; the others by the prune decoder's scores."""

    def __init__(self, prune_decoder: nn.Module):
        super().__init__()
        self.prune_decoder = prune_decoder
        self.covered = None

    def forward(self, image_tokens: torch.Tensor, guidance_embeds: torch.Tensor) -> torch.Tensor:
        scores = self.prune_decoder(image_tokens, guidance_embeds)
        above_all = scores.max(dim=-1, keepdim=True).values + 1
        return torch.where(self.covered > 0, above_all + self.covered, scores)


def mean_ious(folder: Path, rate: float) -> dict:
    """Dense, VLTP and oracle mean IoU at `rate` on the held-out samples with a target of one seed's `folder`."""
    world = folder / "world"
    held_out = with_targets(load_rio(world, world, "common"))
    processor = VLTPProcessor.from_pretrained(folder / "stage1")
    models = {
        "dense": VLTPForTaskSegmentation.from_pretrained(folder / "stage1").eval(),
        "vltp": VLTPForTaskSegmentation.from_pretrained(folder / f"stage2_r{rate:g}").eval(),
    }
    vision = models["vltp"].vision_model
    prune_decoder, oracle = vision.prune_decoder, OracleTokenScores(vision.prune_decoder)
    collator = VLTPDataCollator(processor, [DEFAULT_ANSWER], keep_targets=True)
    # (model, token choice, rate) of each figure
    runs = {
        "dense": ("dense", prune_decoder, 0.0),
        "vltp": ("vltp", prune_decoder, rate),
        "oracle": ("vltp", oracle, rate),
    }
    ious = {name: [] for name in runs}
    for index in tqdm(range(len(held_out)), desc=f"{folder.name}, rate {rate:g}", mininterval=10):
        batch = collator([held_out[index]])  # one sample: one image, one [SEG]
        oracle.covered = nn.functional.adaptive_avg_pool2d(batch["masks"][:1].float(), vision.grid_size).flatten(1)
        with torch.no_grad():
            # Stage 2 leaves LLaVA and the [SEG] projection as stage 1 made them (its [SEG] cache relies on that), so
            # both models guide SAM with the same embeddings.
            _, seg_embeds, samples = models["dense"].seg_embeddings(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            )
            for name, (model_name, choice, run_rate) in runs.items():
                vision.prune_decoder = choice
                pred_masks, _, _ = models[model_name].decode_masks(batch["sam_pixel_values"], seg_embeds, [run_rate])
                intersection, union = mask_overlaps(processor, pred_masks, samples, batch)[0].tolist()
                ious[name].append(intersection / union)
    vision.prune_decoder = prune_decoder
    return {name: float(np.mean(values)) for name, values in ious.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the --out folder of learn_synthetic.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        for rate in args.rates:
            results.append({"seed": seed, "rate": rate, **mean_ious(Path(args.out) / f"seed{seed}", rate)})
            print(json.dumps(results[-1]))
    print("\n| rate | dense | VLTP | oracle | VLTP - dense | oracle - dense |\n|---|---|---|---|---|---|")
    for rate in args.rates:
        mean = {key: np.mean([r[key] for r in results if r["rate"] == rate]) for key in ("dense", "vltp", "oracle")}
        print(
            f"| {rate:g} | {mean['dense']:.3f} | {mean['vltp']:.3f} | {mean['oracle']:.3f} | "
            f"{mean['vltp'] - mean['dense']:+.3f} | {mean['oracle'] - mean['dense']:+.3f} |"
        )


if __name__ == "__main__":
    main()
