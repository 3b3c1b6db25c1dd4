"""VLTPForTaskSegmentation with the tiny offline system: shapes, losses, training, saving, and `segment`."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, LogitsProcessor, LogitsProcessorList

from modeling_vltp import (
    VLTPConfig,
    VLTPForTaskSegmentation,
    VLTPProcessor,
    VLTPSamModel,
    VLTPSamSegmenter,
    VLTPVisionConfig,
    iou_prediction_loss,
)
from modeling_vltp.testing import tiny_config, tiny_model_and_processor, tiny_processor

TASKS = ["you can use the thing to sit comfortably", "you can use the thing to cut the food on the table"]


def images_and_masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((100, 140, 3)) * 255).astype("uint8")) for _ in range(2)]
    masks = [np.zeros((100, 140), dtype=np.uint8) for _ in range(2)]
    masks[0][10:40, 20:60] = 1
    masks[1][50:90, 70:130] = 1
    return images, masks


def training_batch(processor, answers="Sure, [SEG]."):
    images, masks = images_and_masks()
    return processor(images=images, tasks=TASKS, answers=answers, masks=masks)


def train(model, batch, steps: int, lr: float = 3e-3) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained():
    """The tiny system after 40 steps on one batch: it answers "Sure, [SEG]." and its losses have fallen."""
    model, processor = tiny_model_and_processor(seed=0)
    losses = train(model, training_batch(processor), steps=40)
    return model, processor, losses


def test_forward_shapes_and_loss_parts():
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor)
    output = model(**batch)
    assert output.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
    assert output.pred_masks.shape == (2, 32, 32)  # SAM's low-resolution masks: 4x the 8x8 embedding grid
    assert output.iou_scores.shape == (2,) and output.seg_embeds.shape == (2, 32)
    assert output.seg_sample_indices.tolist() == [0, 1]
    assert [k.shape for k in output.keep_indices] == [(2, 32)]  # 64 tokens at rate 0.5
    config = model.config
    expected = (
        config.lm_loss_weight * output.lm_loss
        + config.mask_bce_loss_weight * output.mask_bce_loss
        + config.mask_dice_loss_weight * output.mask_dice_loss
        + config.prune_loss_weight * output.prune_loss
        + config.iou_loss_weight * output.iou_loss
    )
    assert torch.allclose(output.loss, expected)
    parts = (output.lm_loss, output.mask_bce_loss, output.mask_dice_loss, output.prune_loss, output.iou_loss)
    assert all(part.item() > 0 for part in parts)


def test_losses_fall_when_training_on_one_batch(trained):
    _, _, losses = trained
    assert losses[-1] < 0.5 * losses[0]


def test_several_seg_tokens_in_a_sample_and_samples_without_one():
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor, answers=["Sure, it is [SEG].", "There is none."])
    # The processor allows one [SEG] per answer; the model reads any number: make the answer's first token a second.
    first_answer_token = (batch["labels"][0] != -100).nonzero()[0, 0]
    batch["input_ids"][0, first_answer_token] = processor.seg_token_id
    output = model(**batch)
    assert output.seg_sample_indices.tolist() == [0, 0]
    assert output.pred_masks.shape[0] == 2 and output.keep_indices[0].shape[0] == 2
    assert torch.isfinite(output.loss)
    output.loss.backward()  # the mask losses come from sample 0 only, and still train the mask decoder
    assert model.mask_decoder.iou_token.weight.grad is not None

    none = processor(images=images_and_masks()[0], tasks=TASKS, answers="No.", masks=images_and_masks()[1])
    output = model(**none)
    assert output.pred_masks.shape[0] == 0 and output.mask_bce_loss.item() == 0.0 and output.iou_loss.item() == 0.0
    assert torch.allclose(output.loss, model.config.lm_loss_weight * output.lm_loss)


def test_iou_loss_is_the_squared_error_against_the_real_iou_of_the_thresholded_mask():
    """Recomputed by hand in numpy: the mask logits upsampled to SAM's frame, thresholded at 0, intersected with the
    target inside each image's unpadded region. Sample 1's target is emptied, so its real IoU is 0 (a mask was
    predicted) or 1 (none was)."""
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor)
    batch["masks"][1] = 0
    output = model(**batch)
    logits = torch.nn.functional.interpolate(output.pred_masks[:, None], (128, 128), mode="bilinear")[:, 0]
    expected = []
    for k in range(2):
        height, width = batch["reshaped_input_sizes"][k].tolist()
        predicted = (logits[k, :height, :width] > 0).numpy()
        target = batch["masks"][k, :height, :width].numpy() > 0
        union = np.logical_or(predicted, target).sum()
        expected.append(np.logical_and(predicted, target).sum() / union if union else 1.0)
    assert 0 < expected[0] < 1  # a partial overlap: the threshold and the region matter
    by_hand = np.mean((output.iou_scores.detach().numpy() - np.array(expected)) ** 2)
    assert output.iou_loss.item() == pytest.approx(by_hand, rel=1e-5)  # float32 vs float64 of the same few terms


def test_iou_prediction_loss_counts_an_empty_mask_of_an_empty_target_as_iou_1():
    """Pixels outside `valid` count for nothing: sample 1 predicts only there, so its mask is empty like its target."""
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, :2, :2] = 1.0  # 4 pixels predicted, 2 of them on the 8-pixel target: IoU 2 / 10
    logits[1, 3, :] = 1.0
    targets = torch.zeros(2, 4, 4)
    targets[0, 1:3, :2] = 1.0
    targets[0, 1:3, 2:] = 1.0
    valid = torch.ones(2, 4, 4)
    valid[1, 3, :] = 0.0
    scores = torch.tensor([0.5, 0.5])
    loss = iou_prediction_loss(scores, logits, targets, valid)
    assert loss.item() == pytest.approx(((0.5 - 0.2) ** 2 + (0.5 - 1.0) ** 2) / 2)


def test_iou_loss_trains_sams_iou_head_towards_the_real_iou(trained):
    """Only SAM's IoU head trains here (the masks do not depend on it, so their real IoU stays fixed): after 30 Adam
    steps its predictions close at least 80% of the gap to the real IoU. The untrained head starts near 0, the
    trained masks score about 0.9, so the gap starts large; 80% leaves room for Adam still oscillating."""
    model = copy.deepcopy(trained[0])
    batch = training_batch(trained[1])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("mask_decoder.iou_prediction_head.")
    model.mask_decoder.iou_prediction_head.apply(model._init_weights)

    def gap():
        with torch.no_grad():
            return model(**batch).iou_loss.sqrt().item()  # root mean squared error of the predicted IoUs

    before, masks_before = gap(), model(**batch).pred_masks
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.3
    assert gap() < 0.2 * before
    assert torch.equal(model(**batch).pred_masks, masks_before)


def test_configs_saved_before_the_iou_loss_load_with_its_default():
    config = tiny_config().to_dict()
    del config["iou_loss_weight"]
    assert VLTPConfig.from_dict(config).iou_loss_weight == 1.0


def test_hidden_state_choice_before_or_at_seg():
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor)
    seg_positions = (batch["input_ids"] == processor.seg_token_id).nonzero()[:, 1]
    _, before = model.seg_positions(batch["input_ids"])
    model.config.seg_hidden_state = "seg"
    _, at = model.seg_positions(batch["input_ids"])
    assert torch.equal(before, seg_positions - 1) and torch.equal(at, seg_positions)


def test_forward_bad_inputs_raise_clear_errors():
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor)
    with pytest.raises(ValueError, match="sam_pixel_values has batch size 1 but input_ids has 2"):
        model(**{**batch, "sam_pixel_values": batch["sam_pixel_values"][:1]})
    with pytest.raises(ValueError, match=r"masks must be \(batch_size, 128, 128\)"):
        model(**{**batch, "masks": batch["masks"][:, :64]})
    with pytest.raises(ValueError, match="sam_pixel_values are required"):
        model(**{k: v for k, v in batch.items() if k != "sam_pixel_values"})
    model.config.seg_token_id = None
    with pytest.raises(ValueError, match="seg_token_id is not set"):
        model(**batch)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="seg_hidden_state must be"):
        VLTPConfig(seg_hidden_state="after")
    with pytest.raises(ValueError, match="guidance_dim, prompt_encoder_config.hidden_size and mask_decoder"):
        VLTPConfig(vision_config=VLTPVisionConfig.vit_b(guidance_dim=128))
    paper = VLTPConfig.llava15_7b_sam_vit_h()
    assert paper.vision_config.prune_layers == [16, 24] and paper.vision_config.hidden_size == 1280
    assert paper.llava_config.text_config.hidden_size == 4096
    assert VLTPConfig.llava15_7b_sam_vit_l().vision_config.prune_layers == [12, 18]
    assert (paper.lm_loss_weight, paper.mask_bce_loss_weight, paper.mask_dice_loss_weight) == (1.0, 2.0, 0.5)


def test_save_and_load_reproduce_outputs(tmp_path, trained):
    model, processor, _ = trained
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, VLTPForTaskSegmentation) and isinstance(loaded_processor, VLTPProcessor)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VLTPConfig)
    positional = loaded.prompt_encoder.shared_embedding.positional_embedding
    assert positional.data_ptr() == loaded.shared_image_embedding.positional_embedding.data_ptr()
    assert not loaded.llava.config.tie_word_embeddings, "LLaVA's own word embeddings stay untied"
    batch = training_batch(processor)
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**training_batch(loaded_processor))
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.pred_masks, actual.pred_masks)


def test_sam_model_loads_the_systems_sam_side_under_the_same_names(tmp_path, trained):
    """`VLTPSamModel` (stage 2) is the system without LLaVA: same parameter names, loads from the system's checkpoint,
    decodes the same masks, and saves with an `auto_map` of its own. `VLTPSamSegmenter` is its former name."""
    model, processor, _ = trained
    model.save_pretrained(tmp_path / "system")
    sam = VLTPSamModel.from_pretrained(tmp_path / "system").eval()
    expected_names = [name for name in model.state_dict() if not name.startswith(("llava.", "text_hidden_fcs."))]
    assert list(sam.state_dict()) == expected_names
    batch = training_batch(processor)
    with torch.no_grad():
        output = model(**batch)
        sam_output = sam(batch["sam_pixel_values"], output.seg_embeds, image_indices=output.seg_sample_indices)
    assert torch.equal(output.pred_masks, sam_output.pred_masks)
    assert torch.equal(output.iou_scores, sam_output.iou_scores)
    sam.save_pretrained(tmp_path / "sam")
    auto_map = json.loads((tmp_path / "sam" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_vltp.VLTPSamModel"
    assert VLTPSamSegmenter is VLTPSamModel


class BanTokenInRow(LogitsProcessor):
    """Forbid one token in one row of the batch: lets a test decide which answers contain [SEG]."""

    def __init__(self, token_id: int, row: int):
        self.token_id, self.row = token_id, row

    def __call__(self, input_ids, scores):
        scores[self.row, self.token_id] = -float("inf")
        return scores


def test_segment_several_tasks_on_one_image_matches_the_teacher_forced_forward(trained):
    model, processor, _ = trained
    image = images_and_masks()[0][0]
    results = model.segment(image, TASKS, processor, max_new_tokens=8)
    assert [r.task for r in results] == TASKS and [r.image_index for r in results] == [0, 0]
    for result in results:
        assert result.seg_found and "[SEG]" in result.text
        assert result.mask.shape == (100, 140) and result.mask.dtype == torch.bool
        assert len(result.kept_token_maps) == 1 and result.kept_token_maps[0].shape == (8, 8)
        assert result.kept_token_maps[0].sum().item() == 32
        # The [SEG] state collected from the cached generation steps equals the one of a plain forward pass over the
        # generated answer (one row, so no padding); the bound allows for float differences between the two paths.
        single = processor(images=[image], tasks=[result.task], answers=result.text)
        with torch.no_grad():
            forward = model(**single)
        masks = processor.post_process_masks(
            forward.pred_masks[:, None], single["original_sizes"], single["reshaped_input_sizes"]
        )
        assert result.score == pytest.approx(forward.iou_scores.item(), abs=1e-4)
        agreement = (masks[0] == result.mask).float().mean().item()
        assert agreement > 0.999


def test_segment_without_seg_gives_an_empty_mask_and_says_so(trained):
    model, processor, _ = trained
    images = images_and_masks()[0]
    ban = LogitsProcessorList([BanTokenInRow(processor.seg_token_id, row=1)])
    results = model.segment(images, TASKS, processor, max_new_tokens=8, logits_processor=ban)
    assert [r.image_index for r in results] == [0, 1]
    assert results[0].seg_found and results[0].mask.any()
    assert not results[1].seg_found and "[SEG]" not in results[1].text
    assert results[1].mask.shape == (100, 140) and not results[1].mask.any()
    assert (
        results[1].score is None
        and results[1].message == f"the model answered {results[1].text!r} without [SEG], so no mask"
    )


def test_segment_min_score_empties_masks_scored_below_it(trained):
    model, processor, _ = trained
    image = images_and_masks()[0][0]
    (plain,) = model.segment(image, TASKS[0], processor, max_new_tokens=8)
    (kept,) = model.segment(image, TASKS[0], processor, max_new_tokens=8, min_score=plain.score - 0.01)
    (dropped,) = model.segment(image, TASKS[0], processor, max_new_tokens=8, min_score=plain.score + 0.01)
    assert plain.mask.any() and torch.equal(kept.mask, plain.mask) and kept.message is None
    assert dropped.seg_found and not dropped.mask.any() and dropped.score == plain.score
    assert f"below min_score {plain.score + 0.01:g}" in dropped.message


def test_segment_rates_and_bad_task_lists(trained):
    model, processor, _ = trained
    images = images_and_masks()[0]
    dense = model.segment(images, TASKS[0], processor, prune_rates=[0.0], max_new_tokens=8)
    assert all(r.kept_token_maps[0].all() for r in dense)
    pruned = model.segment(images, TASKS[0], processor, prune_rates=[0.75], max_new_tokens=8)
    assert all(r.kept_token_maps[0].sum().item() == 16 for r in pruned)
    with pytest.raises(ValueError, match="2 images but 3 task entries"):
        model.segment(images, [TASKS[0]] * 3, processor)
    with pytest.raises(ValueError, match="non-empty string"):
        model.segment(images[0], [""], processor)


def test_single_linear_projector_option(tmp_path):
    """LISA's checkpoints project CLIP features with one Linear: `projector="linear"` builds, trains and reloads."""
    from modeling_vltp.testing import tiny_processor

    processor = tiny_processor()
    config = tiny_config(processor)
    config.projector = "linear"
    model = VLTPForTaskSegmentation(config)
    names = [n for n, _ in model.named_parameters() if "multi_modal_projector" in n]
    assert names == [
        "llava.model.multi_modal_projector.linear_1.weight",
        "llava.model.multi_modal_projector.linear_1.bias",
    ]
    batch = training_batch(processor)
    model(**batch).loss.backward()
    assert model.llava.model.multi_modal_projector.linear_1.weight.grad is not None
    model.save_pretrained(tmp_path)
    reloaded = VLTPForTaskSegmentation.from_pretrained(tmp_path)
    assert reloaded.config.projector == "linear"
    expected = model.llava.model.multi_modal_projector.linear_1.weight
    assert torch.equal(reloaded.llava.model.multi_modal_projector.linear_1.weight, expected)
    with pytest.raises(ValueError, match="projector must be 'mlp' or 'linear'"):
        VLTPConfig(projector="conv")


