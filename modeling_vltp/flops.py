"""Counting the multiply-accumulates of a forward pass.

The paper's "GFLOPs" are multiply-accumulates (the fvcore convention: one multiply-add counts once), so the figures
here are torch's `FlopCounterMode` totals halved, in billions. Counting works on the meta device, where a full-size
ViT-H costs no compute and no memory:

```python
>>> import torch
>>> from modeling_vltp import VLTPSamVisionModel, VLTPVisionConfig, count_gmacs
>>> with torch.device("meta"):
...     model = VLTPSamVisionModel(VLTPVisionConfig.vit_h())
...     pixel_values = torch.empty(1, 3, 1024, 1024)
...     guidance = torch.empty(1, 256)
>>> round(count_gmacs(model, pixel_values, guidance_embeds=guidance))  # rates 0.5 / 0.5 after layers 16 and 24
```

[`vision_gmacs`] does this for a config at any rates.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .configuration_vltp import VLTPVisionConfig
from .modeling_vltp import VLTPSamVisionModel


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch has no formula for the CPU flash-attention kernel that `scaled_dot_product_attention` picks on the CPU, so it
# would count attention as free there; it costs what the other fused SDPA kernels cost.
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


def count_gmacs(model: torch.nn.Module, pixel_values: torch.Tensor, **forward_kwargs) -> float:
    """Multiply-accumulates of `model(pixel_values, **forward_kwargs)`, in billions (GMACs).

    Runs one forward pass without gradients under torch's `FlopCounterMode` (matrix products, convolutions and
    attention; element-wise work is not counted, as in the paper). Put the model and inputs on the meta device to
    count a full-size model for free.
    """
    return count_call_gmacs(model, pixel_values, **forward_kwargs)


def count_call_gmacs(function, *args, **kwargs) -> float:
    """Multiply-accumulates of any call `function(*args, **kwargs)`, in billions, counted as [`count_gmacs`] counts:
    for parts of a system (a language model's prefill over a KV cache, one decoding step, SAM's mask decoder)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops() / 2 / 1e9


def vision_gmacs(config: VLTPVisionConfig, prune_rates=None, image_size: int | None = None) -> float:
    """GMACs of one image through the pruned SAM ViT of `config` at `prune_rates` (default: the config's), prune
    decoder included, counted on the meta device; `image_size` overrides the config's. All rates 0 (or no pruning
    stage) counts SAM's plain ViT, without the prune decoder: the paper's baseline rows."""
    if image_size is not None:
        config = VLTPVisionConfig.from_dict({**config.to_dict(), "image_size": image_size})
    rates = [float(rate) for rate in (config.prune_rates if prune_rates is None else prune_rates)]
    with torch.device("meta"):
        model = VLTPSamVisionModel(config)
        pixel_values = torch.empty(1, config.num_channels, config.image_size, config.image_size)
        guidance = torch.empty(1, config.guidance_dim) if any(rates) else None
    return count_gmacs(model, pixel_values, guidance_embeds=guidance, prune_rates=rates)


__all__ = ["count_call_gmacs", "count_gmacs", "vision_gmacs"]
