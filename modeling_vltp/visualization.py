"""Pictures of a segmentation: the mask over the image, and which ViT tokens each pruning stage kept (paper Fig. 4)."""

import numpy as np
import torch
from PIL import Image, ImageDraw

MASK_COLOR = (255, 40, 40)


def mask_image(mask: torch.Tensor) -> Image.Image:
    """A boolean (H, W) mask as a black-and-white PNG-ready image (255 inside)."""
    return Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255, mode="L")


def overlay_mask(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image with the mask tinted over it."""
    image = image.convert("RGB")
    tint = Image.new("RGB", image.size, MASK_COLOR)
    blend = Image.blend(image, tint, alpha)
    return Image.composite(blend, image, mask_image(mask))


def pruning_map(
    image: Image.Image, kept_token_maps: list[torch.Tensor], labels: list[str] | None = None
) -> Image.Image:
    """One panel per pruning stage: the image with the tokens that stage froze darkened and the kept ones clear.

    `kept_token_maps` are (grid, grid) boolean maps over the encoder's padded square input, whose top-left the image
    fills along its longest side; the maps are drawn back onto the image's own pixels (any size, 1x1 included).
    """
    image = image.convert("RGB")
    width, height = image.size
    frame = max(width, height)  # the encoder's square input, in the image's pixels
    panels = []
    for stage, kept in enumerate(kept_token_maps):
        frozen = Image.fromarray((~kept.cpu()).numpy().astype(np.uint8) * 170, mode="L")
        shade = frozen.resize((frame, frame), Image.Resampling.NEAREST).crop((0, 0, width, height))
        panel = Image.composite(Image.new("RGB", image.size, (0, 0, 0)), image, shade)
        label = labels[stage] if labels else f"stage {stage + 1}: kept {int(kept.sum())}/{kept.numel()}"
        ImageDraw.Draw(panel).text((4, 4), label, fill=(255, 255, 0))
        panels.append(panel)
    if not panels:
        return image
    sheet = Image.new("RGB", (width * len(panels) + 4 * (len(panels) - 1), height), (255, 255, 255))
    for index, panel in enumerate(panels):
        sheet.paste(panel, (index * (width + 4), 0))
    return sheet


__all__ = ["mask_image", "overlay_mask", "pruning_map"]
