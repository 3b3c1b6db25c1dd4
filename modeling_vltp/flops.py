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
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


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


__all__ = ["count_call_gmacs", "count_gmacs"]