def test_sam_positional_encoding_stays_tied_whatever_tie_word_embeddings_says(tmp_path):
    """peft's merge_and_unload resets `tie_word_embeddings`; SAM's shared positional encoding must survive that."""
    model, _ = tiny_model_and_processor()
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path)
    loaded = VLTPForTaskSegmentation.from_pretrained(tmp_path)
    expected = model.shared_image_embedding.positional_embedding
    assert torch.equal(loaded.shared_image_embedding.positional_embedding, expected)
    assert torch.equal(loaded.prompt_encoder.shared_embedding.positional_embedding, expected)


def test_text_config_is_llavas_and_token_embeddings_resize(tmp_path):
    """`get_text_config()` is LLaVA's language-model config, so transformers' own `resize_token_embeddings` resizes
    LLaVA's input and output embeddings and records the size where generation and saving read it."""
    model, processor = tiny_model_and_processor()
    text_config = model.config.llava_config.text_config
    assert model.config.get_text_config() is text_config
    assert model.config.get_text_config(decoder=True) is text_config
    size = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(size + 7)
    assert model.get_input_embeddings().num_embeddings == size + 7
    assert model.get_output_embeddings().out_features == size + 7
    assert model.config.get_text_config().vocab_size == size + 7
    assert model(**training_batch(processor)).logits.shape[-1] == size + 7
    model.save_pretrained(tmp_path)
    assert VLTPForTaskSegmentation.from_pretrained(tmp_path).get_output_embeddings().out_features == size + 7


