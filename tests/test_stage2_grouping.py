"""Stage 2's training batches grouped by image (issue 10): the batch sampler, the collator sending each image once,
the exactness of a grouped batch against the same rows ungrouped, and a real `train_stage2` run whose ViT prefix runs
once per image and batch."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.data_loader import prepare_data_loader
from datasets import load_from_disk
from PIL import Image
from transformers import TrainerCallback

from modeling_vltp import VLTPSamModel
from modeling_vltp.cli import main
from modeling_vltp.data import VLTPDataCollator, synthetic
from modeling_vltp.data.collator import SEG_CACHE_COLUMN
from modeling_vltp.testing import tiny_model_and_processor
from modeling_vltp.training import (
    ImageBatchSampler,
    TrainConfig,
    TrainingInputError,
    _check_grouping,
    image_batches,
    load_seg_cache,
    train,
    training_arguments,
    with_targets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "logging_steps": 1000}


def image_ids_of(rows_per_image: list[int], seed: int = 0) -> list[int]:
    """One image id per row, image i having `rows_per_image[i]` rows, the rows shuffled as a dataset may hold them."""
    ids = [image for image, count in enumerate(rows_per_image) for _ in range(count)]
    return [ids[index] for index in np.random.default_rng(seed).permutation(len(ids))]


def assert_whole_images_once(batches: list[list[int]], image_ids: list[int], batch_size: int):
    """Every row exactly once, batches within the size, and each image in as few batches as its rows need: one, or
    ceil(rows / batch_size) for an image with more rows than a batch holds."""
    assert sorted(row for batch in batches for row in batch) == list(range(len(image_ids)))
    assert all(0 < len(batch) <= batch_size for batch in batches)
    batches_of = Counter(image for batch in batches for image in {image_ids[row] for row in batch})
    for image, rows in Counter(image_ids).items():
        assert batches_of[image] == -(-rows // batch_size), (image, rows, batches)


# --------------------------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 200])
def test_sampler_keeps_each_images_rows_together_and_gives_every_row_once_per_epoch(batch_size):
    rows_per_image = [int(n) for n in np.random.default_rng(1).integers(1, 7, size=30)]  # 1 to 6 tasks an image
    image_ids = image_ids_of(rows_per_image)
    sampler = ImageBatchSampler(image_ids, batch_size, seed=3)
    assert sampler.batch_size is None  # accelerate's BatchSamplerShard then takes batches of any size
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # the same number of batches every epoch, as the Trainer counted
        assert_whole_images_once(batches, image_ids, batch_size)
    if batch_size == 1:
        assert len(sampler) == len(image_ids)
    if batch_size == 200:  # every image fits in one batch
        assert len(sampler) == 1


def test_sampler_order_is_reproducible_and_changes_with_epoch_and_seed():
    image_ids = image_ids_of([3] * 10 + [2] * 10 + [1] * 5)

    def order(seed, epoch):
        sampler = ImageBatchSampler(image_ids, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    epochs = [order(7, epoch) for epoch in range(3)]
    assert epochs == [order(7, epoch) for epoch in range(3)]  # a new sampler with the seed: the same batches
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert order(8, 0) != epochs[0]
    # the images of each batch change too, not only the order of the batches
    assert {frozenset(batch) for batch in epochs[0]} != {frozenset(batch) for batch in epochs[1]}


def test_sampler_refuses_rows_without_image_id_and_batch_size_0():
    with pytest.raises(ValueError, match=r"2 of 4 rows have no image_id \(the first: row 1\)"):
        ImageBatchSampler([5, None, 5, None], 2)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        ImageBatchSampler([5, 5], 0)


def test_image_batches_follow_a_given_order_of_images():
    assert image_batches([5, 5, 7, 7, 7, 9], 4, order=[9, 7, 5]) == [[5, 2, 3, 4], [0, 1]]
    assert image_batches([5, 5, 7, 7, 7, 9], 2, order=[7, 9, 5]) == [[2, 3], [4, 5], [0, 1]]
    with pytest.raises(ValueError, match="order must name each of the 3 images once, got 2 entries"):
        image_batches([5, 5, 7, 7, 7, 9], 4, order=[9, 7])
    with pytest.raises(ValueError, match="order must name each of the 3 images once, got 3 entries"):
        image_batches([5, 5, 7, 7, 7, 9], 4, order=[9, 7, 7])


@pytest.mark.parametrize("num_processes", [2, 3])
def test_accelerate_shards_the_batches_whole_to_each_process(num_processes):
    """accelerate's own `prepare_data_loader`, as the Trainer calls it under data parallelism, for each process: every
    process gets whole batches of the sampler, dealt in turn (process r takes batch i when i mod n is r), and the
    processes together see every row; an epoch whose batches do not divide evenly repeats its first ones."""
    image_ids = image_ids_of([3, 1, 2, 5, 1, 4, 2, 2, 3])
    sampler = ImageBatchSampler(image_ids, 4, seed=0)
    loader = torch.utils.data.DataLoader(list(range(len(image_ids))), batch_sampler=sampler, collate_fn=list)
    shards = [
        prepare_data_loader(loader, num_processes=num_processes, process_index=rank, put_on_device=False)
        for rank in range(num_processes)
    ]
    for epoch in range(2):
        sampler.set_epoch(epoch)  # what `VLTPTrainer` does before each epoch
        batches = sampler.batches(epoch)
        seen = [list(shard) for shard in shards]
        steps = -(-len(batches) // num_processes)
        assert [len(batches_of_rank) for batches_of_rank in seen] == [steps] * num_processes
        dealt = [seen[index % num_processes][index // num_processes] for index in range(steps * num_processes)]
        assert dealt[: len(batches)] == batches
        assert dealt[len(batches) :] == batches[: len(dealt) - len(batches)]
        assert_whole_images_once(dealt[: len(batches)], image_ids, 4)


# --------------------------------------------------------------------------------------------------------------------
# The collator and the exactness of a grouped batch
# --------------------------------------------------------------------------------------------------------------------


def cache_rows(guidance_dim: int) -> list[dict]:
    """Rows as a `[SEG]` cache holds them: 3 images of different sizes with 3, 1 and 2 tasks, a target rectangle and a
    random `[SEG]` embedding per task."""
    rng = np.random.default_rng(0)
    sizes = [(100, 140), (120, 80), (90, 90)]
    images = [Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")) for size in sizes]
    rows = []
    for image_id, count in ((11, 3), (12, 1), (13, 2)):
        size = sizes[image_id - 11]
        for task in range(count):
            mask = np.zeros(size, dtype=np.uint8)
            top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
            mask[top : top + size[0] // 3, left : left + size[1] // 3] = 1
            rows.append(
                {
                    "image": images[image_id - 11],
                    "task": f"you can use the thing to do task {task}",
                    "mask": mask,
                    "image_id": image_id,
                    "task_id": task,
                    SEG_CACHE_COLUMN: rng.standard_normal(guidance_dim).astype(np.float32),
                }
            )
    return rows


@pytest.fixture(scope="module")
def segmenter_and_processor(tmp_path_factory):
    """The tiny system's SAM side, with what stage 2 trains (prune decoder and mask decoder) requiring gradients."""
    model, processor = tiny_model_and_processor(seed=0)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    segmenter = VLTPSamModel.from_pretrained(folder).train()
    segmenter.requires_grad_(False)
    segmenter.vision_model.prune_decoder.requires_grad_(True)
    segmenter.mask_decoder.requires_grad_(True)
    return segmenter, processor


