"""VLTP: Vision-Language Guided Token Pruning for Task-Oriented Segmentation, for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .cli import DEMO_MODEL_DIR
from .configuration_vltp import SAM_VISION_PRESETS, VLTPConfig, VLTPVisionConfig
from .flops import count_gmacs, vision_gmacs
from .modeling_vltp import (
    VLTPForTaskSegmentation,
    VLTPPreTrainedModel,
    VLTPPruneDecoder,
    VLTPSamSegmenter,
    VLTPSamVisionModel,
    VLTPSegmentationResult,
    VLTPTaskSegmentationOutput,
    VLTPVisionOutput,
    dice_loss,
    iou_prediction_loss,
    pruning_targets,
    select_tokens,
    vltp_pruning_loss,
)
from .processing_vltp import (
    DEFAULT_ANSWER,
    IMAGE_TOKEN,
    SEG_TOKEN,
    VLTPProcessor,
    add_vltp_special_tokens,
    resize_embeddings_for_tokenizer,
)

AutoConfig.register(VLTPVisionConfig.model_type, VLTPVisionConfig, exist_ok=True)
AutoModel.register(VLTPVisionConfig, VLTPSamVisionModel, exist_ok=True)
AutoConfig.register(VLTPConfig.model_type, VLTPConfig, exist_ok=True)
AutoModel.register(VLTPConfig, VLTPForTaskSegmentation, exist_ok=True)
AutoProcessor.register(VLTPConfig, VLTPProcessor, exist_ok=True)
# As transformers does for classes loaded with trust_remote_code: every save_pretrained / push_to_hub then writes an
# `auto_map` and copies the model files, so that what users share loads without this package (opt out with
# `save_pretrained(..., remote_code=False)`).
for _config_class in (VLTPVisionConfig, VLTPConfig):
    _config_class.register_for_auto_class("AutoConfig")
for _model_class in (VLTPSamVisionModel, VLTPForTaskSegmentation):
    _model_class.register_for_auto_class("AutoModel")
VLTPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DEFAULT_ANSWER",
    "DEMO_MODEL_DIR",
    "IMAGE_TOKEN",
    "SAM_VISION_PRESETS",
    "SEG_TOKEN",
    "VLTPConfig",
    "VLTPForTaskSegmentation",
    "VLTPProcessor",
    "VLTPSegmentationResult",
    "VLTPTaskSegmentationOutput",
    "add_vltp_special_tokens",
    "resize_embeddings_for_tokenizer",
    "VLTPPreTrainedModel",
    "VLTPPruneDecoder",
    "VLTPSamSegmenter",
    "VLTPSamVisionModel",
    "VLTPVisionConfig",
    "VLTPVisionOutput",
    "count_gmacs",
    "dice_loss",
    "iou_prediction_loss",
    "pruning_targets",
    "select_tokens",
    "vision_gmacs",
    "vltp_pruning_loss",
]
