"""Tests of VLTPProcessor and the tiny offline tokenizer/processor."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_vltp import processing_vltp
from modeling_vltp.processing_vltp import (
    DEFAULT_ANSWER,
    IMAGE_TOKEN,
    SEG_TOKEN,
    VLTPProcessor,
    add_vltp_special_tokens,
    resize_embeddings_for_tokenizer,
)
from modeling_vltp.testing import tiny_processor, tiny_tokenizer

SAM_SIZE = 128
NUM_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(sam_image_size=SAM_SIZE, clip_image_size=32, clip_patch_size=8)


def random_image(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rectangle_mask(height, width, top, bottom, left, right):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def sam_resized_size(height, width):
    """SAM's rule, written out: the longest side becomes SAM_SIZE, the other one is scaled and rounded."""
    scale = SAM_SIZE / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny tokenizer


def test_tiny_tokenizer_is_small_deterministic_and_complete():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= 512
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert IMAGE_TOKEN in tokenizer.all_special_tokens

    text = "Zebra ünïcode 😀 {braces} [SEG] <image>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(SEG_TOKEN) in ids
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in ids
    # LLaMA-style: every text starts with <s>.
    assert tokenizer("dig hole")["input_ids"][0] == tokenizer.bos_token_id
    # <image> is special, [SEG] is not: a decoded answer keeps it.
    assert tokenizer.decode(tokenizer(f"{IMAGE_TOKEN} Sure, [SEG].</s>")["input_ids"], skip_special_tokens=True) == (
        " Sure, [SEG]."
    )


def test_add_vltp_special_tokens_is_idempotent(processor):
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    ids = add_vltp_special_tokens(tokenizer)
    assert len(tokenizer) == size
    assert ids == {"image_token_id": processor.image_token_id, "seg_token_id": processor.seg_token_id}
    assert tokenizer.convert_ids_to_tokens([ids["image_token_id"], ids["seg_token_id"]]) == [IMAGE_TOKEN, SEG_TOKEN]


def test_resize_embeddings_for_tokenizer():
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    assert resize_embeddings_for_tokenizer(model, tokenizer) == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def test_inference_inputs(processor):
    images = [random_image(60, 90), random_image(100, 40, seed=1)]
    tasks = ["you can use the thing to open parcel", "pour sugar"]
    inputs = processor(images, tasks)

    assert set(inputs) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "sam_pixel_values",
        "original_sizes",
        "reshaped_input_sizes",
    }
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs["sam_pixel_values"].shape == (2, 3, SAM_SIZE, SAM_SIZE)
    assert inputs["original_sizes"].tolist() == [[60, 90], [100, 40]]
    assert [tuple(size) for size in inputs["reshaped_input_sizes"].tolist()] == [
        sam_resized_size(60, 90),
        sam_resized_size(100, 40),
    ]
    # SAM pads bottom and right with zeros after normalising.
    height, width = sam_resized_size(60, 90)
    assert inputs["sam_pixel_values"][0, :, height:].abs().sum() == 0
    assert inputs["sam_pixel_values"][0, :, :height, :width].abs().sum() > 0

    for row, task in enumerate(tasks):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row] == 1]
        image_positions = (ids == processor.image_token_id).nonzero().flatten()
        assert len(image_positions) == NUM_IMAGE_TOKENS
        assert (image_positions.diff() == 1).all()
        expected = f"<s>USER: {IMAGE_TOKEN * NUM_IMAGE_TOKENS}\n{task} Please output segmentation mask. ASSISTANT:"
        assert processor.decode(ids) == expected


def test_single_image_and_task(processor):
    inputs = processor(random_image(30, 30), "dig hole", answers=DEFAULT_ANSWER)
    assert inputs["input_ids"].shape[0] == inputs["labels"].shape[0] == inputs["sam_pixel_values"].shape[0] == 1


def test_labels_only_on_answer(processor):
    images = [random_image(40, 50), random_image(50, 40, seed=1)]
    tasks = ["extinguish fire", "you can use the thing to get potatoes out of fire"]
    answers = ["It is [SEG].", DEFAULT_ANSWER]
    prompts = processor(images, tasks)
    inputs = processor(images, tasks, answers=answers)
    labels, input_ids, attention_mask = inputs["labels"], inputs["input_ids"], inputs["attention_mask"]

    for row, answer in enumerate(answers):
        trained = labels[row] != -100
        assert processor.decode(labels[row][trained]) == f" {answer}</s>"
        assert (labels[row][trained] == input_ids[row][trained]).all()
        # The answer is one run of tokens ending with </s>, the last real token of the row.
        positions = trained.nonzero().flatten()
        assert (positions.diff() == 1).all()
        assert positions[-1] == attention_mask[row].sum() - 1
        assert labels[row][positions[-1]] == processor.tokenizer.eos_token_id
        assert processor.seg_token_id in labels[row]
        # Everything before the answer is the inference prompt, token for token.
        prompt_ids = prompts["input_ids"][row][prompts["attention_mask"][row] == 1]
        assert positions[0] == len(prompt_ids)
        assert (input_ids[row][: len(prompt_ids)] == prompt_ids).all()

    assert (labels[input_ids == processor.image_token_id] == -100).all()
    assert (labels[attention_mask == 0] == -100).all()
    assert (attention_mask == 0).any()  # the rows have different lengths, so padding was tested


