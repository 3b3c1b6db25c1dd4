"""The `vltp` command.

    vltp segment IMAGE "TASK" [--model DIR_OR_HUB_ID] [--prune-rates 0.5,0.5] [--min-score 0.5] [--out mask.png]
                              [--overlay overlay.png] [--show-pruning pruning.png]
    vltp train --stage 1|2 --config FILE.yaml [--resume [CHECKPOINT]]
    vltp eval --data rio|coco_tasks --annotations PATH --images DIR --split SPLIT --model DIR [--sweep-rates 0,0.5,0.8]
              [--answers teacher-forced|generated]

Errors (an unreadable image, a missing model, an unreachable Hub, bad rates, a bad training config) are reported in one
line on stderr with a non-zero exit status. `vltp train` runs under `accelerate launch` as it is (see
docs/training.md).
"""

import argparse
import math
import os
import sys
from pathlib import Path

# A tiny VLTP trained on the synthetic task world by benchmarks/learn_synthetic.py, shipped with the package so that
# `vltp segment` works offline without a checkpoint.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


class CommandError(Exception):
    """A problem to report in one line, without a traceback."""


def comma_separated(cast, example: str):
    """An argparse `type` for lists such as "0.5,0.5": each non-blank item converted by `cast` (`float`, `int`); a
    one-line error naming `example` when an item does not convert or no item is given."""

    def parse(text: str) -> list:
        try:
            values = [cast(item) for item in text.split(",") if item.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {cast.__name__} values such as {example}, got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .data import TASK_NAME_SETS

    parser = argparse.ArgumentParser(prog="vltp", description="VLTP: task-oriented segmentation with token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment what a task asks for in an image")
    segment.add_argument("image", help="path of the image")
    segment.add_argument("task", help='the task, e.g. "you can ride the thing to your destination"')
    segment.add_argument(
        "--model",
        help="a local directory or a Hub id of a VLTP checkpoint with its processor (default: the built-in demo "
        "model, trained on the synthetic task world)",
    )
    segment.add_argument(
        "--prune-rates", type=comma_separated(float, "0.5,0.5"), help="one rate per pruning stage, e.g. 0.5,0.5"
    )
    segment.add_argument("--out", default="mask.png", help="where to write the mask (default: mask.png)")
    segment.add_argument("--overlay", help="where to write the image with the mask over it")
    segment.add_argument("--show-pruning", help="where to write the kept-token map of each pruning stage")
    segment.add_argument("--max-new-tokens", type=int, default=32, help="length limit of the answer")
    segment.add_argument(
        "--min-score",
        type=float,
        help="leave the mask empty when its score (SAM's predicted IoU) is below this, e.g. 0.5",
    )
    segment.add_argument("--device", help="torch device (default: accelerate's device for this process, else cpu)")

    train = commands.add_parser("train", help="finetune: stage 1 (LoRA on LLaVA) or stage 2 (VLTP prune decoder)")
    train.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: vision-language, 2: VLTP@Finetune")
    train.add_argument("--config", required=True, help="YAML file: model, data, rates, output_dir, training arguments")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="resume the run in output_dir from its last complete checkpoint, or from CHECKPOINT",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a non-empty output_dir (files the run does not write are kept)",
    )

    evaluate = commands.add_parser("eval", help="gIoU, cIoU and GMACs of a model on a split, at several rates")
    evaluate.add_argument("--data", choices=("rio", "coco_tasks"), required=True, help="layout of the annotations")
    evaluate.add_argument("--annotations", required=True, help="RIO split file or folder, or COCO-Tasks folder")
    evaluate.add_argument("--images", required=True, help="COCO 2014 root (train2014/, val2014/)")
    evaluate.add_argument("--split", required=True, help="RIO: train, common, uncommon; COCO-Tasks: train, test")
    evaluate.add_argument("--model", required=True, help="a local VLTP checkpoint directory or a Hub id")
    evaluate.add_argument(
        "--sweep-rates",
        type=comma_separated(float, "0,0.5,0.8"),
        help="the rates to evaluate, one row each, every pruning stage at that rate (0: dense); default: 0 and the "
        "model's own rates",
    )
    evaluate.add_argument(
        "--tasks", type=comma_separated(int, "1,2,3"), help="COCO-Tasks task numbers, e.g. 1,2,3 (default: all)"
    )
    evaluate.add_argument(
        "--task-names",
        choices=tuple(TASK_NAME_SETS),
        default="coco_tasks",
        help="the set of names COCO-Tasks' task numbers stand for (default: coco_tasks, the official ones)",
    )
    evaluate.add_argument(
        "--answers",
        choices=("teacher-forced", "generated"),
        default="teacher-forced",
        help="teacher-forced: every sample answered LISA's 'Sure, [SEG].' (LISA's protocol, the default); generated: "
        "the model's own answer, where one without [SEG] predicts an empty mask",
    )
    evaluate.add_argument("--max-samples", type=int, help="evaluate the first N samples only")
    evaluate.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")
    evaluate.add_argument("--device", help="torch device (default: accelerate's device for this process, else cpu)")
    return parser


