"""VLTP: Vision-Language Guided Token Pruning for Task-Oriented Segmentation, for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel

from .configuration_vltp import SAM_VISION_PRESETS, VLTPVisionConfig
from .flops import count_gmacs
from .modeling_vltp import (
    VLTPPreTrainedModel,
    VLTPPruneDecoder,
    VLTPSamVisionModel,
    VLTPVisionOutput,
    dice_loss,
    pruning_targets,
    soft_keep_mask,
    vltp_pruning_loss,
)

AutoConfig.register(VLTPVisionConfig.model_type, VLTPVisionConfig, exist_ok=True)
AutoModel.register(VLTPVisionConfig, VLTPSamVisionModel, exist_ok=True)

__all__ = [
    "SAM_VISION_PRESETS",
    "VLTPPreTrainedModel",
    "VLTPPruneDecoder",
    "VLTPSamVisionModel",
    "VLTPVisionConfig",
    "VLTPVisionOutput",
    "count_gmacs",
    "dice_loss",
    "pruning_targets",
    "soft_keep_mask",
    "vltp_pruning_loss",
]