def test_the_collator_sends_each_image_once_only_when_grouping(segmenter_and_processor):
    segmenter, processor = segmenter_and_processor
    rows = cache_rows(segmenter.config.vision_config.guidance_dim)
    plain = VLTPDataCollator(processor)(rows)
    grouped = VLTPDataCollator(processor, group_by_image=True)(rows)
    assert "image_indices" not in plain and plain["sam_pixel_values"].shape[0] == 6
    assert grouped["image_indices"].tolist() == [0, 0, 0, 1, 2, 2]
    for name in ("sam_pixel_values", "original_sizes", "reshaped_input_sizes"):  # per image: its first row's
        assert torch.equal(grouped[name], plain[name][[0, 3, 4]]), name
    for name in ("masks", "seg_embeds", "input_ids", "pixel_values"):  # per task, unchanged
        assert torch.equal(grouped[name], plain[name]), name
    # One row per image: nothing to share, the batch is the ungrouped one.
    singles = [rows[0], rows[3], rows[4]]
    alone = VLTPDataCollator(processor, group_by_image=True)(singles)
    assert "image_indices" not in alone and alone.keys() == VLTPDataCollator(processor)(singles).keys()
    rows[4] = {**rows[4], "image_id": None}
    with pytest.raises(ValueError, match=r"rows \[4\] of this batch have none .* group_by_image: false"):
        VLTPDataCollator(processor, group_by_image=True)(rows)