def _open_image(path: str):
    """The RGB image at `path` as a person sees it (the processor's `load_image`: EXIF orientation, 16-bit scaling), or
    a one-line [`CommandError`] (missing, unreadable, or over PIL's decompression-bomb limit)."""
    from .processing_vltp import load_image

    try:
        return load_image(path)
    except FileNotFoundError:
        raise CommandError(f"cannot read image {path!r}: no such file") from None
    except ValueError as error:
        raise CommandError(str(error)) from None


def _looks_local(name: str) -> bool:
    """Whether a model name is a local path rather than a Hub id (`org/name` or `name`): it exists, starts like a
    path, has more than one `/` (or an OS separator other than `/`), or its first folder exists here."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _model_config(name: str):
    """The `VLTPConfig` of a model, read before its weights so that arguments are checked first. A local-looking name
    is read without network calls; any model type other than VLTP is refused by its config.json's `model_type`."""
    from .configuration_vltp import VLTPConfig
    from .training import read_vltp_config

    try:
        if _looks_local(name):
            return read_vltp_config(name)
        config_dict, _ = VLTPConfig.get_config_dict(name)
        if config_dict.get("model_type") != VLTPConfig.model_type:
            raise ValueError(f"{name} holds a {config_dict.get('model_type')!r} model, not a VLTP checkpoint")
        return VLTPConfig.from_pretrained(name)
    except Exception as error:  # from_pretrained raises OSError, HTTP and value errors alike
        raise CommandError(f"cannot load model {name!r}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _load_model(name: str, device: str):
    """Model and processor of a name whose config [`_model_config`] accepted."""
    from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor

    path = str(Path(name).expanduser()) if _looks_local(name) else name
    try:
        model = VLTPForTaskSegmentation.from_pretrained(path).to(device).eval()
        processor = VLTPProcessor.from_pretrained(path)
    except Exception as error:  # from_pretrained raises OSError, HTTP and value errors alike
        raise CommandError(f"cannot load model {name!r}: {_first_line(error)}") from None
    return model, processor


def _device(requested: str | None) -> str:
    """The torch device: `--device`, else the one accelerate assigns this process (a GPU under `accelerate launch`
    on a GPU machine, the CPU otherwise). Under `accelerate launch` this process joins the process group."""
    from accelerate import PartialState

    state = PartialState()
    return requested if requested is not None else str(state.device)


def _check_outputs(args) -> None:
    """Every output path must be a new or existing file (not a folder, not the input image, not another output) with
    an image extension, in a writable folder: checked before the model is loaded, so that a bad path writes nothing."""
    from PIL import Image

    image = Path(args.image).resolve()
    outputs = {"--out": args.out, "--overlay": args.overlay, "--show-pruning": args.show_pruning}
    seen = {}
    for option, value in outputs.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            raise CommandError(f"{option} {value!r} is a folder: give a file name such as {path / 'mask.png'}")
        if path.resolve() == image:
            raise CommandError(f"{option} {value!r} is the input image: write the result to another file")
        if path.resolve() in seen:
            raise CommandError(f"{option} and {seen[path.resolve()]} both name {value!r}")
        seen[path.resolve()] = option
        if path.suffix.lower() not in Image.registered_extensions():
            raise CommandError(f"{option} {value!r}: unknown image file extension {path.suffix!r} (e.g. .png)")
        folder = path.parent
        if not folder.is_dir():
            raise CommandError(f"cannot write {option} {value!r}: no folder {str(folder)!r}")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CommandError(f"cannot write {option} {value!r}: permission denied")


def _save(image, path: str, what: str) -> None:
    try:
        image.save(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot write the {what} to {path!r}: {error}") from None


def segment_command(args) -> None:
    from .configuration_vltp import check_prune_rates
    from .processing_vltp import MAX_ASPECT_RATIO
    from .visualization import mask_image, overlay_mask, pruning_map

    _check_outputs(args)
    image = _open_image(args.image)
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.min_score is not None and not math.isfinite(args.min_score):
        raise CommandError(f"--min-score must be a finite number (a predicted IoU, e.g. 0.5), got {args.min_score}")
    if args.model is None and not DEMO_MODEL_DIR.is_dir():
        raise CommandError("no --model given and this installation has no demo model: name a VLTP checkpoint")
    name = args.model or str(DEMO_MODEL_DIR)
    vision_config = _model_config(name).vision_config
    if args.prune_rates is not None:
        try:
            check_prune_rates(args.prune_rates, len(vision_config.prune_layers), name="--prune-rates")
        except ValueError as error:
            raise CommandError(str(error)) from None
    side, short, long = vision_config.image_size, min(image.size), max(image.size)
    if long > MAX_ASPECT_RATIO * short or int(short * side / long + 0.5) < 1:  # the processor's bound, checked early
        raise CommandError(
            f"image {args.image!r} is {image.width}x{image.height}: too elongated for the model's {side} px input "
            f"(at most 1:{MAX_ASPECT_RATIO}); crop it into less elongated pieces"
        )
    if args.model is None:
        print(
            "model:  the built-in demo, a tiny VLTP trained on the synthetic task world "
            "(python -m modeling_vltp.data.synthetic); give --model for real images"
        )
    model, processor = _load_model(name, _device(args.device))
    try:
        (result,) = model.segment(
            image,
            args.task,
            processor,
            prune_rates=args.prune_rates,
            max_new_tokens=args.max_new_tokens,
            min_score=args.min_score,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None

    print(f"task:   {result.task}")
    print(f"answer: {result.text}")
    if result.score is not None:
        print(f"score:  {result.score:.2f} (SAM's predicted IoU of the mask)")
    _save(mask_image(result.mask), args.out, "mask")
    if result.message is None:
        print(f"mask:   {100 * result.mask.float().mean().item():.1f}% of the image -> {args.out}")
    else:
        print(f"mask:   empty ({result.message}) -> {args.out}")
    if args.overlay:
        _save(overlay_mask(image, result.mask), args.overlay, "overlay")
        print(f"overlay -> {args.overlay}")
    labels = [
        f"after layer {layer}: kept {int(kept.sum())}/{kept.numel()}"
        for layer, kept in zip(vision_config.prune_layers, result.kept_token_maps)
    ]
    for label in labels:
        print(f"pruning: {label}")
    if args.show_pruning:
        _save(pruning_map(image, result.kept_token_maps, labels), args.show_pruning, "pruning map")
        print(f"pruning map -> {args.show_pruning}")


def train_command(args) -> None:
    from accelerate import PartialState

    from .training import TrainConfig, TrainingInputError, train

    try:
        config = TrainConfig.from_yaml(args.config, stage=args.stage)
        if args.resume is not None:
            config.resume_from_checkpoint = args.resume
        config.overwrite_output_dir |= args.overwrite
        summary = train(config)
    except TrainingInputError as error:
        raise CommandError(str(error)) from None
    if PartialState().is_main_process:
        for line in summary.lines():
            print(f"vltp train: {line}")


def eval_command(args) -> None:
    from .configuration_vltp import check_prune_rates
    from .training import DataSettings, TrainingInputError, distributed_process, evaluate_rates, load_split

    data = DataSettings(
        format=args.data,
        annotations=args.annotations,
        images=args.images,
        tasks=args.tasks,
        task_names=args.task_names,
    )
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        dataset = load_split(data, args.split, args.max_samples, source="vltp eval")
    except TrainingInputError as error:
        raise CommandError(str(error)) from None
    vision_config = _model_config(args.model).vision_config
    num_stages = len(vision_config.prune_layers)
    if args.sweep_rates is None:
        rates_list = [[0.0] * num_stages, list(vision_config.prune_rates)]
    else:
        rates_list = [[rate] * num_stages for rate in args.sweep_rates]
    try:
        for stage_rates in rates_list:
            check_prune_rates(stage_rates, num_stages, name="--sweep-rates")
    except ValueError as error:
        raise CommandError(str(error)) from None
    model, processor = _load_model(args.model, _device(args.device))
    results = evaluate_rates(model, processor, dataset, rates_list, batch_size=args.batch_size, answers=args.answers)
    if distributed_process()[0] != 0:  # every process has the same results (see `evaluate_rates`): one table
        return
    name = args.model.rstrip("/").split("/")[-1]
    split = f"{'RIO' if args.data == 'rio' else 'COCO-Tasks'} {args.split}"
    print(f"{split}: {len(dataset)} samples, model {args.model}, answers {args.answers}")
    nothing = args.answers == "generated"
    header = f"{'Model':<24} {'pruning rate':>12} {'gIoU (%)':>9} {'cIoU (%)':>9} {'GMACs':>10}"
    print(header + (f" {'empty targets answered nothing (%)':>35}" if nothing else ""))
    for result in results:
        stage_rates = result["prune_rates"]
        shown = "-" if not any(stage_rates) else "/".join(dict.fromkeys(f"{rate:g}" for rate in stage_rates))
        row = (
            f"{name:<24} {shown:>12} {100 * result['gIoU']:>9.1f} {100 * result['cIoU']:>9.1f} "
            f"{result['gmacs']:>10.4g}"
        )
        if nothing:
            share = result["nothing_on_empty"]
            row += f" {'-' if share is None else f'{100 * share:.1f}':>35}"
        print(row)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            segment_command(args)
        elif args.command == "train":
            train_command(args)
        elif args.command == "eval":
            eval_command(args)
    except CommandError as error:
        print(f"vltp: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