def test_padding_sides(processor):
    images = [random_image(40, 40), random_image(40, 40, seed=1)]
    tasks = ["dig hole", "you can use the thing to smear butter on the bread"]
    right = processor(images, tasks, answers=DEFAULT_ANSWER)
    left = processor(images, tasks, answers=DEFAULT_ANSWER, padding_side="left")

    assert processor.tokenizer.padding_side == "right"
    short = right["attention_mask"][0]
    assert short[0] == 1 and short[-1] == 0
    assert left["attention_mask"][0][0] == 0 and left["attention_mask"][0][-1] == 1
    for row in range(2):
        real_right, real_left = right["attention_mask"][row] == 1, left["attention_mask"][row] == 1
        assert (right["input_ids"][row][real_right] == left["input_ids"][row][real_left]).all()
        assert (right["labels"][row][real_right] == left["labels"][row][real_left]).all()
    assert (left["labels"][left["attention_mask"] == 0] == -100).all()


# ---------------------------------------------------------------------------------------------------------------------
# Masks


def test_masks_in_sam_frame_pixel_for_pixel(processor):
    # A 64x32 image is scaled by exactly 2 into SAM's frame: each mask pixel becomes a 2x2 block, then zero padding.
    mask = np.random.default_rng(0).random((64, 32)) > 0.5
    inputs = processor(random_image(64, 32), "dig hole", masks=mask)
    expected = np.zeros((SAM_SIZE, SAM_SIZE), dtype=np.float32)
    expected[:128, :64] = np.kron(mask, np.ones((2, 2)))

    assert inputs["masks"].shape == (1, SAM_SIZE, SAM_SIZE)
    assert inputs["masks"].dtype == torch.float32
    assert torch.equal(inputs["masks"][0], torch.from_numpy(expected))


def test_masks_in_sam_frame_any_scale(processor):
    # 60x90 -> 85x128 (scale 128/90). The rectangle rows 10:30, cols 20:50 maps to about rows 14.2:42.7, cols
    # 28.4:71.1; nearest-neighbour resizing keeps it binary.
    mask = rectangle_mask(60, 90, 10, 30, 20, 50)
    inputs = processor([random_image(60, 90)] * 2, ["dig hole", "pour sugar"], masks=[mask, Image.fromarray(mask)])
    frame = inputs["masks"][0]

    assert torch.equal(inputs["masks"][0], inputs["masks"][1])
    assert set(frame.unique().tolist()) == {0.0, 1.0}
    assert frame[16:41, 30:70].eq(1).all()
    assert frame[:13].eq(0).all() and frame[44:].eq(0).all()
    assert frame[:, :27].eq(0).all() and frame[:, 73:].eq(0).all()
    assert frame[sam_resized_size(60, 90)[0] :].eq(0).all()


@pytest.mark.parametrize(
    "mask",
    [
        rectangle_mask(40, 30, 5, 20, 5, 25).astype(np.uint8),
        rectangle_mask(40, 30, 5, 20, 5, 25).astype(np.float32),
        torch.from_numpy(rectangle_mask(40, 30, 5, 20, 5, 25)),
        Image.fromarray(rectangle_mask(40, 30, 5, 20, 5, 25)),  # mode "1"
        Image.fromarray(rectangle_mask(40, 30, 5, 20, 5, 25).astype(np.uint8)),  # mode "L" holding 0/1
    ],
    ids=["uint8", "float", "torch", "pil-1", "pil-L"],
)
def test_mask_types(processor, mask):
    image = random_image(40, 30)
    reference = processor(image, "dig hole", masks=rectangle_mask(40, 30, 5, 20, 5, 25))["masks"]
    assert torch.equal(processor(image, "dig hole", masks=mask)["masks"], reference)


