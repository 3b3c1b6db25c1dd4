"""Finetuning with the Trainer: both stages on the tiny system and a small synthetic world, the SEG cache, rate
changes, resuming, the metrics, `vltp train` / `vltp eval`, bad input, and a 2-process DDP run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import EvalPrediction, LlavaForConditionalGeneration, TrainerCallback, TrainingArguments

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor, VLTPSamModel, vision_gmacs
from modeling_vltp.cli import main
from modeling_vltp.data import NO_TARGET_ANSWERS, VLTPDataCollator, load_rio, synthetic
from modeling_vltp.metrics import compute_tos_metrics
from modeling_vltp.testing import tiny_config, tiny_model_and_processor
from modeling_vltp.training import (
    STAGE1_LOSSES,
    STAGE2_LOSSES,
    LoraSettings,
    TOSMetrics,
    TrainConfig,
    VLTPTrainer,
    evaluate_rates,
    image_batches,
    load_seg_cache,
    mask_overlaps,
    merge_stage1,
    prepare_stage1_model,
    run_record,
    train,
)

ANSWER = "Sure, [SEG]."
QUIET = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "logging_steps": 1000}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """12 training samples (4 images, 3 tasks each) and 6 evaluation samples of the synthetic world, in RIO files."""
    root = tmp_path_factory.mktemp("world")
    synthetic.generate(root, num_images=4, seed=0, image_size=64, format="rio", split="train")
    synthetic.generate(root, num_images=2, seed=1, image_size=64, format="rio", split="common")
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    model, processor = tiny_model_and_processor(seed=0)
    directory = tmp_path_factory.mktemp("base")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def settings(world, model, output_dir, **overrides) -> dict:
    """A config as a YAML file would give it: a few steps of batch 2 at a high learning rate."""
    config = {
        "model": str(model),
        "output_dir": str(output_dir),
        "data": {"format": "rio", "annotations": str(world), "images": str(world), "eval_split": "common"},
        "lora": {"dropout": 0.0},
        "answers": [ANSWER],
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 3,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            **QUIET,
        },
    }
    training = overrides.pop("training", {})
    config.update(overrides)
    config["training"].update(training)
    return config


def stage2_settings(world, model, output_dir, cache, rates=(0.5,), **overrides) -> dict:
    config = settings(world, model, output_dir, seg_cache=str(cache), prune_rates=list(rates), **overrides)
    del config["lora"], config["answers"]
    return config


@pytest.fixture(scope="module")
def stage1(world, base_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("stage1") / "run"
    summary = train(TrainConfig.from_dict(settings(world, base_model, output), stage=1))
    return output, summary


@pytest.fixture(scope="module")
def stage2(world, stage1, tmp_path_factory):
    """Stage 2 at rate 0.5 from stage 1's model; builds the [SEG] cache on the way."""
    root = tmp_path_factory.mktemp("stage2")
    cache, output = root / "seg_cache", root / "run"
    summary = train(TrainConfig.from_dict(stage2_settings(world, stage1[0], output, cache), stage=2))
    return output, cache, summary


def weights(directory) -> dict:
    """A saved model's weights under the module names (LLaVA's are stored under its legacy names)."""
    return {
        name: tensor.clone()
        for name, tensor in VLTPForTaskSegmentation.from_pretrained(directory).state_dict().items()
    }


def test_stage1_wraps_only_the_trained_parts(base_model):
    model = VLTPForTaskSegmentation.from_pretrained(base_model)
    processor = VLTPProcessor.from_pretrained(base_model)
    peft_model = prepare_stage1_model(model, processor, LoraSettings())
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    groups = {
        "lora": r"llava\.model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)\.lora_[AB]\.",
        "new token rows": r"llava\.(model\.language_model\.embed_tokens|lm_head)\.token_adapter\.",
        "projection": r"text_hidden_fcs\.modules_to_save\.",
        "mask decoder": r"mask_decoder\.modules_to_save\.",
    }
    for name in trainable:
        assert any(re.search(pattern, name) for pattern in groups.values()), name
    for group, pattern in groups.items():
        assert any(re.search(pattern, name) for name in trainable), f"nothing trained in {group}"
    # LoRA r 8 on the two language-model layers' q_proj and v_proj (64 -> 64 and 64 -> 32): A (r x in), B (out x r).
    lora_sizes = [p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert sum(lora_sizes) == 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8)