def test_tied_word_embeddings_stay_tied_after_resizing():
    processor = tiny_processor()
    config = tiny_config(processor)
    config.llava_config.tie_word_embeddings = True
    model = VLTPForTaskSegmentation(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + 3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    positional = model.prompt_encoder.shared_embedding.positional_embedding
    assert positional is model.shared_image_embedding.positional_embedding


def test_hidden_states_and_attentions_are_llavas():
    model, processor = tiny_model_and_processor()
    model.set_attn_implementation("eager")  # SDPA computes no attention weights
    batch = training_batch(processor)
    plain = model(**batch)
    assert plain.hidden_states is None and plain.attentions is None
    output = model(**batch, output_hidden_states=True, output_attentions=True)
    text_config = model.config.get_text_config()
    batch_size, length = batch["input_ids"].shape
    assert len(output.hidden_states) == text_config.num_hidden_layers + 1
    assert all(h.shape == (batch_size, length, text_config.hidden_size) for h in output.hidden_states)
    assert len(output.attentions) == text_config.num_hidden_layers
    assert output.attentions[0].shape == (batch_size, text_config.num_attention_heads, length, length)
    # they are the states SAM's guidance is read from
    samples, positions = model.seg_positions(batch["input_ids"])
    expected = model.text_hidden_fcs(output.hidden_states[-1][samples, positions])
    assert torch.equal(output.seg_embeds, expected)


def test_forward_passes_llava_keywords_on_and_rejects_the_rest():
    model, processor = tiny_model_and_processor()
    batch = training_batch(processor)
    with torch.no_grad():
        plain = model(**batch)
        # LLaVA's positions: shifted positions change the logits, so they reach LLaVA
        positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        assert torch.equal(model(**batch, position_ids=positions).logits, plain.logits)
        assert not torch.allclose(model(**batch, position_ids=positions + 5).logits, plain.logits)
        # the Trainer's token count: LLaVA's loss becomes a sum over answer tokens divided by it
        num_tokens = (batch["labels"][:, 1:] != -100).sum()
        summed = model(**batch, num_items_in_batch=torch.tensor(1)).lm_loss
        assert summed.item() == pytest.approx(plain.lm_loss.item() * num_tokens.item(), rel=1e-5)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['cache_position', 'pixel_value'\]"):
        model(**batch, pixel_value=batch["pixel_values"], cache_position=torch.arange(3))
    assert VLTPForTaskSegmentation.accepts_loss_kwargs is False  # the Trainer averages over accumulation steps


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"prune_rates": [2.0]}, r"prune_rates must each be in \[0, 1\)"),
        ({"prune_rates": [0.5, 0.5]}, "one rate per pruning stage"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"max_new_tokens": None}, "max_new_tokens must be a positive integer, got None"),
        ({"max_batch_rows": 2.5}, "max_batch_rows must be a positive integer, got 2.5"),
        ({"min_score": "0.5"}, "min_score must be a finite number .* got '0.5'"),
        ({"min_score": float("nan")}, "min_score must be a finite number .* got nan"),
        ({"output_hidden_states": False}, r"segment sets \['output_hidden_states'\] itself"),
        ({"images": ["not an image"]}, r"images\[0\] is a str"),
        ({"tasks": [3]}, "non-empty string"),
    ],
)
def test_segment_checks_every_argument_before_any_compute(arguments, message):
    """The model answers without [SEG] here (it is banned), and still a bad rate is refused: nothing runs first."""
    model, processor = tiny_model_and_processor()
    calls = []
    model.llava.register_forward_pre_hook(lambda module, args: calls.append(module))
    ban = LogitsProcessorList([BanTokenInRow(processor.seg_token_id, row=0)])
    call = {"images": images_and_masks()[0][:1], "tasks": [TASKS[0]], "logits_processor": ban, **arguments}
    images, tasks = call.pop("images"), call.pop("tasks")
    with pytest.raises(ValueError, match=message):
        model.segment(images, tasks, processor, **call)
    assert calls == []


def test_no_split_modules_name_classes_the_model_contains():
    """accelerate keeps each module named in `_no_split_modules` on one device, matching class names exactly: a stale
    name (e.g. SAM's own layer class after ours replaced it) would let a device map split a ViT layer."""
    model, _ = tiny_model_and_processor()
    present = {type(module).__name__ for module in model.modules()}
    for cls in (VLTPForTaskSegmentation, type(model.vision_model)):
        assert set(cls._no_split_modules) <= present, cls