# Tolerance of the grouped batch against the same rows ungrouped. Both run the same operations on the same values: the
# ViT's dense prefix on 3 images instead of 6 rows (a repeated image's prefix is computed once and copied, where the
# reference computes it again), then identical per-task work. Only float32 rounding can differ, where a kernel picks
# another reduction order for another batch size (a few ulps per operation, ~1e-7 relative); a near-tie of token
# scores flipping the hard top-K selection would change a mask wholesale and fail the test, so none may occur here.
# Measured on the development CPU: bit-equal (the same kernels ran). A wrong pairing of rows and images moves the
# loss by 9e-4 relative (other images' sizes) to 4e-2 (other images' pixels) and the gradients by more than their
# largest magnitude; 1e-5 and 1e-4 leave two orders of magnitude for other CPUs' kernels and still catch those.
LOSS_RTOL = 1e-5
GRAD_TOLERANCE = 1e-4


def test_a_grouped_batch_gives_the_loss_and_gradients_of_the_same_rows_ungrouped(segmenter_and_processor):
    segmenter, processor = segmenter_and_processor
    rows = cache_rows(segmenter.config.vision_config.guidance_dim)
    inputs = ("sam_pixel_values", "seg_embeds", "masks", "reshaped_input_sizes", "image_indices")

    def loss_and_gradients(batch):
        segmenter.zero_grad()
        output = segmenter(**{name: batch[name] for name in inputs if name in batch}, prune_rates=[0.5])
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in segmenter.named_parameters() if p.grad is not None}
        parts = {name: getattr(output, name).item() for name in ("mask_bce_loss", "mask_dice_loss", "prune_loss")}
        return output.loss.item(), parts, gradients

    seen, hook = (
        [],
        segmenter.vision_model.vision_encoder.layers[0].register_forward_hook(
            lambda module, args, output: seen.append(args[0].shape[0])
        ),
    )
    try:
        grouped = loss_and_gradients(VLTPDataCollator(processor, group_by_image=True)(rows))
        ungrouped = loss_and_gradients(VLTPDataCollator(processor)(rows))
    finally:
        hook.remove()
    assert seen == [3, 6]  # the ViT's prefix: once per image grouped, once per row ungrouped
    assert grouped[0] == pytest.approx(ungrouped[0], rel=LOSS_RTOL)
    assert grouped[1] == pytest.approx(ungrouped[1], rel=LOSS_RTOL)
    assert grouped[2].keys() == ungrouped[2].keys()
    assert any(name.startswith("vision_model.prune_decoder.") for name in grouped[2])
    # Each parameter's gradient against its own largest value, but at least 1e-3 of the largest of all: the bias of an
    # attention's key projection has a zero gradient in exact arithmetic (softmax ignores a constant added to every
    # score), so what both passes give there is float32 rounding (5e-10 seen with MKL_CBWR=AVX2).
    largest = max(gradient.abs().max() for gradient in ungrouped[2].values())
    for name, expected in ungrouped[2].items():
        scale = torch.maximum(expected.abs().max(), 1e-3 * largest)
        assert (grouped[2][name] - expected).abs().max() <= GRAD_TOLERANCE * scale, name