def test_stage1_changes_only_the_trained_weights(base_model, stage1):
    output, summary = stage1
    before, after = weights(base_model), weights(output)
    assert before.keys() == after.keys()
    new_rows = [
        VLTPProcessor.from_pretrained(base_model).seg_token_id,
        VLTPProcessor.from_pretrained(base_model).image_token_id,
    ]
    trained = re.compile(
        r"^(text_hidden_fcs|mask_decoder)\.|language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)\."
    )
    for name in before:
        if name in ("llava.model.language_model.embed_tokens.weight", "llava.lm_head.weight"):
            keep = torch.ones(len(before[name]), dtype=torch.bool)
            keep[new_rows] = False
            assert torch.equal(before[name][keep], after[name][keep]), name
            assert not torch.equal(before[name][~keep], after[name][~keep]), name
        elif not trained.search(name):
            assert torch.equal(before[name], after[name]), f"{name} changed but is frozen in stage 1"
    for name in (
        "llava.model.language_model.layers.1.self_attn.q_proj.weight",
        "llava.model.language_model.layers.1.self_attn.v_proj.weight",
        "text_hidden_fcs.0.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.output_hypernetworks_mlps.0.proj_in.weight",  # the single-mask output's
    ):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert summary.global_step == 4 and set(summary.eval_metrics) >= {"eval_gIoU", "eval_cIoU", "eval_gmacs"}
    assert summary.eval_metrics["eval_gmacs"] == pytest.approx(
        vision_gmacs(VLTPForTaskSegmentation.config_class.from_pretrained(output).vision_config, [0.0])
    )
    loaded = VLTPForTaskSegmentation.from_pretrained(output)  # a plain checkpoint: no peft needed to load it
    assert (
        loaded.prompt_encoder.shared_embedding.positional_embedding
        is loaded.shared_image_embedding.positional_embedding
    )


def test_stage1_with_gradient_checkpointing_and_bf16_trains_lora(world, base_model, tmp_path):
    output = tmp_path / "run"
    config = settings(
        world, base_model, output, training={"max_steps": 1, "gradient_checkpointing": True, "bf16": True}
    )
    del config["data"]["eval_split"]
    summary = train(TrainConfig.from_dict(config, stage=1))
    before, after = weights(base_model), weights(output)
    name = "llava.model.language_model.layers.0.self_attn.q_proj.weight"
    assert summary.global_step == 1 and not torch.equal(before[name], after[name])


