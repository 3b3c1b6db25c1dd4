"""Several tasks on one image share the work that does not depend on the task (issue 10): CLIP and the projector,
LLaVA's prompt prefix up to the image tokens, SAM's dense layers. Shared, unshared and chunked runs agree.

Tolerances. Both paths run the same operations on the same values in a different grouping: the prefix in a batch of
images instead of one row per task, the question's attention over a KV cache instead of the whole sequence, SAM's
dense layers on fewer rows. Only float32 reduction order changes, which the kernels choose per shape (and per CPU under
MKL), so the results agree to a few ulps per operation rather than bitwise:
- LLaVA logits within 1e-5 of their largest magnitude: float32's epsilon is 1.2e-7, and the tiny LLaMA (2 layers,
  sums over at most ~100 positions and 64 channels) adds a few ulps per layer; measured ~2e-7, the bound leaves 50x.
- predicted IoUs within 1e-5 (issue 10) and masks equal on at least 99.9% of pixels (a pixel whose logit is within
  rounding of 0 may flip).
"""

import pytest
import test_task_model
import torch
from test_task_model import TASKS, BanTokenInRow, images_and_masks, training_batch
from transformers import LogitsProcessor, LogitsProcessorList

from modeling_vltp import VLTPSamModel
from modeling_vltp.testing import tiny_config, tiny_model_and_processor

trained = test_task_model.trained  # the tiny system trained to answer "Sure, [SEG]." (a module-scoped fixture)

LOGIT_TOLERANCE = 1e-5
IOU_TOLERANCE = 1e-5


class RecordLogits(LogitsProcessor):
    """Keep the raw next-token logits of every generation step, one list of steps per `generate` call."""

    def __init__(self):
        self.calls, self._length = [], None

    def __call__(self, input_ids, scores):
        if self._length is None or input_ids.shape[1] <= self._length:
            self.calls.append([])
        self._length = input_ids.shape[1]
        self.calls[-1].append(scores.clone())
        return scores

    def per_row(self) -> list[torch.Tensor]:
        """(steps, vocab) logits of each row, rows of successive calls one after the other."""
        rows = []
        for steps in self.calls:
            rows += list(torch.stack(steps, dim=1).unbind(0))
        return rows


def run(model, processor, images, tasks, ban_row=None, **kwargs):
    record = RecordLogits()
    processors = [record] + ([BanTokenInRow(processor.seg_token_id, ban_row)] if ban_row is not None else [])
    results = model.segment(
        images, tasks, processor, max_new_tokens=8, logits_processor=LogitsProcessorList(processors), **kwargs
    )
    return results, record.per_row()


def assert_same_results(results, expected, logits, expected_logits):
    assert len(results) == len(expected)
    for result, reference, row_logits, reference_logits in zip(results, expected, logits, expected_logits):
        assert (result.image_index, result.task, result.text) == (
            reference.image_index,
            reference.task,
            reference.text,
        )
        assert result.seg_found == reference.seg_found
        steps = min(len(row_logits), len(reference_logits))  # a chunk stops when its own rows are done
        scale = reference_logits[:steps].abs().max()
        assert (row_logits[:steps] - reference_logits[:steps]).abs().max() <= LOGIT_TOLERANCE * scale
        assert result.mask.shape == reference.mask.shape
        assert (result.mask == reference.mask).float().mean().item() >= 0.999
        if reference.seg_found:
            assert result.score == pytest.approx(reference.score, abs=IOU_TOLERANCE)


def test_shared_and_unshared_segment_agree_with_several_images_and_a_task_without_seg(trained):
    model, processor, _ = trained
    images = images_and_masks()[0]
    tasks = [[TASKS[0], TASKS[1], "hold the hot soup"], [TASKS[1]]]  # 3 and 1 tasks, questions of different lengths
    shared, shared_logits = run(model, processor, images, tasks, ban_row=1)
    unshared, unshared_logits = run(model, processor, images, tasks, ban_row=1, share_image_work=False)
    assert [r.seg_found for r in unshared] == [True, False, True, True]
    assert_same_results(shared, unshared, shared_logits, unshared_logits)