# --------------------------------------------------------------------------------------------------------------------
# A real stage-2 run
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_and_model(tmp_path_factory) -> tuple[Path, Path]:
    """4 images of the synthetic world with 3 tasks each (the run keeps 10 rows: tasks 3, 3, 3 and 1), the tiny
    system saved."""
    root = tmp_path_factory.mktemp("grouping")
    synthetic.generate(root / "world", num_images=4, seed=0, image_size=64, format="rio", split="train")
    model, processor = tiny_model_and_processor(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "world", root / "model"


def stage2_config(world: Path, model: Path, output: Path, cache: Path, **overrides) -> dict:
    training = {
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        **QUIET,
        **overrides.pop("training", {}),
    }
    return {
        "model": str(model),
        "output_dir": str(output),
        "seg_cache": str(cache),
        "prune_rates": [0.5],
        "data": {"format": "rio", "annotations": str(world), "images": str(world), "max_train_samples": 10},
        "training": training,
        **overrides,
    }


class CountViTRows(TrainerCallback):
    """Records, for each training forward, the rows the ViT's first layer sees (its dense prefix: one per image) and
    the rows of the first pruned layer (one per task), with hooks on the trained model's own modules."""

    def __init__(self):
        self.prefix, self.pruned, self.hooks = [], [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        vision = model.vision_model
        for layer, calls in ((0, self.prefix), (vision.config.prune_layers[0], self.pruned)):
            hook = vision.vision_encoder.layers[layer].register_forward_hook(
                lambda module, inputs, output, calls=calls: calls.append(inputs[0].shape[0])
            )
            self.hooks.append(hook)

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()


@pytest.fixture(scope="module")
def grouped_run(world_and_model, tmp_path_factory):
    """6 steps of batch 4 (three epochs of 2 batches), grouping on (the default); builds the [SEG] cache."""
    world, model = world_and_model
    root = tmp_path_factory.mktemp("run")
    counts = CountViTRows()
    summary = train(
        TrainConfig.from_dict(stage2_config(world, model, root / "out", root / "cache"), stage=2), [counts]
    )
    return root, counts, summary


def test_stage2_runs_the_vit_prefix_once_per_image_of_each_batch(grouped_run):
    root, counts, summary = grouped_run
    assert summary.global_step == 6
    cache = load_seg_cache(root / "cache")["train"]
    assert sorted(Counter(cache.with_format(None)["image_id"]).values()) == [1, 3, 3, 3]
    # Stage 2 trains on the rows with a target (the others are answered without [SEG]): here 3 images, 5 tasks.
    image_ids = list(with_targets(cache).with_format(None)["image_id"])
    assert len(image_ids) == 5 and len(set(image_ids)) == 3
    sampler = ImageBatchSampler(image_ids, 4, seed=42)  # the Trainer's default seed
    batches = sampler.batches(0) + sampler.batches(1) + sampler.batches(2)  # 2 batches an epoch
    assert len(batches) == 6 and batches[:2] != batches[2:4]
    assert counts.pruned == [len(batch) for batch in batches]  # the tasks of each batch, in the sampler's order
    assert counts.prefix == [len({image_ids[row] for row in batch}) for batch in batches]


def test_stage2_trains_empty_targets_only_when_they_are_answered_with_seg(world_and_model, grouped_run, tmp_path):
    """`empty_targets: seg` (LISA's always-[SEG]) keeps every cached row, the empty targets too: one epoch of the
    10 rows fills a batch of 10 (5 rows would fill it only halfway); the default run above saw only the 5 rows with a
    target."""
    world, model = world_and_model
    config = stage2_config(
        world, model, tmp_path / "out", grouped_run[0] / "cache", group_by_image=False, empty_targets="seg"
    )
    config["training"].update(max_steps=1, per_device_train_batch_size=10)
    counts = CountViTRows()
    train(TrainConfig.from_dict(config, stage=2), [counts])
    assert counts.pruned == [10]
    assert sum(grouped_run[1].pruned) == 3 * 5  # three epochs of the 5 rows with a target


def test_grouping_refuses_a_cache_without_image_ids_and_can_be_turned_off(
    world_and_model, grouped_run, tmp_path, capsys
):
    world, model = world_and_model
    cache = tmp_path / "cache"
    load_from_disk(str(grouped_run[0] / "cache")).remove_columns("image_id").save_to_disk(str(cache))
    shutil.copy(grouped_run[0] / "cache" / "vltp_seg_cache.json", cache)
    config = stage2_config(world, model, tmp_path / "out", cache, training={"max_steps": 1})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--stage", "2", "--config", str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"field 'group_by_image': .*cache, split train: 10 of 10 rows have no image_id", error), error
    assert "set group_by_image: false to train without grouping" in error
    assert not (tmp_path / "out").exists()

    counts = CountViTRows()
    summary = train(TrainConfig.from_dict({**config, "group_by_image": False}, stage=2), [counts])
    assert summary.global_step == 1
    assert counts.prefix == counts.pruned == [4]  # ungrouped: the prefix once per row
    record = json.loads((tmp_path / "out" / "vltp_run.json").read_text())
    assert record["settings"]["group_by_image"] is False


def test_grouping_refuses_one_process_driving_several_gpus(world_and_model, tmp_path):
    """Without a launcher on a machine with several GPUs the Trainer wraps the model in `torch.nn.DataParallel`, which
    would scatter a grouped batch's images and rows apart; the check sees the Trainer's GPU count."""
    world, model = world_and_model
    config = TrainConfig.from_dict(stage2_config(world, model, tmp_path / "out", tmp_path / "cache"), stage=2)
    args = training_arguments(config)
    _check_grouping(config, args)  # one CPU process: fine
    args._n_gpu = 2  # what `TrainingArguments` counts on a machine with 2 GPUs and no launcher
    with pytest.raises(TrainingInputError, match=r"field 'group_by_image': one process would drive 2 GPUs .*"):
        _check_grouping(config, args)
    config.group_by_image = False
    _check_grouping(config, args)