def test_the_main_process_builds_its_models_outside_deepspeed_zero3(base_model, stage1, tmp_path):
    """Issue 14.1: under ZeRO-3, `from_pretrained` on the main process alone (merging stage 1's adapter, the [SEG]
    cache, stage 2's export) builds inside `zero.Init` and hangs. With a ZeRO-3 config active (a stand-in for
    transformers' `HfDeepSpeedConfig`: deepspeed is not installed here, so a build inside `zero.Init` fails at once
    instead of hanging), the merge builds a plain model and leaves the config active for the Trainer."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class ZeRO3Config:
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    active = ZeRO3Config()
    hf_deepspeed.set_hf_deepspeed_config(active)
    try:
        merge_stage1(str(base_model), str(stage1[0] / "adapter"), str(tmp_path / "merged"))
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    torch.testing.assert_close(weights(tmp_path / "merged"), weights(stage1[0]), rtol=0, atol=0)


def test_seg_cache_holds_the_models_seg_embeddings(world, stage1, stage2):
    cache = load_seg_cache(stage2[1])
    assert len(cache["train"]) == 12 and len(cache["eval"]) == 6
    model = VLTPForTaskSegmentation.from_pretrained(stage1[0]).eval()
    processor = VLTPProcessor.from_pretrained(stage1[0])
    rows = load_rio(world, world, "common")
    batch = processor(images=[rows[1]["image"]], tasks=[rows[1]["task"]], answers=ANSWER)
    with torch.no_grad():
        expected = model(**batch).seg_embeds[0]
    row = cache["eval"][1]
    assert row["task"] == rows[1]["task"] and np.array_equal(row["mask"], rows[1]["mask"])
    torch.testing.assert_close(torch.tensor(row["seg_embed"]), expected, rtol=1e-5, atol=1e-5)


def test_stage2_trains_prune_and_mask_decoders_from_the_cache_without_llava(
    world, stage1, stage2, tmp_path, monkeypatch
):
    output, cache, summary = stage2
    before, after = weights(stage1[0]), weights(output)
    for name in before:
        if name.startswith(("vision_model.prune_decoder.", "mask_decoder.")):
            continue
        assert torch.equal(before[name], after[name]), f"{name} changed but is frozen in stage 2"
    assert not torch.equal(
        before["vision_model.prune_decoder.conv1.weight"], after["vision_model.prune_decoder.conv1.weight"]
    )
    assert not torch.equal(before["mask_decoder.iou_token.weight"], after["mask_decoder.iou_token.weight"])
    assert VLTPForTaskSegmentation.config_class.from_pretrained(output).vision_config.prune_rates == [0.5]
    gmacs = summary.eval_metrics["eval_gmacs"]
    assert gmacs == pytest.approx(
        vision_gmacs(VLTPForTaskSegmentation.config_class.from_pretrained(output).vision_config, [0.5])
    )

    def no_llava(*args, **kwargs):
        raise AssertionError("stage 2 built LLaVA although the [SEG] cache exists")

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", no_llava)
    rerun = train(TrainConfig.from_dict(stage2_settings(world, stage1[0], tmp_path / "again", cache), stage=2))
    assert rerun.global_step == 4
    monkeypatch.undo()
    torch.testing.assert_close(weights(tmp_path / "again"), after)  # same seed, same data, same result


def test_stage2_prune_temperature_smooths_the_training_mask_and_is_saved(world, stage1, stage2, tmp_path):
    output, cache, _ = stage2
    softer = tmp_path / "softer"
    train(TrainConfig.from_dict(stage2_settings(world, stage1[0], softer, cache, prune_temperature=3.0), stage=2))
    configs = [VLTPForTaskSegmentation.config_class.from_pretrained(path).vision_config for path in (output, softer)]
    assert [config.prune_temperature for config in configs] == [1.0, 3.0]
    # Same seed and data as the default run, so only the temperature of Eq. 11's smoothed mask makes them differ.
    name = "vision_model.prune_decoder.conv1.weight"
    assert not torch.equal(weights(output)[name], weights(softer)[name])


def test_rate_change_finetunes_from_the_previous_rates_checkpoint(world, stage2, tmp_path):
    previous, cache, _ = stage2
    output = tmp_path / "rate75"
    summary = train(TrainConfig.from_dict(stage2_settings(world, previous, output, cache, rates=(0.75,)), stage=2))
    config = VLTPForTaskSegmentation.config_class.from_pretrained(output)
    assert config.vision_config.prune_rates == [0.75]
    assert summary.eval_metrics["eval_gmacs"] < vision_gmacs(config.vision_config, [0.5])
    before, after = weights(previous), weights(output)
    assert not torch.equal(
        before["vision_model.prune_decoder.conv1.weight"], after["vision_model.prune_decoder.conv1.weight"]
    )
    assert torch.equal(
        before["vision_model.vision_encoder.layers.0.attn.qkv.weight"],
        after["vision_model.vision_encoder.layers.0.attn.qkv.weight"],
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c, base: c.update(model=str(base)),
            r"the model's LLaVA side \(weights, config, text_hidden_fcs\) differs",
        ),
        (lambda c, base: c["data"].update(eval_split="train"), "data.eval_split 'common' -> 'train'"),
        (lambda c, base: c["data"].update(max_train_samples=4), "data.max_train_samples None -> 4"),
    ],
)
def test_a_seg_cache_built_for_other_settings_is_refused(
    world, base_model, stage1, stage2, tmp_path, capsys, edit, message
):
    """Issue 15.4: the cache of stage 1's model and RIO train/common is not reused for another LLaVA or other data
    (a stage-2 output of the same stage-1 model does reuse it: see the rate-change test)."""
    config = stage2_settings(world, stage1[0], tmp_path / "out", stage2[1])
    edit(config, base_model)
    path = write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", "--stage", "2", "--config", str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "field 'seg_cache'" in error and "was built for other settings" in error and re.search(message, error), (
        error
    )
    assert not (tmp_path / "out").exists()


class StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as an interruption would (the checkpoint of that step is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(world, stage1, stage2, tmp_path, caplog, stage):
    checkpoints = {"save_strategy": "steps", "save_steps": 2}

    def config(output, **extra):
        if stage == 1:
            return TrainConfig.from_dict(settings(world, stage1[0], output, training=checkpoints, **extra), stage=1)
        return TrainConfig.from_dict(
            stage2_settings(world, stage1[0], output, stage2[1], training=checkpoints, **extra), stage=2
        )

    train(config(tmp_path / "straight"))
    interrupted = train(config(tmp_path / "resumed"), callbacks=[StopAt(2)])
    assert interrupted.global_step == 2 and (tmp_path / "resumed" / "checkpoint-2").is_dir()
    # A crash during the next save left a checkpoint folder with one file: resume from checkpoint-2 and say so.
    (tmp_path / "resumed" / "checkpoint-3").mkdir()
    (tmp_path / "resumed" / "checkpoint-3" / "README.md").write_text("")
    with caplog.at_level("WARNING", logger="modeling_vltp.training"):
        resumed = train(config(tmp_path / "resumed", resume_from_checkpoint=True))
    assert "resuming from checkpoint-2; skipped checkpoint-3: incomplete" in caplog.text
    assert resumed.global_step == 4
    torch.testing.assert_close(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"training": {"learning_rate": 1e-3}}, "training.learning_rate 0.005 -> 0.001"),
        ({"data": {"max_train_samples": 6}}, "data.max_train_samples None -> 6"),
        ({"annotations": "edited"}, "the annotation files differ"),
        ({"model": "base"}, "the model's config or weights differ"),
    ],
)
def test_resume_refuses_a_different_run_and_says_what_differs(
    world, base_model, stage1, tmp_path, capsys, change, message
):
    """A run folder whose checkpoint came from other settings, data or model is not continued."""
    run = tmp_path / "run"
    original = settings(world, stage1[0], run)
    run.mkdir()
    (run / "checkpoint-600").mkdir()
    (run / "vltp_run.json").write_text(json.dumps(run_record(TrainConfig.from_dict(original, stage=1))))
    config = settings(world, stage1[0], run, training=change.get("training", {}))
    config["data"].update(change.get("data", {}))
    if "annotations" in change:
        edited = json.loads((world / "RIO_train_all_thing.json").read_text())
        edited[0]["expressions"] = "something else"  # one task sentence of the training split
        (tmp_path / "edited").mkdir()
        (tmp_path / "edited" / "RIO_train_all_thing.json").write_text(json.dumps(edited))
        config["data"]["annotations"] = str(tmp_path / "edited")
    if "model" in change:
        config["model"] = str(base_model)
    path = write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", "--stage", "1", "--config", str(path), "--resume"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vltp: error: ") and "holds a different run" in error and message in error, error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-600", "vltp_run.json"]


def test_a_non_empty_output_dir_is_refused_and_overwrite_deletes_only_what_the_run_wrote(
    world, base_model, tmp_path, capsys
):
    """Issue 15.1: an earlier run's folder is kept unless --overwrite; then checkpoint rotation deletes only this
    run's checkpoints, and only the files it wrote there."""
    run = tmp_path / "run"
    (run / "checkpoint-1000").mkdir(parents=True)
    (run / "checkpoint-1000" / "my_notes.txt").write_text("notes")
    (run / "model.safetensors").write_text("the earlier run's model")
    config = settings(world, base_model, run, training={"max_steps": 3, "save_strategy": "steps", "save_steps": 1})
    config["training"]["save_total_limit"] = 1
    del config["data"]["eval_split"]
    path = write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", "--stage", "1", "--config", str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "field 'output_dir'" in error and "is not empty" in error and "--overwrite" in error, error
    assert (run / "model.safetensors").read_text() == "the earlier run's model"

    class NoteInto(TrainerCallback):
        """A user's file put into this run's first checkpoint while the run goes on."""

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                (run / "checkpoint-1" / "mine.txt").write_text("mine")

    train(TrainConfig.from_dict({**config, "overwrite_output_dir": True}, stage=1), callbacks=[NoteInto()])
    assert (run / "checkpoint-1000" / "my_notes.txt").read_text() == "notes"
    assert sorted(p.name for p in (run / "checkpoint-1").iterdir()) == ["mine.txt"]  # the rest was rotated away
    assert not (run / "checkpoint-2").exists() and (run / "checkpoint-3" / "trainer_state.json").is_file()
    assert list(json.loads((run / "vltp_run.json").read_text())["checkpoints"]) == ["checkpoint-3"]