def test_sharing_runs_the_image_work_once_per_image(trained):
    """CLIP sees each image once, LLaVA prefills the shared prefix once per image and then only the questions, and
    SAM's first layer runs once per image; unshared, all of it runs once per (image, task)."""
    model, processor, _ = trained
    images = images_and_masks()[0]
    tasks = [[TASKS[0], TASKS[1], "hold the hot soup"], [TASKS[1]]]
    seen = {"clip": [], "llm": [], "sam": []}
    hooks = [
        model.llava.model.vision_tower.register_forward_pre_hook(
            lambda m, args, kwargs: seen["clip"].append(
                kwargs.get("pixel_values", args[0] if args else None).shape[0]
            ),
            with_kwargs=True,
        ),
        model.llava.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: seen["llm"].append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
        ),
        model.vision_model.vision_encoder.layers[0].register_forward_hook(
            lambda m, args, out: seen["sam"].append(args[0].shape[0])
        ),
    ]
    try:
        model.segment(images, tasks, processor, max_new_tokens=8)
        shared = {name: list(calls) for name, calls in seen.items()}
        for calls in seen.values():
            calls.clear()
        model.segment(images, tasks, processor, max_new_tokens=8, share_image_work=False)
    finally:
        for hook in hooks:
            hook.remove()
    num_image_tokens = processor.num_image_tokens
    assert shared["clip"] == [2] and seen["clip"] == [4]
    prefix_rows, prefix_length = shared["llm"][0]
    assert prefix_rows == 2 and prefix_length > num_image_tokens  # BOS, "USER:" and the image tokens
    assert shared["llm"][1][0] == 4 and shared["llm"][1][1] == seen["llm"][0][1] - prefix_length  # questions only
    assert shared["sam"] == [2] and seen["sam"] == [4]


def test_chunked_rows_give_the_results_of_one_pass(trained):
    """At most 3 rows per pass: image 1's three tasks span both chunks."""
    model, processor, _ = trained
    images = images_and_masks()[0]
    tasks = [[TASKS[0], TASKS[1]], [TASKS[1], "hold the hot soup", TASKS[0]]]
    seen = []
    hook = model.vision_model.vision_encoder.layers[0].register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0])
    )
    try:
        chunked, chunked_logits = run(model, processor, images, tasks, max_batch_rows=3)
    finally:
        hook.remove()
    whole, whole_logits = run(model, processor, images, tasks)
    assert seen == [2, 1]  # rows (0, 0, 1) then (1, 1): image 1 is encoded in both chunks
    assert [r.image_index for r in chunked] == [0, 0, 1, 1, 1]
    assert_same_results(chunked, whole, chunked_logits, whole_logits)


def test_forward_with_several_seg_per_sample_matches_one_image_copy_per_seg():
    """The teacher-forced forward groups a sample's [SEG] by image; the reference decodes one image copy per [SEG]."""
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor, answers=["Sure, it is [SEG].", "It is [SEG]."])
    # The processor allows one [SEG] per answer; the model reads any number: make the answer's first token a second.
    batch["input_ids"][0, (batch["labels"][0] != -100).nonzero()[0, 0]] = processor.seg_token_id
    with torch.no_grad():
        output = model(**batch)
        samples = output.seg_sample_indices
        masks, ious, _ = model.decode_masks(batch["sam_pixel_values"][samples], output.seg_embeds)
    assert samples.tolist() == [0, 0, 1]
    # same operations, SAM's dense layers on 2 rows instead of 3: float32 rounding only
    assert torch.allclose(output.pred_masks, masks, rtol=1e-5, atol=1e-5)
    assert torch.allclose(output.iou_scores, ious, atol=IOU_TOLERANCE)


