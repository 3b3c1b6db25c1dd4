"""Offloaded inference: the demo model (trained on the synthetic world, so it answers with `[SEG]` and SAM runs)
loaded with parts on the CPU and parts offloaded to disk, through accelerate's hooks, segments as the plain model."""

import pytest
import torch

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.cli import DEMO_MODEL_DIR
from modeling_vltp.data import load_rio, synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """2 images of the synthetic world, 3 tasks each that the plain demo model answers with `[SEG]` (it answers
    "nothing fits" to others, and SAM does not run for those), and the plain demo model with its processor."""
    root = tmp_path_factory.mktemp("offload")
    num_tasks = len(synthetic.TASKS)
    synthetic.generate(
        root, num_images=2, seed=3, image_size=64, format="rio", split="common", tasks_per_image=num_tasks
    )
    rows = load_rio(str(root), str(root), "common")
    images = [rows[i]["image"].convert("RGB") for i in (0, num_tasks)]
    model = VLTPForTaskSegmentation.from_pretrained(DEMO_MODEL_DIR).eval()
    processor = VLTPProcessor.from_pretrained(DEMO_MODEL_DIR)
    tasks = []
    for image, first in zip(images, (0, num_tasks)):
        candidates = list(rows["task"][first : first + num_tasks])
        answers = model.segment(image, candidates, processor)
        tasks.append([task for task, answer in zip(candidates, answers) if answer.seg_found][:3])
    assert [len(image_tasks) for image_tasks in tasks] == [3, 3]
    return images, tasks, model, processor


@pytest.fixture(scope="module")
def float32_at_half(inputs):
    """The plain float32 demo model's segmentation of the fixture's tasks at rate 0.5."""
    images, tasks, model, processor = inputs
    return model.segment(images, tasks, processor, prune_rates=[0.5])


@pytest.fixture(scope="module")
def bf16_at_half(inputs):
    """The same from the plain demo model loaded in bf16."""
    images, tasks, _, processor = inputs
    model = VLTPForTaskSegmentation.from_pretrained(DEMO_MODEL_DIR, dtype=torch.bfloat16).eval()
    return model.segment(images, tasks, processor, prune_rates=[0.5])


# Offloaded to disk: LLaVA's language model and SAM's ViT and prompt encoder (the mask decoder in its own test).
ON_DISK = ("llava.model.language_model", "llava.lm_head", "text_hidden_fcs", "vision_model", "prompt_encoder")
ON_CPU = ("llava.model.vision_tower", "llava.model.multi_modal_projector", "shared_image_embedding", "mask_decoder")


def offloaded(folder, dtype=torch.float32, on_disk=ON_DISK, on_cpu=ON_CPU):
    """The demo model with `on_disk` offloaded to disk (loaded by accelerate's hooks for each forward)."""
    device_map = {**dict.fromkeys(on_disk, "disk"), **dict.fromkeys(on_cpu, "cpu")}
    model = VLTPForTaskSegmentation.from_pretrained(
        DEMO_MODEL_DIR, device_map=device_map, max_memory={"cpu": "1GiB"}, offload_folder=str(folder), dtype=dtype
    )
    assert model.llava.lm_head.weight.device.type == "meta"  # offloaded, loaded only inside its forward
    return model.eval()


def pixels_equal(results, expected) -> float:
    masks = torch.cat([r.mask.flatten() for r in results])
    return (masks == torch.cat([e.mask.flatten() for e in expected])).float().mean().item()


def assert_same_segmentation(results, expected, score_tolerance=1e-5):
    """Same texts, at least 99.9% of mask pixels equal and scores within `score_tolerance` (see below)."""
    assert [r.text for r in results] == [e.text for e in expected]
    assert pixels_equal(results, expected) >= 0.999
    torch.testing.assert_close(
        torch.tensor([r.score for r in results]),
        torch.tensor([e.score for e in expected]),
        rtol=0,
        atol=score_tolerance,
    )