def test_compute_metrics_agree_with_the_tos_metrics_at_each_images_size():
    _, processor = tiny_model_and_processor()
    rng = np.random.default_rng(0)
    images = [np.zeros((40, 70, 3), np.uint8), np.zeros((90, 50, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    targets = [rng.random(image.shape[:2]) > 0.6 for image in images]
    targets[2][:] = False  # an empty target: IoU 1 if the prediction is empty too
    rows = [
        {"image": _pil(image), "task": "dig a hole", "mask": target.astype(np.uint8), "task_id": task}
        for image, target, task in zip(images, targets, [1, 2, 1])
    ]
    batch = VLTPDataCollator(processor, keep_targets=True)(rows)
    logits = torch.randn(3, 32, 32)
    logits[2] = -5.0
    samples = torch.tensor([0, 1, 2])
    overlaps = mask_overlaps(processor, logits, samples, batch)
    predictions = processor.post_process_masks(logits, batch["original_sizes"], batch["reshaped_input_sizes"])
    expected = compute_tos_metrics(predictions, targets, task_ids=[1, 2, 1])
    metrics = TOSMetrics(processor_config_vision(), [0.5])(EvalPrediction(overlaps.numpy(), np.array([1, 2, 1])))
    for name in ("gIoU", "cIoU", "mIoU_tasks"):
        assert metrics[name] == pytest.approx(expected[name])
    assert metrics["gmacs"] == pytest.approx(vision_gmacs(processor_config_vision(), [0.5]))

    # A sample whose answer has no [SEG] counts as an empty prediction.
    without = mask_overlaps(processor, logits[:1], samples[:1], batch)
    assert without[1].tolist() == [0, int(targets[1].sum())]


def test_empty_targets_are_answered_without_seg_unless_lisas_behaviour_is_chosen():
    """The collator answers an empty target with a no-target answer (no [SEG]: no mask to train) and the other rows
    with a [SEG] answer; without `no_target_answers` every row gets [SEG], as in LISA."""
    _, processor = tiny_model_and_processor()
    full, empty = np.zeros((30, 40), np.uint8), np.zeros((30, 40), np.uint8)
    full[5:20, 10:30] = 1
    rows = [
        {"image": _pil(np.zeros((30, 40, 3), np.uint8)), "task": f"task {k}", "mask": mask, "task_id": k}
        for k, mask in enumerate([full, empty, empty])
    ]
    nothing = ["Nothing fits.", "No object fits."]
    batch = VLTPDataCollator(processor, [ANSWER], no_target_answers=nothing)(rows)
    answers = [
        processor.tokenizer.decode(ids[labels != -100], skip_special_tokens=True).strip()
        for ids, labels in zip(batch["input_ids"], batch["labels"])
    ]
    assert answers[0] == ANSWER and set(answers[1:]) <= set(nothing)
    lisa = VLTPDataCollator(processor, [ANSWER])(rows)
    assert ((lisa["input_ids"] == processor.seg_token_id).sum(-1) == 1).all()

    train_config = TrainConfig.from_dict(settings(Path("w"), "m", "o"), stage=1)
    assert (train_config.empty_targets, train_config.no_target_answers) == ("answer_nothing", list(NO_TARGET_ANSWERS))


@pytest.mark.parametrize("stage", [1, 2])
def test_the_trainers_loss_is_the_models_weighted_loss_with_every_part(tmp_path, stage):
    """The Trainer adds up the parts its stage names (weights from the model config): the model's own `loss`, IoU loss
    included, less the pruning loss in stage 1 (its prune decoder is frozen)."""
    model, processor = tiny_model_and_processor()
    images = [np.full((40, 60, 3), 90 * k, np.uint8) for k in range(2)]
    masks = [np.zeros((40, 60), np.uint8) for _ in range(2)]
    masks[0][5:30, 10:40] = masks[1][20:, :30] = 1
    batch = processor(images=images, tasks=["cut bread", "dig"], answers=ANSWER, masks=masks)
    if stage == 1:
        losses, outputs = STAGE1_LOSSES, model(**batch, prune_rates=[0.0])
    else:
        segmenter = VLTPSamModel(model.config)
        seg_embeds = torch.randn(2, model.config.vision_config.guidance_dim)
        losses = STAGE2_LOSSES
        outputs = segmenter(batch["sam_pixel_values"], seg_embeds, batch["masks"], batch["reshaped_input_sizes"])
    trainer = VLTPTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), **QUIET),
        losses=losses,
        input_names=(),
        prune_rates=[0.0],
    )
    expected = outputs.loss - (model.config.prune_loss_weight * outputs.prune_loss if stage == 1 else 0)
    assert outputs.iou_loss.item() > 0
    assert trainer.weighted_loss(outputs).item() == pytest.approx(expected.item(), rel=1e-6)


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def processor_config_vision():
    return tiny_config().vision_config


