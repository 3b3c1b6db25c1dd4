"""Does SAM follow the task in `[SEG]`? For models of `benchmarks/learn_synthetic.py` (e.g. trained with and without
the task probe, `--task-probe-weight 0`), on held-out samples with a target (see docs/training.md, "Why the
pretraining stand-in has a task probe"):

- prompt IoU: the IoU of each row's mask with the mask SAM gives on the same image when guided by the `[SEG]` of
  another task (the next row of that image). 1 means the mask decoder ignores its prompt;
- `[SEG]` spread: the embeddings' mean distance from their mean, relative to their mean norm, and the task's share
  of their variance (between-task over total sum of squares);
- gradient task share: the same share for the gradient of the mask losses (BCE + Dice) at each `[SEG]` embedding,
  i.e. how much of what the mask losses ask of `[SEG]` differs from task to task;
- question attention: the share of attention that the hidden state read as `[SEG]` gives the question's tokens, in
  the language model's last layer (beside the question's share of the sequence's tokens).

    python benchmarks/seg_guidance.py OUT/seed0/stage1 OUT_NOTASK/seed0/stage1 --world OUT/seed0/world
"""

import argparse

import torch

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.data import LISA_ANSWERS, VLTPDataCollator, load_rio, synthetic
from modeling_vltp.metrics import sample_ious
from modeling_vltp.training import with_targets


def task_share(values: torch.Tensor, tasks: torch.Tensor) -> float:
    """Between-task sum of squares over the total one, for rows `values` (N, d) of tasks `tasks` (N,)."""
    mean = values.mean(0)
    total = ((values - mean) ** 2).sum()
    between = sum((tasks == t).sum() * ((values[tasks == t].mean(0) - mean) ** 2).sum() for t in tasks.unique())
    return float(between / total)


def next_row_of_same_image(image_ids: list) -> torch.Tensor:
    """For each row, the next row (cyclically) with the same image."""
    partner = list(range(len(image_ids)))
    for image in set(image_ids):
        rows = [row for row, other in enumerate(image_ids) if other == image]
        for row, following in zip(rows, rows[1:] + rows[:1]):
            partner[row] = following
    return torch.tensor(partner)


def measure(model_dir: str, rows: list) -> dict:
    """The figures of the module docstring for the model in `model_dir`, on `rows` (held-out, with a target)."""
    processor = VLTPProcessor.from_pretrained(model_dir)
    model = VLTPForTaskSegmentation.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = VLTPDataCollator(processor, LISA_ANSWERS, seed=0)(rows)
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        sam_pixel_values=batch["sam_pixel_values"],
        masks=batch["masks"].float(),
        reshaped_input_sizes=batch["reshaped_input_sizes"],
        prune_rates=[0.0],
        output_attentions=True,
    )
    seg_embeds, samples = output.seg_embeds, output.seg_sample_indices
    seg_embeds.retain_grad()
    (output.mask_bce_loss + output.mask_dice_loss).backward()
    tasks = torch.tensor([synthetic.TASK_OF_SENTENCE[row["task"].strip()] for row in rows])[samples]
    input_ids, labels = batch["input_ids"][samples], batch["labels"][samples]
    _, seg_positions = model.seg_positions(input_ids)  # the states read as [SEG]
    # The question: the tokens after the image and before the answer (the labelled tokens).
    positions = torch.arange(input_ids.shape[1])[None]
    after_image = positions > (positions * (input_ids == model.config.llava_config.image_token_id)).amax(1, True)
    answer_start = torch.where(labels != -100, positions, input_ids.shape[1]).amin(1, True)
    question = after_image & (positions < answer_start)
    attention = output.attentions[-1][samples, :, seg_positions]  # (S, heads, length)
    with torch.no_grad():
        partner = next_row_of_same_image([rows[int(sample)]["image_id"] for sample in samples])
        swapped = model.decode_masks(batch["sam_pixel_values"][samples], seg_embeds[partner], [0.0])[0] > 0
    own = output.pred_masks.detach() > 0
    prompt_ious = sample_ious((own & swapped).flatten(1).sum(1).tolist(), (own | swapped).flatten(1).sum(1).tolist())
    embeds = seg_embeds.detach()
    return {
        "prompt IoU": sum(prompt_ious) / len(prompt_ious),
        "[SEG] spread": ((embeds - embeds.mean(0)).norm(dim=1).mean() / embeds.norm(dim=1).mean()).item(),
        "[SEG] task share": task_share(embeds, tasks),
        "gradient task share": task_share(seg_embeds.grad, tasks),
        "question attention": (attention * question[:, None]).sum(-1).mean().item(),
        "question's share of tokens": (question.sum(1) / batch["attention_mask"][samples].sum(1)).mean().item(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (e.g. OUT/seed0/stage1 of learn_synthetic.py)")
    parser.add_argument("--world", required=True, help="the synthetic world of those models (OUT/seed<N>/world)")
    parser.add_argument("--rows", type=int, default=240, help="held-out samples with a target to measure on")
    args = parser.parse_args()
    rows = list(with_targets(load_rio(args.world, args.world, "common")))[: args.rows]
    results = {model: measure(model, rows) for model in args.models}
    names = list(next(iter(results.values())))
    print("| model | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for model, figures in results.items():
        print(f"| {model} | " + " | ".join(f"{figures[name]:.3f}" for name in names) + " |")


if __name__ == "__main__":
    main()
