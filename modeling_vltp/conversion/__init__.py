"""Converting public checkpoints (Meta's and transformers' SAM, transformers' LLaVA, LISA) to VLTP checkpoints.

- `checkpoints`: checked loading, staged output, refusal of incomplete or foreign checkpoints;
- `sam`: [`convert_sam`] and SAM's reference checks (transformers' SAM, Meta's `segment_anything`);
- `llava`: [`convert_vltp`] (transformers' LLaVA + SAM) and the writing and self-checks every VLTP conversion shares;
- `lisa`: [`convert_lisa`] (LISA's layout).
"""

from .checkpoints import (
    CHECK_TOLERANCE,
    check_output_dir,
    from_pretrained_checked,
    read_state_dict,
    relative_error,
)
from .lisa import LISA_IMAGE_END, LISA_IMAGE_START, LISA_SYSTEM_PROMPT, convert_lisa, lisa_to_vltp_key
from .llava import CHECK_TASK, check_image, convert_vltp, load_llava, load_sam_for_vltp
from .sam import (
    PROMPT_MASK_DECODER_FOLDER,
    SAM_VARIANTS,
    SEGMENT_ANYTHING_LAYER_NORM_EPS,
    build_check_inputs,
    build_segment_anything,
    compare_sam_outputs,
    convert_sam,
    hf_sam_outputs,
    import_segment_anything_modeling,
    load_hf_sam,
    load_original_sam,
    original_to_hf_key,
    sam_config_for_variant,
    sam_from_original_state_dict,
    segment_anything_outputs,
    segment_anything_reference,
    vltp_vision_model_from_sam,
    with_segment_anything_eps,
)

__all__ = [
    "CHECK_TASK",
    "CHECK_TOLERANCE",
    "LISA_IMAGE_END",
    "LISA_IMAGE_START",
    "LISA_SYSTEM_PROMPT",
    "PROMPT_MASK_DECODER_FOLDER",
    "SAM_VARIANTS",
    "SEGMENT_ANYTHING_LAYER_NORM_EPS",
    "build_check_inputs",
    "build_segment_anything",
    "check_image",
    "check_output_dir",
    "compare_sam_outputs",
    "convert_lisa",
    "convert_sam",
    "convert_vltp",
    "from_pretrained_checked",
    "hf_sam_outputs",
    "import_segment_anything_modeling",
    "lisa_to_vltp_key",
    "load_hf_sam",
    "load_llava",
    "load_original_sam",
    "load_sam_for_vltp",
    "original_to_hf_key",
    "read_state_dict",
    "relative_error",
    "sam_config_for_variant",
    "sam_from_original_state_dict",
    "segment_anything_outputs",
    "segment_anything_reference",
    "vltp_vision_model_from_sam",
    "with_segment_anything_eps",
]