def test_sam_model_takes_several_tasks_per_image():
    """Stage 2 groups a sample's tasks by image: `image_indices` gives each embedding its image, targets per task."""
    segmenter = VLTPSamModel(tiny_config()).eval()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 128, 128, generator=generator)
    seg_embeds = torch.randn(3, segmenter.config.vision_config.guidance_dim, generator=generator)
    masks = (torch.rand(3, 128, 128, generator=generator) > 0.5).float()
    sizes = torch.tensor([[128, 100], [90, 128]])
    indices = torch.tensor([1, 0, 1])
    with torch.no_grad():
        grouped = segmenter(pixels, seg_embeds, masks, sizes, image_indices=indices)
        copies = segmenter(pixels[indices], seg_embeds, masks, sizes[indices])
    assert grouped.seg_sample_indices.tolist() == [1, 0, 1]
    assert torch.allclose(grouped.pred_masks, copies.pred_masks, rtol=1e-5, atol=1e-5)
    assert grouped.loss.item() == pytest.approx(copies.loss.item(), rel=1e-5)


def one_image_batches(processor):
    """Two samples asking about one image: a training batch with a copy of the image per sample, and the same batch
    with the image once and `image_indices` [0, 0]."""
    batch = training_batch(processor, answers=["Sure, it is [SEG].", "It is [SEG]."])
    for name in ("sam_pixel_values", "reshaped_input_sizes"):
        batch[name][1] = batch[name][0]
    grouped = dict(batch, image_indices=torch.tensor([0, 0]))
    for name in ("sam_pixel_values", "reshaped_input_sizes", "original_sizes"):
        grouped[name] = batch[name][:1]
    return batch, grouped


def test_forward_with_image_indices_matches_a_copy_of_the_image_per_sample():
    """Two samples ask about one image: with `image_indices` its SAM pixels come once and the ViT's first layer sees
    one row; the loss (LM, mask and IoU parts), masks and IoUs are those of the batch holding a copy of the image per
    sample (float32 rounding only, as above). Malformed indices are refused."""
    model, processor = tiny_model_and_processor()
    batch, grouped = one_image_batches(processor)
    rows = []
    hook = model.vision_model.vision_encoder.layers[0].register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            shared = model(**grouped)
            copies = model(**batch)
    finally:
        hook.remove()
    assert rows == [1, 2]
    assert torch.allclose(shared.pred_masks, copies.pred_masks, rtol=1e-5, atol=1e-5)
    assert torch.allclose(shared.iou_scores, copies.iou_scores, atol=IOU_TOLERANCE)
    for part in ("loss", "lm_loss", "mask_bce_loss", "mask_dice_loss", "iou_loss"):
        assert getattr(shared, part).item() == pytest.approx(getattr(copies, part).item(), rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match=r"image_indices must be in \[0, 0\]"):
        model(**dict(grouped, image_indices=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="image_indices has batch size 3"):
        model(**dict(grouped, image_indices=torch.tensor([0, 0, 0])))
    with pytest.raises(ValueError, match="reshaped_input_sizes gives each image of sam_pixel_values its size: 1 rows"):
        model(**dict(grouped, reshaped_input_sizes=batch["reshaped_input_sizes"]))  # one per sample


@pytest.mark.parametrize("rates", [[0.0], [0.5]])
def test_image_indices_give_the_gradients_of_a_copy_of_the_image_per_sample(rates):
    """Training through the shared path: at rate 0 the whole ViT runs once per image, at 0.5 the prefix does and the
    straight-through gate of the pruned stage carries the prune decoder's gradient. The gradients equal those of the
    batch holding a copy of the image per sample, to float32 rounding of other row counts: within 1e-5 of the largest
    gradient of any parameter (not of each parameter's own: an attention key bias's exact gradient is 0, since softmax
    ignores a shift shared by a query's logits, so what is computed for it is rounding noise of about 1e-10)."""
    gradients = []
    for which in (1, 0):  # the grouped batch, then the one with a copy per sample
        model, processor = tiny_model_and_processor()
        model.train()
        model(**one_image_batches(processor)[which], prune_rates=rates).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    shared, copies = gradients
    assert shared.keys() == copies.keys()
    assert any("prune_decoder" in name for name in shared)  # L_P reaches it at any rate, the gate too at 0.5
    scale = max(gradient.abs().max() for gradient in copies.values())
    for name, gradient in copies.items():
        assert (shared[name] - gradient).abs().max() <= 1e-5 * scale, name