def test_gmacs_fall_with_the_rate():
    vision = processor_config_vision()
    half, most = (vision_gmacs(vision, [rate]) for rate in (0.5, 0.9))
    assert 0 < most < half


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_train_and_eval_from_a_yaml_config(world, base_model, stage1, tmp_path, capsys):
    # Paths in the YAML file are relative to it; 3e-3 is written as YAML reads it back (a string), as users write it.
    config = settings(world, os.path.relpath(base_model, tmp_path), "out")
    config["training"]["learning_rate"] = "3e-3"
    assert main(["train", "--stage", "1", "--config", str(write_yaml(tmp_path / "stage1.yaml", config))]) == 0
    printed = capsys.readouterr().out
    assert "vltp train: stage 1 done" in printed and "4 steps" in printed and f"model -> {tmp_path / 'out'}" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file() and (
        tmp_path / "out" / "processor_config.json"
    ).is_file()
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["global_step"] == 4

    status = main(
        [
            "eval",
            "--data",
            "rio",
            "--annotations",
            str(world),
            "--images",
            str(world),
            "--split",
            "common",
            "--model",
            str(stage1[0]),
            "--sweep-rates",
            "0,0.5",
            "--batch-size",
            "4",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and lines[0].startswith("RIO common: 6 samples") and lines[0].endswith("answers teacher-forced")
    assert lines[1].split() == ["Model", "pruning", "rate", "gIoU", "(%)", "cIoU", "(%)", "GMACs"]
    rows = [line.split() for line in lines[2:]]
    assert [row[1] for row in rows] == ["-", "0.5"]
    vision = VLTPForTaskSegmentation.config_class.from_pretrained(stage1[0]).vision_config
    assert [float(row[4]) for row in rows] == pytest.approx([vision_gmacs(vision, [r]) for r in (0.0, 0.5)], rel=1e-3)
    # Dense, the teacher-forced evaluation equals stage 1's own evaluation at the end of training.
    assert float(rows[0][2]) == pytest.approx(100 * stage1[1].eval_metrics["eval_gIoU"], abs=0.06)
    assert float(rows[0][3]) == pytest.approx(100 * stage1[1].eval_metrics["eval_cIoU"], abs=0.06)


def test_generated_answers_decide_whether_there_is_a_mask(world, base_model, capsys):
    """With [SEG] suppressed in generation, every answer says nothing: every mask is empty, so each empty target
    scores IoU 1 and each other target 0 (gIoU = the share of empty targets), and every empty target counts as
    answered nothing. Teacher forcing on the same model still predicts a mask for every sample."""
    model = VLTPForTaskSegmentation.from_pretrained(base_model)
    processor = VLTPProcessor.from_pretrained(base_model)
    dataset = load_rio(str(world), str(world), "common")
    empty = [not np.asarray(row["mask"]).any() for row in dataset]
    assert 0 < sum(empty) < len(empty)  # both kinds of target, so the credit shows
    model.llava.generation_config.suppress_tokens = [processor.seg_token_id]
    (generated,) = evaluate_rates(model, processor, dataset, [[0.5]], batch_size=4, answers="generated")
    assert generated["answers"] == "generated" and generated["nothing_on_empty"] == 1.0
    assert generated["gIoU"] == pytest.approx(sum(empty) / len(empty))
    (forced,) = evaluate_rates(model, processor, dataset, [[0.5]], batch_size=4)
    assert forced["answers"] == "teacher-forced" and "nothing_on_empty" not in forced
    with pytest.raises(ValueError, match="answers must be one of .*got 'forced'"):
        evaluate_rates(model, processor, dataset, [[0.5]], answers="forced")

    arguments = ["--data", "rio", "--annotations", str(world), "--images", str(world), "--split", "common"]
    status = main(["eval", *arguments, "--model", str(base_model), "--sweep-rates", "0.5", "--answers", "generated"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and lines[0].endswith("answers generated")
    assert lines[1].endswith("empty targets answered nothing (%)") and len(lines[2].split()) == 6


def test_score_spearman_ranks_each_masks_score_against_its_true_iou(world, base_model):
    """`score_spearman` against a reference built one sample at a time: `segment` on the sample alone, the IoU of its
    mask with the target (1 when both are empty), and Spearman's rho written out from its definition in
    test_metrics. Generation is biased to answer `[SEG]` first, so that every sample gets a mask and a score."""
    from test_metrics import _brute_force_spearman

    model = VLTPForTaskSegmentation.from_pretrained(base_model)
    processor = VLTPProcessor.from_pretrained(base_model)
    model.llava.generation_config.sequence_bias = {(processor.seg_token_id,): 100.0}
    dataset = load_rio(str(world), str(world), "common")
    scores, ious = [], []
    for row in dataset:
        (result,) = model.segment([row["image"].convert("RGB")], [row["task"]], processor, prune_rates=[0.5])
        target = np.asarray(row["mask"], dtype=bool)
        union = (result.mask.numpy() | target).sum()
        scores.append(result.score)
        ious.append((result.mask.numpy() & target).sum() / union if union else 1.0)
    (generated,) = evaluate_rates(model, processor, dataset, [[0.5]], batch_size=6, answers="generated")
    # Batching pads the prompts differently, which could move a score by float rounding; a swapped pair of ranks
    # would move rho by at least 1/35 on 6 samples, and none was seen.
    assert generated["score_spearman"] == pytest.approx(_brute_force_spearman(scores, ious), abs=1e-6)


def test_image_batches_hold_whole_images():
    assert image_batches([5, 5, 7, 7, 7, 9], 4) == [[0, 1], [2, 3, 4, 5]]
    assert image_batches([1, 1, 1, 1, 1, 2], 2) == [[0, 1], [2, 3], [4, 5]]  # an image over the size: its own batches
    assert image_batches(["b", "a", "b"], 8) == [[0, 2, 1]]  # an image's rows together, images by first row


def test_evaluation_runs_each_images_work_once_and_matches_one_row_at_a_time(world, base_model, monkeypatch):
    """Teacher-forced, SAM's ViT sees each image once per rate (its dense prefix is shared by the image's tasks) and
    the metrics equal those of batches of one row, which share nothing: the rows' LLaVA passes and the pruned stages
    are the same computations. Generated, `segment` gets each image once with all its tasks."""
    model = VLTPForTaskSegmentation.from_pretrained(base_model)
    processor = VLTPProcessor.from_pretrained(base_model)
    dataset = load_rio(str(world), str(world), "common")  # 2 images, 3 tasks each
    seen, encode = [], model.vision_model.forward
    monkeypatch.setattr(
        model.vision_model, "forward", lambda pixels, **kw: seen.append(len(pixels)) or encode(pixels, **kw)
    )
    shared = evaluate_rates(model, processor, dataset, [[0.0], [0.5]], batch_size=6)
    assert seen == [2, 2]
    seen.clear()
    alone = evaluate_rates(model, processor, dataset, [[0.0], [0.5]], batch_size=1)
    assert seen == [1] * 12
    # Batches of one row pad the prompts differently, which could move logits by float rounding; none was seen.
    for one, other in zip(shared, alone):
        assert one["gIoU"] == pytest.approx(other["gIoU"], abs=1e-6) and one["cIoU"] == pytest.approx(
            other["cIoU"], abs=1e-6
        )
        assert one["score_spearman"] == pytest.approx(other["score_spearman"], abs=1e-6)

    calls, segment = [], model.segment
    monkeypatch.setattr(
        model, "segment", lambda images, tasks, *a, **kw: calls.append(tasks) or segment(images, tasks, *a, **kw)
    )
    evaluate_rates(model, processor, dataset, [[0.5]], batch_size=4, answers="generated")
    tasks = list(dataset["task"])
    assert calls == [[tasks[0:3]], [tasks[3:6]]]


def _rio_without_masks(world: Path, target: Path) -> Path:
    records = json.loads((world / "RIO_train_all_thing.json").read_text())
    for record in records:
        del record["mask_list"]
    target.mkdir()
    (target / "RIO_train_all_thing.json").write_text(json.dumps(records))
    return target


def _rio_with_empty_masks(world: Path, target: Path) -> Path:
    records = json.loads((world / "RIO_train_all_thing.json").read_text())
    for record in records:
        record["mask_list"], record["bbox_list"] = [], []
    target.mkdir()
    (target / "RIO_train_all_thing.json").write_text(json.dumps(records))
    return target


def _rio_with_a_typed_token(world: Path, target: Path, token: str) -> Path:
    """The world's annotations with `token` typed into the task of training record 1."""
    target.mkdir()
    for path in world.glob("RIO_*.json"):
        records = json.loads(path.read_text())
        if path.name == "RIO_train_all_thing.json":
            records[1]["expressions"] = f"{records[1]['expressions']} {token}"
        (target / path.name).write_text(json.dumps(records))
    return target


def sam_checkpoint(target: Path) -> Path:
    """A saved plain `SamModel` (the conversion tests' tiny SAM)."""
    from test_conversion import tiny_sam_config
    from transformers import SamModel

    SamModel(tiny_sam_config()).save_pretrained(target)
    return target


BAD_INPUTS = {
    "missing config": (1, lambda c, t, w: None, "config file not found"),
    "missing model": (
        1,
        lambda c, t, w: c.update(model=str(t / "nowhere")),
        "field 'model': .*nowhere does not exist",
    ),
    "missing annotations": (
        1,
        lambda c, t, w: c["data"].update(annotations=str(t / "nowhere")),
        "field 'data.annotations': no such file",
    ),
    "missing images": (1, lambda c, t, w: c["data"].update(images=str(t)), "image file not found"),
    "annotations without masks": (
        1,
        lambda c, t, w: c["data"].update(annotations=str(_rio_without_masks(w, t / "ann"))),
        "field 'mask_list': missing",
    ),
    "only empty masks": (
        1,
        lambda c, t, w: c["data"].update(annotations=str(_rio_with_empty_masks(w, t / "ann"))),
        "no target masks",
    ),
    "image token typed in a task": (
        1,
        lambda c, t, w: c["data"].update(annotations=str(_rio_with_a_typed_token(w, t / "ann", "<image>"))),
        "field 'data': .*RIO_train_all_thing.json: record 1: task contains '<image>'",
    ),
    "end of sequence typed in an answer": (
        1,
        lambda c, t, w: c.update(answers=["Sure, [SEG].</s>"]),
        "field 'answers': answer .* contains '</s>'",
    ),
    "unknown field": (1, lambda c, t, w: c.update(learning_rate=1), "unknown field 'learning_rate'"),
    "unknown data field": (1, lambda c, t, w: c["data"].update(split="train"), "unknown field 'data.split'"),
    "wrong type": (1, lambda c, t, w: c["lora"].update(r="eight"), "field 'lora.r': expected <class 'int'>"),
    "unknown training argument": (1, lambda c, t, w: c["training"].update(lr=1), "field 'training.lr': not a field"),
    "unknown empty_targets": (
        1,
        lambda c, t, w: c.update(empty_targets="reject"),
        "field 'empty_targets': expected one of \\('answer_nothing', 'seg'\\), got 'reject'",
    ),
    "a no-target answer with [SEG]": (
        1,
        lambda c, t, w: c.update(no_target_answers=["None.", "It is [SEG]."]),
        "field 'no_target_answers': need at least one non-empty answer, none holding \\[SEG\\]",
    ),
    "rates in stage 1": (1, lambda c, t, w: c.update(prune_rates=[0.5]), "field 'prune_rates': stage 1 trains"),
    "temperature in stage 1": (
        1,
        lambda c, t, w: c.update(prune_temperature=3.0),
        "field 'prune_temperature': stage 1 trains the dense model",
    ),
    "temperature 0": (
        2,
        lambda c, t, w: c.update(prune_temperature=0),
        "field 'prune_temperature': prune_temperature must be a finite number > 0, got 0",
    ),
    "resume without checkpoint": (
        1,
        lambda c, t, w: c.update(resume_from_checkpoint=True),
        "no checkpoint-\\* folder",
    ),
    "rate out of range": (
        2,
        lambda c, t, w: c.update(prune_rates=[1.2]),
        r"field 'prune_rates': prune_rates must each be in \[0, 1\)",
    ),
    "too many rates": (2, lambda c, t, w: c.update(prune_rates=[0.5, 0.5]), "one rate per pruning stage"),
    "stage 2 without stage-1 checkpoint": (2, lambda c, t, w: c.update(model=str(t)), "is not a stage-1 checkpoint"),
    "stage 2 without SEG cache": (2, lambda c, t, w: c.pop("seg_cache"), "field 'seg_cache': missing"),
    "max_steps as a string": (
        1,
        lambda c, t, w: c["training"].update(max_steps="1"),
        "'training.max_steps': expected an integer",
    ),
    "max_steps 0": (1, lambda c, t, w: c["training"].update(max_steps=0), "'training.max_steps': must be at least 1"),
    "max_steps -5": (
        1,
        lambda c, t, w: c["training"].update(max_steps=-5),
        "'training.max_steps': must be at least 1",
    ),
    "negative learning rate": (
        1,
        lambda c, t, w: c["training"].update(learning_rate=-1),
        "'training.learning_rate': must be positive",
    ),
    "NaN learning rate": (
        1,
        lambda c, t, w: c["training"].update(learning_rate=float("nan")),
        "'training.learning_rate': expected a finite number",
    ),
    "batch size 0": (
        1,
        lambda c, t, w: c["training"].update(per_device_train_batch_size=0),
        "'training.per_device_train_batch_size': must be at least 1",
    ),
    "evaluation without an evaluation split": (
        1,
        lambda c, t, w: c["data"].pop("eval_split") and c["training"].update(eval_strategy="steps"),
        "'training.eval_strategy': needs an evaluation split",
    ),
    "unknown LoRA target": (
        1,
        lambda c, t, w: c["lora"].update(target_modules=["nonexistent_proj"]),
        "'lora.target_modules': no linear layer 'nonexistent_proj' in the language model .*q_proj",
    ),
    "reporting to a tool that is not installed": (
        1,
        lambda c, t, w: c["training"].update(report_to="wandb"),
        "'training.report_to': wandb is not installed",
    ),
    "output_dir is a file": (
        1,
        lambda c, t, w: (t / "file").write_text("x") and c.update(output_dir=str(t / "file")),
        "'output_dir': .*file is a file, not a folder",
    ),
    "a plain SAM checkpoint as model": (
        1,
        lambda c, t, w: c.update(model=str(sam_checkpoint(t / "sam"))),
        "'model': .*sam holds a 'sam' model, not a VLTP checkpoint",
    ),
    "stage 2 with a folder that is no SEG cache": (
        2,
        lambda c, t, w: (t / "junk").mkdir() or c.update(seg_cache=str(t / "junk")),
        "is not a \\[SEG\\] cache",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_before_anything_is_written(world, stage1, tmp_path, capsys, case):
    stage, edit, message = BAD_INPUTS[case]
    output = tmp_path / "out"
    if stage == 1:
        config = settings(world, stage1[0], output)
    else:
        config = stage2_settings(world, stage1[0], output, tmp_path / "cache")
    edit(config, tmp_path, world)
    path = tmp_path / "config.yaml"
    if case != "missing config":
        write_yaml(path, config)
    assert main(["train", "--stage", str(stage), "--config", str(path)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]  # (progress bars aside)
    assert len(errors) == 1 and errors[0].startswith("vltp: error: ") and re.search(message, errors[0]), captured.err
    assert not output.exists() and not (tmp_path / "cache").exists()


def test_two_processes_save_what_one_process_saves(world, base_model, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), batch 1 each, against 1 process with batch 2: same data order,
    no dropout, one answer for every row, empty targets too (so that the LM loss averages the same tokens)."""

    def run(name, processes):
        config = settings(
            world,
            base_model,
            tmp_path / name,
            empty_targets="seg",
            training={
                "per_device_train_batch_size": 2 // processes,
                "save_strategy": "steps",
                "save_steps": 4,
            },
        )
        path = write_yaml(tmp_path / f"{name}.yaml", config)
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        command = [*launcher, "-m"] if processes > 1 else [sys.executable, "-m"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(
            [*command, "modeling_vltp.cli", "train", "--stage", "1", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    printed = run("ddp", 2)
    assert "on 2 processes: 4 steps" in printed and "evaluation at rates [0.0]" in printed
    run("single", 1)
    state = json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(8 / 12)  # 4 steps of 2 samples out of 12: both processes trained
    torch.testing.assert_close(weights(tmp_path / "ddp"), weights(tmp_path / "single"), rtol=1e-5, atol=1e-6)