@pytest.mark.parametrize("rates", [[0.0], [0.5]])
def test_offloaded_segment_gives_the_plain_models_masks(inputs, tmp_path, rates):
    """Same weights and the same computations in the same order (accelerate's hooks only load each part before its
    forward): measured, every pixel and every score equal. The test allows what float rounding could change on
    another CPU: 0.1% of pixels (logits on the threshold) and 1e-5 on scores (about 1e-7 relative, a few float32
    ulps of a score in (0, 1])."""
    images, tasks, model, processor = inputs
    expected = model.segment(images, tasks, processor, prune_rates=rates)
    assert all(e.seg_found for e in expected)  # SAM ran for every task
    assert_same_segmentation(
        offloaded(tmp_path / "offload").segment(images, tasks, processor, prune_rates=rates), expected
    )


def test_offloaded_bf16_segment_gives_the_plain_bf16_models_masks(inputs, bf16_at_half, tmp_path):
    """Offloading in bf16 runs the plain bf16 model's computations: measured, every pixel and score equal. The test
    allows what rounding could change on another CPU, as the first test does, with 2 bf16 ulps on scores (2^-7: bf16
    keeps 8 bits of mantissa). Offloaded parts run in float32 would fail it (next test: bf16 and float32 differ on
    1.4% of the pixels)."""
    images, tasks, _, processor = inputs
    results = offloaded(tmp_path / "offload", torch.bfloat16).segment(images, tasks, processor, prune_rates=[0.5])
    assert all(r.seg_found for r in results)
    assert_same_segmentation(results, bf16_at_half, score_tolerance=2**-7)


def test_bf16_segment_agrees_with_float32(bf16_at_half, float32_at_half):
    """bf16 rounds the mask logits, and on the demo's less sure tasks it moves a small mask to another object: measured
    98.6% of pixels equal and an IoU of 0.73 between the bf16 and the float32 masks of the 6 tasks together (per
    task 0.87, 0.57, 0.94, 0.03, 0.92, 0.04), alike under MKL_CBWR=COMPATIBLE, AVX2 and one thread. A pixel share says
    little where masks cover 5% of the image (empty masks would score 95%), so the test bounds the IoU: at least 0.4,
    where a broken bf16 path (empty masks: 0; every mask on another object: about 0.04) falls far below."""
    assert all(r.seg_found for r in bf16_at_half)
    bf16_masks = torch.cat([r.mask.flatten() for r in bf16_at_half])
    float32_masks = torch.cat([e.mask.flatten() for e in float32_at_half])
    assert (bf16_masks & float32_masks).sum() / (bf16_masks | float32_masks).sum() >= 0.4


def test_an_offloaded_mask_decoder_gives_the_plain_models_masks(inputs, float32_at_half, tmp_path):
    """transformers' `SamMaskDecoder.forward` reads `iou_token.weight` and `mask_tokens.weight` without calling those
    modules; `decode_masks` loads the offloaded decoder's weights for its whole forward and offloads them again after
    it. Same computations as the plain model: measured, every pixel and score equal; the tolerances of the first
    test."""
    images, tasks, _, processor = inputs
    on_cpu = tuple(name for name in ON_CPU if name != "mask_decoder")
    offloaded_model = offloaded(tmp_path / "offload", on_disk=(*ON_DISK, "mask_decoder"), on_cpu=on_cpu)
    results = offloaded_model.segment(images, tasks, processor, prune_rates=[0.5])
    assert_same_segmentation(results, float32_at_half)
    assert offloaded_model.mask_decoder.iou_token.weight.device.type == "meta"  # offloaded again


def test_device_map_auto_with_a_small_max_memory_gives_the_plain_models_masks(inputs, float32_at_half, tmp_path):
    """The path users take: `device_map="auto"` fills the CPU's 1 MB (of the demo model's 1.9 MB) in module order,
    so SAM's last ViT layers, the prune decoder, the prompt encoder and the mask decoder go to disk. Same
    computations as the plain model: measured, every pixel and score equal; the tolerances of the first test."""
    images, tasks, _, processor = inputs
    auto = VLTPForTaskSegmentation.from_pretrained(
        DEMO_MODEL_DIR, device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert auto.hf_device_map["mask_decoder"] == "disk"
    assert auto.hf_device_map["vision_model.prune_decoder"] == "disk"
    assert_same_segmentation(auto.segment(images, tasks, processor, prune_rates=[0.5]), float32_at_half)