def test_post_process_masks_sizes(processor):
    images = [random_image(60, 90), random_image(100, 40, seed=1)]
    inputs = processor(images, ["dig hole", "pour sugar"])
    logits = torch.randn(2, 1, SAM_SIZE // 4, SAM_SIZE // 4)

    for mask_logits in (logits, logits[:, 0]):
        masks = processor.post_process_masks(mask_logits, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        assert [tuple(mask.shape) for mask in masks] == [(60, 90), (100, 40)]
        assert all(mask.dtype == torch.bool for mask in masks)

    resized = processor.post_process_masks(
        logits, inputs["original_sizes"].tolist(), inputs["reshaped_input_sizes"].tolist(), binarize=False
    )
    assert resized[0].dtype == torch.float32
    assert torch.equal(resized[0] > 0, masks[0])


@pytest.mark.parametrize("low_res, tolerance", [(SAM_SIZE, 0), (SAM_SIZE // 4, 1)])
def test_post_process_masks_recovers_mask(processor, low_res, tolerance):
    """A mask sent through the forward resize, turned into logits at `low_res` and post-processed comes back at its
    image's size: exactly from logits at SAM's input size; from a quarter of it (what SAM's decoder gives) with
    differences only within 1 pixel of the mask's boundary."""
    originals = [rectangle_mask(60, 90, 10, 30, 20, 50), disk_mask(90, 45, center=(50, 20), radius=15)]
    images = [random_image(60, 90), random_image(90, 45, seed=1)]
    inputs = processor(images, ["dig hole", "pour sugar"], masks=originals)

    logits = F.interpolate(inputs["masks"][:, None] * 20 - 10, size=(low_res, low_res), mode="bilinear")
    recovered = processor.post_process_masks(logits, inputs["original_sizes"], inputs["reshaped_input_sizes"])

    for original, mask in zip(originals, recovered):
        original = torch.from_numpy(original)
        assert mask.shape == original.shape
        near_boundary = dilate(original, tolerance) & dilate(~original, tolerance)
        assert not (mask ^ original)[~near_boundary].any()
        assert (mask & original).sum() / (mask | original).sum() > 0.95


def disk_mask(height, width, center, radius):
    rows, cols = np.ogrid[:height, :width]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def dilate(mask, radius):
    kernel = 2 * radius + 1
    return F.max_pool2d(mask[None, None].float(), kernel, stride=1, padding=radius)[0, 0].bool()


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip(processor, tmp_path):
    custom = VLTPProcessor(
        processor.image_processor,
        processor.sam_image_processor,
        processor.tokenizer,
        num_image_tokens=4,
        question_template="Where should I look to {task}?",
    )
    for original in (processor, custom):
        directory = tmp_path / str(original.num_image_tokens)
        original.save_pretrained(directory)
        loaded = VLTPProcessor.from_pretrained(directory)

        assert loaded.num_image_tokens == original.num_image_tokens
        assert loaded.prompt_template == original.prompt_template
        assert loaded.question_template == original.question_template
        assert dict(loaded.sam_image_processor.size) == {"longest_edge": SAM_SIZE}
        assert (loaded.seg_token_id, loaded.image_token_id) == (original.seg_token_id, original.image_token_id)

        images = [random_image(60, 90), random_image(90, 45, seed=1)]
        masks = [rectangle_mask(60, 90, 10, 30, 20, 50), rectangle_mask(90, 45, 0, 45, 0, 20)]
        tasks = ["dig hole", "you can use the thing to serve wine"]
        expected = original(images, tasks, answers=DEFAULT_ANSWER, masks=masks)
        actual = loaded(images, tasks, answers=DEFAULT_ANSWER, masks=masks)
        assert set(actual) == set(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key

    decoded = processor.decode(actual["input_ids"][0][actual["attention_mask"][0] == 1])
    assert f"USER: {IMAGE_TOKEN * 4}\nWhere should I look to dig hole? ASSISTANT: Sure, [SEG].</s>" in decoded


def test_processing_file_is_self_contained():
    """processing_vltp.py goes to the Hub for trust_remote_code with the files it imports relatively: it may
    import only these libraries and, of the package, only the configuration file (not the models)."""
    tree = ast.parse(Path(processing_vltp.__file__).read_text())
    imported, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            relative.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"numpy", "torch", "PIL", "transformers"}
    assert relative <= {"configuration_vltp"}


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_mismatched_batch_sizes(processor):
    images = [random_image(20, 20), random_image(20, 20)]
    with pytest.raises(ValueError, match="2 images but 3 tasks"):
        processor(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 images but 1 tasks"):
        processor(images, "a")
    with pytest.raises(ValueError, match="2 images but 1 answers"):
        processor(images, ["a", "b"], answers=[DEFAULT_ANSWER])
    with pytest.raises(ValueError, match="2 images but 3 masks"):
        processor(images, ["a", "b"], masks=[np.zeros((20, 20))] * 3)
    with pytest.raises(ValueError, match="no images"):
        processor([], [])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_images_not_rgb_pil(processor, mode):
    image = random_image(20, 20).convert(mode)
    with pytest.raises(ValueError, match=f"Image 1 has PIL mode '{mode}'.*convert\\('RGB'\\)"):
        processor([random_image(20, 20), image], ["a", "b"])


@pytest.mark.parametrize(
    "array",
    [np.zeros((20, 20), np.uint8), np.zeros((20, 20, 4), np.uint8), np.zeros((20, 20, 3), np.float32)],
    ids=["gray", "rgba", "float"],
)
def test_images_not_rgb_numpy(processor, array):
    with pytest.raises(ValueError, match=r"Image 0 is an array .* \(H, W, 3\) uint8"):
        processor(array, "a")
    # The same pixels as an (H, W, 3) uint8 array are fine.
    assert processor(np.zeros((20, 20, 3), np.uint8), "a")["sam_pixel_values"].shape == (1, 3, SAM_SIZE, SAM_SIZE)


def test_images_of_wrong_type(processor):
    with pytest.raises(TypeError, match="Image 0 is a Tensor"):
        processor(torch.zeros(3, 20, 20), "a")


def test_masks_of_wrong_size(processor):
    with pytest.raises(ValueError, match=r"Mask 0 has shape \(30, 20\) but its image is 20x30"):
        processor(random_image(20, 30), "a", masks=np.zeros((30, 20), bool))
    with pytest.raises(ValueError, match=r"Mask 0 has shape \(20, 30, 3\)"):
        processor(random_image(20, 30), "a", masks=np.zeros((20, 30, 3), bool))


def test_non_binary_masks(processor):
    mask = rectangle_mask(20, 30, 0, 10, 0, 10).astype(np.uint8) * 255
    with pytest.raises(ValueError, match=r"Mask 0 is not binary.*\[0, 255\]"):
        processor(random_image(20, 30), "a", masks=mask)
    with pytest.raises(ValueError, match="Mask 0 is not binary"):
        processor(random_image(20, 30), "a", masks=np.full((20, 30), 0.5))


def test_bad_post_process_inputs(processor):
    inputs = processor(random_image(20, 30), "a")
    sizes = (inputs["original_sizes"], inputs["reshaped_input_sizes"])
    with pytest.raises(ValueError, match="shape"):
        processor.post_process_masks(torch.zeros(1, 2, 32, 32), *sizes)
    with pytest.raises(ValueError, match="Got 2 masks, 1 original sizes"):
        processor.post_process_masks(torch.zeros(2, 32, 32), *sizes)


def test_bad_construction(processor):
    parts = (processor.image_processor, processor.sam_image_processor)
    plain_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match=r"lacks \['<image>', '\[SEG\]'\].*add_vltp_special_tokens"):
        VLTPProcessor(*parts, plain_tokenizer)
    with pytest.raises(ValueError, match="prompt_template"):
        VLTPProcessor(*parts, processor.tokenizer, prompt_template="USER: {question} ASSISTANT:")
    with pytest.raises(ValueError, match="question_template"):
        VLTPProcessor(*parts, processor.tokenizer, question_template="Please output segmentation mask.")


# ---------------------------------------------------------------- user text, image files, odd images

CONTROL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", IMAGE_TOKEN, SEG_TOKEN]


def test_control_tokens_are_every_special_and_added_token(processor):
    added = [token.content for token in processor.tokenizer.added_tokens_decoder.values()]
    assert sorted(processor.control_tokens()) == sorted(CONTROL_TOKENS) == sorted(added)


@pytest.mark.parametrize("token", CONTROL_TOKENS)
def test_typed_control_token_in_a_task_is_refused(processor, token):
    with pytest.raises(ValueError, match=rf"Task 1 contains '{re.escape(token)}', a control token"):
        processor(images=[random_image(8, 8)] * 2, tasks=["fine", f"cut {token} the bread"])


@pytest.mark.parametrize("token", [t for t in CONTROL_TOKENS if t != SEG_TOKEN])
def test_typed_control_token_in_an_answer_is_refused(processor, token):
    with pytest.raises(ValueError, match=rf"Answer 0 contains '{re.escape(token)}'"):
        processor(images=random_image(8, 8), tasks="cut bread", answers=f"Sure, {token} {SEG_TOKEN}.")


def test_answer_holds_at_most_one_seg(processor):
    with pytest.raises(ValueError, match=r"Answer 1 holds \[SEG\] 2 times; at most 1 is allowed"):
        processor(
            images=[random_image(8, 8)] * 2, tasks=["cut bread"] * 2, answers=["Sure.", f"{SEG_TOKEN} and {SEG_TOKEN}"]
        )


def test_answer_without_seg_is_all_labels(processor):
    """An answer that says nothing fits trains LLaVA's loss on its every token, and has no [SEG]."""
    inputs = processor(images=random_image(8, 8), tasks="cut bread", answers="There is nothing that fits.")
    assert processor.seg_token_id not in inputs["input_ids"][0].tolist()
    answer_ids = inputs["labels"][0][inputs["labels"][0] != -100]
    text = processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert text.strip() == "There is nothing that fits."


def test_look_alike_text_stays_plain_text(processor):
    """Near-misses of the control tokens tokenise as text: one [SEG], one image-token run, one EOS."""
    task = "cut [seg] [SEG <image <s </s <pad> > with the knife"
    inputs = processor(images=random_image(8, 8), tasks=task.replace("<pad>", "<pad"), answers=DEFAULT_ANSWER)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.seg_token_id) == 1
    image_positions = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    assert len(image_positions) == NUM_IMAGE_TOKENS
    assert image_positions == list(range(image_positions[0], image_positions[0] + NUM_IMAGE_TOKENS))
    assert ids.count(processor.tokenizer.eos_token_id) == 1 and ids[-1] == processor.tokenizer.eos_token_id
    assert ids.count(processor.tokenizer.bos_token_id) == 1 and ids[0] == processor.tokenizer.bos_token_id


def test_non_string_task_is_refused(processor):
    with pytest.raises(TypeError, match="Task 0 is a NoneType"):
        processor(images=random_image(8, 8), tasks=[None])


def _exif_rotated_jpeg(path, width=45, height=30):
    """A JPEG stored as width x height with EXIF orientation 6: viewers show it rotated, height x width wide."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 3] = 255  # a white band on the stored left side: on top once rotated
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_load_image_applies_exif_orientation(tmp_path):
    image = processing_vltp.load_image(_exif_rotated_jpeg(tmp_path / "photo.jpg"))
    assert image.mode == "RGB" and image.size == (30, 45)  # as shown: 30 wide, 45 high
    pixels = np.asarray(image).mean(axis=(1, 2))
    assert pixels[:10].min() > 200 and pixels[-10:].max() < 50  # the band is on top


def test_processor_opens_paths_in_the_displayed_orientation(processor, tmp_path):
    inputs = processor(images=[str(_exif_rotated_jpeg(tmp_path / "photo.jpg"))], tasks="cut bread")
    assert inputs["original_sizes"].tolist() == [[45, 30]]


@pytest.mark.parametrize("dtype, file_name", [(np.uint16, "deep.png"), (np.int32, "deep.tif")])
def test_load_image_scales_16_bit_grayscale(tmp_path, dtype, file_name):
    """A 16-bit PNG opens as mode I;16, a 32-bit integer TIFF as mode I: both scale 0..65535 to 0..255."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    Image.fromarray(ramp.astype(dtype)).save(tmp_path / file_name)
    pixels = np.asarray(processing_vltp.load_image(tmp_path / file_name))
    assert pixels.shape == (64, 64, 3)
    np.testing.assert_allclose(pixels[..., 0], ramp / 257, atol=1)  # a ramp, not clipped to 0 and 255


@pytest.mark.parametrize(
    "content, error, words",
    [
        (None, FileNotFoundError, "image file not found"),
        (b"", ValueError, "cannot identify"),
        (b"not an image at all", ValueError, "cannot identify"),
    ],
)
def test_load_image_errors_name_the_file(tmp_path, content, error, words):
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=words) as raised:
        processing_vltp.load_image(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_load_image_truncated_file(tmp_path):
    path = tmp_path / "cut.jpg"
    random_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: (?i:.*truncated)"):
        processing_vltp.load_image(path)


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # as a 15000 x 15000 image is for the default
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: .*decompression bomb") as raised:
        processing_vltp.load_image(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("height, width", [(1, 5000), (5000, 1), (2, 101)])
def test_too_elongated_images_are_refused(processor, height, width):
    with pytest.raises(ValueError, match=f"Image 0 is {height}x{width} .*too elongated"):
        processor(images=Image.new("RGB", (width, height)), tasks="cut bread")
    inputs = processor(images=Image.new("RGB", (100, 2)), tasks="cut bread")  # 1:50 is accepted
    assert inputs["reshaped_input_sizes"].tolist() == [[3, SAM_SIZE]]
