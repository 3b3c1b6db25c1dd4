"""VLTP: Vision-Language Guided Token Pruning for Task-Oriented Segmentation, for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel

from .configuration_vltp import SAM_VISION_PRESETS, VLTPVisionConfig

AutoConfig.register(VLTPVisionConfig.model_type, VLTPVisionConfig, exist_ok=True)

__all__ = ["SAM_VISION_PRESETS", "VLTPVisionConfig"]
