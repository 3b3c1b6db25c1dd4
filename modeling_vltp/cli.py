"""The `vltp` command.

    vltp segment IMAGE "TASK" [--model DIR_OR_HUB_ID] [--prune-rates 0.5,0.5] [--out mask.png]
                              [--overlay overlay.png] [--show-pruning pruning.png]

Errors (an unreadable image, a missing model, an unreachable Hub, bad rates) are reported in one line on stderr with a
non-zero exit status.
"""

import argparse
import sys


class CommandError(Exception):
    """A problem to report in one line, without a traceback."""


def _parse_rates(text: str) -> list[float]:
    try:
        return [float(rate) for rate in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vltp", description="VLTP: task-oriented segmentation with token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment what a task asks for in an image")
    segment.add_argument("image", help="path of the image")
    segment.add_argument("task", help='the task, e.g. "you can ride the thing to your destination"')
    segment.add_argument("--model", help="a local directory or a Hub id of a VLTP checkpoint with its processor")
    segment.add_argument("--prune-rates", type=_parse_rates, help="one rate per pruning stage, e.g. 0.5,0.5")
    segment.add_argument("--out", default="mask.png", help="where to write the mask (default: mask.png)")
    segment.add_argument("--overlay", help="where to write the image with the mask over it")
    segment.add_argument("--show-pruning", help="where to write the kept-token map of each pruning stage")
    segment.add_argument("--max-new-tokens", type=int, default=32, help="length limit of the answer")
    segment.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise CommandError(f"cannot read image {path!r}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"cannot read image {path!r}: {error}") from None


def _load_model(name: str, device: str):
    from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor

    try:
        model = VLTPForTaskSegmentation.from_pretrained(name).to(device).eval()
        processor = VLTPProcessor.from_pretrained(name)
    except Exception as error:  # from_pretrained raises OSError, HTTP and value errors alike
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"cannot load model {name!r}: {reason}") from None
    return model, processor


def _save(image, path: str, what: str) -> None:
    try:
        image.save(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot write the {what} to {path!r}: {error}") from None


def segment_command(args) -> None:
    from .visualization import mask_image, overlay_mask, pruning_map

    if args.model is None:
        raise CommandError("no --model given: name a local VLTP checkpoint directory or a Hub id")
    image = _load_image(args.image)
    model, processor = _load_model(args.model, args.device)
    try:
        (result,) = model.segment(
            image, args.task, processor, prune_rates=args.prune_rates, max_new_tokens=args.max_new_tokens
        )
    except ValueError as error:
        raise CommandError(str(error)) from None

    print(f"task:   {result.task}")
    print(f"answer: {result.text}")
    _save(mask_image(result.mask), args.out, "mask")
    if result.seg_found:
        coverage = 100 * result.mask.float().mean().item()
        print(f"mask:   {coverage:.1f}% of the image, predicted IoU {result.score:.2f} -> {args.out}")
    else:
        print(f"mask:   empty ({result.message}) -> {args.out}")
    if args.overlay:
        _save(overlay_mask(image, result.mask), args.overlay, "overlay")
        print(f"overlay -> {args.overlay}")
    config = model.config.vision_config
    labels = [
        f"after layer {layer}: kept {int(kept.sum())}/{kept.numel()}"
        for layer, kept in zip(config.prune_layers, result.kept_token_maps)
    ]
    for label in labels:
        print(f"pruning: {label}")
    if args.show_pruning:
        _save(pruning_map(image, result.kept_token_maps, config.image_size, labels), args.show_pruning, "pruning map")
        print(f"pruning map -> {args.show_pruning}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            segment_command(args)
    except CommandError as error:
        print(f"vltp: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
