"""`vltp segment` on a generated image, with a tiny model saved the way users save theirs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.cli import build_parser, main
from modeling_vltp.data import load_rio, synthetic
from modeling_vltp.testing import tiny_model_and_processor
from modeling_vltp.visualization import overlay_mask, pruning_map


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    synthetic.generate(root, num_images=2, seed=3, image_size=96, format="rio", split="train")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world) -> Path:
    """A tiny system trained a few steps on the generated world, so that it answers with [SEG]; saved to disk."""
    model, processor = tiny_model_and_processor(seed=1)
    rows = load_rio(world, world, "train")
    batch = processor(
        images=[row["image"].convert("RGB") for row in rows],
        tasks=[row["task"] for row in rows],
        answers="Sure, [SEG].",
        masks=[row["mask"] for row in rows],
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("model")
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def first_image(world: Path) -> Path:
    return sorted((world / "train2014").glob("*.jpg"))[0]


def test_segment_writes_the_mask_overlay_and_pruning_map(tmp_path, world, model_dir, capsys):
    image_path, task = first_image(world), "you can use the thing to roll it across the floor"
    out, overlay, pruning = tmp_path / "mask.png", tmp_path / "overlay.png", tmp_path / "pruning.png"
    status = main(
        [
            "segment",
            str(image_path),
            task,
            "--model",
            str(model_dir),
            "--prune-rates",
            "0.75",
            "--out",
            str(out),
            "--overlay",
            str(overlay),
            "--show-pruning",
            str(pruning),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "[SEG]" in printed and "after layer 2: kept 16/64" in printed
    image = Image.open(image_path).convert("RGB")
    model = VLTPForTaskSegmentation.from_pretrained(model_dir).eval()
    (expected,) = model.segment(image, task, VLTPProcessor.from_pretrained(model_dir), prune_rates=[0.75])
    assert f"score:  {expected.score:.2f} (SAM's predicted IoU of the mask)" in printed
    mask = np.array(Image.open(out))
    assert np.array_equal(mask > 0, expected.mask.numpy()) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == image.size
    # one stage: one panel, with the 48 frozen tokens darkened
    panel = np.array(Image.open(pruning).convert("L")).astype(int)
    assert panel.shape == (image.height, image.width)
    darkened = panel < np.array(image.convert("L")).astype(int) - 20
    assert abs(darkened.mean() - 48 / 64) < 0.1


def test_segment_min_score_leaves_a_low_scored_mask_empty_and_says_why(tmp_path, world, model_dir, capsys):
    """A threshold above any score this model gives (its IoU head, trained 40 steps, predicts well below 10)."""
    out = tmp_path / "mask.png"
    arguments = [
        str(first_image(world)),
        "you can use the thing to roll it across the floor",
        "--model",
        str(model_dir),
    ]
    assert main(["segment", *arguments, "--min-score", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "score:  " in printed and "is below min_score 10, so no mask" in printed
    assert not np.array(Image.open(out)).any()


def test_overlay_tints_only_the_mask():
    image = Image.fromarray(np.full((20, 30, 3), 100, dtype=np.uint8))
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:10, 3:20] = True
    tinted = np.array(overlay_mask(image, mask)).astype(int)
    assert (tinted[~mask.numpy()] == 100).all()
    assert (tinted[mask.numpy(), 0] > 150).all() and (tinted[mask.numpy(), 1] < 100).all()


def test_pruning_map_draws_one_panel_per_stage_on_the_image_pixels():
    image = Image.fromarray(np.full((64, 128, 3), 200, dtype=np.uint8))  # fills the top half of the square frame
    kept = torch.zeros(4, 4, dtype=torch.bool)
    kept[0, 0] = True  # the top-left token covers 64 x 64 frame pixels = 32 x 32 image pixels
    sheet = np.array(pruning_map(image, [kept, ~kept], labels=["", ""]).convert("L"))
    assert sheet.shape == (64, 2 * 128 + 4)
    first, second = sheet[:, :128], sheet[:, 132:]
    assert (first[:32, :32] == 200).all() and (first[:32, 32:] < 200).all() and (first[32:] < 200).all()
    assert (second[:32, :32] < 200).all() and (second[:32, 32:] == 200).all()


def test_list_arguments_are_comma_separated_and_each_command_says_what_its_rates_mean(capsys):
    parser = build_parser()
    assert parser.parse_args(["segment", "a.png", "task", "--prune-rates", "0.5, 0.8"]).prune_rates == [0.5, 0.8]
    evaluate = [
        "eval",
        "--data",
        "coco_tasks",
        "--annotations",
        "a",
        "--images",
        "i",
        "--split",
        "test",
        "--model",
        "m",
    ]
    args = parser.parse_args([*evaluate, "--sweep-rates", "0,0.5,0.8", "--tasks", "1,2", "--task-names", "synthetic"])
    assert (args.sweep_rates, args.tasks, args.task_names) == ([0.0, 0.5, 0.8], [1, 2], "synthetic")
    for bad in (["--sweep-rates", "0,half"], ["--sweep-rates", ","], ["--tasks", "1.5"], ["--prune-rates", "0.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*evaluate, *bad])
    errors = capsys.readouterr().err
    assert "expected comma-separated float values such as 0,0.5,0.8, got '0,half'" in errors
    assert "unrecognized arguments: --prune-rates" in errors


def run_vltp(*arguments: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m modeling_vltp.cli ARGUMENTS` in a new process, as a user runs it."""
    command = [sys.executable, "-m", "modeling_vltp.cli", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_segment_runs_as_a_command(tmp_path, world, model_dir):
    result = run_vltp(
        "segment", str(first_image(world)), "dig a hole", "--model", str(model_dir), "--out", str(tmp_path / "m.png")
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.png").exists() and "answer:" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["segment", "{missing_image}", "task", "--model", "{model}"], "cannot read image .*no such file"),
        (["segment", "{not_an_image}", "task", "--model", "{model}"], "cannot read image"),
        (["segment", "{bomb}", "task", "--model", "{model}"], "cannot read image .*exceeds limit"),
        (["segment", "{strip}", "task", "--model", "{model}"], r"is 1x5000: too elongated"),
        (["segment", "{image}", "task", "--model", "{missing_model}"], "cannot load model .*no-model does not exist"),
        (["segment", "{image}", "task", "--model", "./no-model"], "cannot load model './no-model': no-model does not"),
        (["segment", "{image}", "task", "--model", "{sam}"], "holds a 'sam' model, not a VLTP checkpoint"),
        (["segment", "{image}", "task", "--model", "{model}", "--prune-rates", "2.0"], r"--prune-rates must each be"),
        (["segment", "{image}", "task", "--model", "{model}", "--prune-rates", "0.5,0.5"], r"one rate per pruning"),
        (["segment", "{image}", "task", "--model", "{model}", "--min-score", "nan"], "--min-score must be a finite"),
        (
            ["segment", "{image}", "task", "--model", "{model}", "--out", "{bad_dir}/m.png"],
            "cannot write --out .*no folder",
        ),
        (["segment", "{image}", "task", "--model", "{model}", "--out", "{tmp}"], "--out .* is a folder"),
        (["segment", "{image}", "task", "--model", "{model}", "--out", "{image}"], "--out .* is the input image"),
        (
            ["segment", "{image}", "task", "--model", "{model}", "--overlay", "{tmp}/o.txt"],
            "unknown image file extension",
        ),
        (
            ["segment", "{image}", "task", "--model", "{model}", "--overlay", "mask.png"],
            "--overlay and --out both name",
        ),
    ],
)
def test_bad_input_gives_one_line_and_a_non_zero_status(
    tmp_path, world, model_dir, capsys, monkeypatch, arguments, message
):
    """Every argument is checked before the model is built (LLaVA may not even be constructed), and nothing is
    written."""
    from test_training import sam_checkpoint
    from transformers import LlavaForConditionalGeneration

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")  # over PIL's decompression-bomb limit
    Image.new("RGB", (1, 5000)).save(tmp_path / "strip.png")
    image = tmp_path / "photo.jpg"
    image.write_bytes(first_image(world).read_bytes())
    values = dict(
        missing_image=tmp_path / "nope.jpg",
        not_an_image=not_an_image,
        bomb=tmp_path / "bomb.png",
        strip=tmp_path / "strip.png",
        model=model_dir,
        missing_model=tmp_path / "no-model",
        sam=sam_checkpoint(tmp_path / "sam") if "{sam}" in arguments else None,
        image=image,
        bad_dir=tmp_path / "no" / "dir",
        tmp=tmp_path,
    )
    before = sorted(tmp_path.rglob("*"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", no_model)
    monkeypatch.chdir(tmp_path)
    status = main([a.format(**values) for a in arguments])
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]
    assert status == 1 and "Traceback" not in error
    assert last_line.startswith("vltp: error: ") and re.search(message, last_line), error
    assert sorted(tmp_path.rglob("*")) == before and image.read_bytes() == first_image(world).read_bytes()


def test_segment_draws_the_pruning_map_of_a_one_pixel_image(tmp_path, capsys):
    """The built-in demo answers with [SEG] here (for a dot of any of the world's colours), so the map has a panel,
    drawn from tokens larger than the image."""
    Image.new("RGB", (1, 1), (90, 30, 200)).save(tmp_path / "dot.png")
    task = "you can use the thing to cover a large hole"
    arguments = ["segment", str(tmp_path / "dot.png"), task, "--prune-rates", "0.5"]
    assert main(arguments + ["--out", str(tmp_path / "m.png"), "--show-pruning", str(tmp_path / "p.png")]) == 0
    assert "pruning: after layer" in capsys.readouterr().out
    assert Image.open(tmp_path / "m.png").size == (1, 1) and Image.open(tmp_path / "p.png").size == (1, 1)


def test_offline_hub_is_one_line(world):
    """With the Hub unreachable (offline mode), a Hub id that is not cached gives a one-line error."""
    result = run_vltp(
        "segment",
        str(first_image(world)),
        "task",
        "--model",
        "someone/vltp-tiny-missing",
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("vltp: error: cannot load model 'someone/vltp-tiny-missing'")


def test_segment_without_model_uses_the_built_in_demo(tmp_path, capsys):
    """The README's main job on a fresh machine: a synthetic image, no --model, no network."""
    synthetic.generate(tmp_path / "world", num_images=1, seed=11, image_size=128, format="rio", split="common")
    image = sorted((tmp_path / "world" / "val2014").glob("*.jpg"))[0]
    rows = load_rio(tmp_path / "world", tmp_path / "world", "common")
    status = main(
        [
            "segment",
            str(image),
            rows[0]["task"],
            "--out",
            str(tmp_path / "m.png"),
            "--show-pruning",
            str(tmp_path / "p.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "demo" in printed and "synthetic task world" in printed
    assert "[SEG]" in printed and (tmp_path / "m.png").exists() and (tmp_path / "p.png").exists()
