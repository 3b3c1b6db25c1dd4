"""Configurations of VLTP models.

This file imports only from transformers and, relatively, from the other model files: it is copied to the Hub
next to the weights so that `trust_remote_code=True` works without this package installed.
"""

import contextlib
import math

from transformers import LlavaConfig, PreTrainedConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig


@contextlib.contextmanager
def without_remote_code(*objects):
    """Within the block, saving `objects` (a model and its config, or a processor and its image processors) writes
    neither an `auto_map` nor the model files, although their classes are registered for the Auto classes: the classes
    are unregistered and the objects' `auto_map` (from an earlier save or load) hidden. Not thread-safe."""
    classes = {type(obj) for obj in objects}
    registered = {cls: cls.__dict__["_auto_class"] for cls in classes if "_auto_class" in cls.__dict__}
    auto_maps = {id(obj): obj.__dict__.pop("auto_map") for obj in objects if "auto_map" in obj.__dict__}
    for cls in classes:
        cls._auto_class = None
    try:
        yield
    finally:
        for cls in classes:
            if cls in registered:
                cls._auto_class = registered[cls]
            else:
                del cls._auto_class
        for obj in objects:
            if id(obj) in auto_maps:
                obj.auto_map = auto_maps[id(obj)]


def _sam_vision_preset(hidden_size, num_hidden_layers, num_attention_heads, global_attn_indexes):
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "global_attn_indexes": global_attn_indexes,
        "mlp_dim": 4 * hidden_size,
    }


# The three image encoders of Segment Anything, as `facebook/sam-vit-{base,large,huge}` define them.
SAM_VISION_PRESETS = {
    "vit_b": _sam_vision_preset(768, 12, 12, [2, 5, 8, 11]),
    "vit_l": _sam_vision_preset(1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": _sam_vision_preset(1280, 32, 16, [7, 15, 23, 31]),
}


class VLTPVisionConfig(SamVisionConfig):
    r"""
    Configuration of [`VLTPSamVisionModel`]: SAM's ViT image encoder ([`SamVisionConfig`], whose fields it keeps) with
    VLTP's prune decoder inserted after chosen layers.

    Pruning fields:

    prune_layers (`list[int]`, *optional*):
        1-based layer numbers after which a pruning stage starts, strictly increasing, each in
        `[1, num_hidden_layers - 1]`. `[16, 24]` on ViT-H means that layers 17-24 and 25-32 run on kept tokens only.
        Defaults to the layers after the 2nd and 3rd global-attention layer (the paper's choice), leaving out a layer
        that has no layer after it; no pruning when the encoder has fewer than three global-attention layers.
    prune_rates (`list[float]`, *optional*):
        The pruning rate r_m of each stage, `0 <= r < 1`: stage m keeps `N - round(r_m * N)` of the N tokens.
        Defaults to 0.5 for every stage. [`VLTPSamVisionModel.forward`] can override them per call.
    guidance_dim (`int`, *optional*, defaults to 256):
        Width of the guidance embedding (the projected `[SEG]` hidden state of the multimodal LLM).
    prune_decoder_hidden_size (`int`, *optional*, defaults to 256):
        Width d of the prune decoder; its neck reduces the ViT width D to d.
    prune_decoder_num_hidden_layers (`int`, *optional*, defaults to 2):
        Number of two-way attention blocks of the prune decoder.
    prune_decoder_num_attention_heads (`int`, *optional*, defaults to 8):
        Attention heads of the prune decoder; must divide `prune_decoder_hidden_size` and its cross-attention width
        `prune_decoder_hidden_size // prune_decoder_attention_downsample_rate`.
    prune_decoder_mlp_dim (`int`, *optional*, defaults to 2048):
        Hidden width of the prune decoder's MLPs.
    prune_decoder_attention_downsample_rate (`int`, *optional*, defaults to 2):
        Inner-width reduction of the prune decoder's cross-attentions (as in SAM's mask decoder).
    prune_decoder_initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the prune decoder's initial weights (SAM's own `initializer_range` is 1e-10, which
        would leave a freshly initialised prune decoder without signal).
    prune_temperature (`float`, *optional*, defaults to 1.0):
        Temperature of the sigmoid that smooths the top-k selection of Eq. 11 during training (finite, > 0). A higher
        one passes the losses' gradients to tokens further from the cut; stage 2 can set it (`prune_temperature` in
        its YAML config).

    The LayerNorms of the prune decoder's two-way transformer use this config's `layer_norm_eps`, the ViT's (1e-6 in
    SAM's configs): the prune decoder reuses transformers' `SamTwoWayTransformer`, which reads `layer_norm_eps` from
    its config as transformers' `SamMaskDecoder` does, and a vision config has one such field. Meta's
    `segment_anything` two-way transformer uses `nn.LayerNorm`'s default 1e-5 instead.

    Example:

    ```python
    >>> from modeling_vltp import VLTPVisionConfig, VLTPSamVisionModel

    >>> config = VLTPVisionConfig.vit_h()  # prunes after layers 16 and 24 at rate 0.5, as in the paper
    >>> model = VLTPSamVisionModel(config)
    ```
    """

    model_type = "vltp_sam_vision"

    prune_layers: list[int] | None = None
    prune_rates: list[float] | None = None
    guidance_dim: int = 256
    prune_decoder_hidden_size: int = 256
    prune_decoder_num_hidden_layers: int = 2
    prune_decoder_num_attention_heads: int = 8
    prune_decoder_mlp_dim: int = 2048
    prune_decoder_attention_downsample_rate: int = 2
    prune_decoder_initializer_range: float = 0.02
    prune_temperature: float = 1.0

    def __post_init__(self, **kwargs):
        if self.prune_layers is None:
            global_layers = sorted(self.global_attn_indexes)
            # 0-based global layer g is 1-based layer g + 1: the stage starts right after it.
            paper_layers = [g + 1 for g in global_layers[1:3]] if len(global_layers) >= 3 else []
            self.prune_layers = [layer for layer in paper_layers if layer < self.num_hidden_layers]
        self.prune_layers = [int(layer) for layer in self.prune_layers]
        if self.prune_rates is None:
            self.prune_rates = [0.5] * len(self.prune_layers)
        self.prune_rates = [float(rate) for rate in self.prune_rates]
        # A SAM checkpoint's config says "sam_vision_model"; once read into this class it is ours.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.validate_pruning()

    def num_kept_tokens(self, prune_rate: float) -> int:
        """K = N - round(r N): how many of the N = (image_size / patch_size)**2 tokens a stage at rate r keeps, at
        least one."""
        num_tokens = (self.image_size // self.patch_size) ** 2
        return max(1, num_tokens - round(prune_rate * num_tokens))

    def validate_pruning(self):
        """Raise `ValueError` naming the field if `prune_layers` / `prune_rates` are not a valid pruning plan."""
        layers, rates = list(self.prune_layers), list(self.prune_rates)
        if any(not 1 <= layer <= self.num_hidden_layers - 1 for layer in layers):
            raise ValueError(
                f"prune_layers must be 1-based layer numbers in [1, {self.num_hidden_layers - 1}] (a stage starts "
                f"after that layer and needs at least one layer to run), got {layers}."
            )
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"prune_layers must be strictly increasing (sorted, no duplicates), got {layers}.")
        check_prune_rates(rates, len(layers))
        check_prune_temperature(self.prune_temperature)
        sizes = ["prune_decoder_hidden_size", "prune_decoder_num_hidden_layers", "prune_decoder_num_attention_heads"]
        sizes += ["prune_decoder_mlp_dim", "prune_decoder_attention_downsample_rate", "guidance_dim"]
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        hidden, heads = self.prune_decoder_hidden_size, self.prune_decoder_num_attention_heads
        cross_width = hidden // self.prune_decoder_attention_downsample_rate
        if hidden % heads or cross_width % heads:
            raise ValueError(
                f"prune_decoder_num_attention_heads ({heads}) must divide prune_decoder_hidden_size ({hidden}) and "
                f"its cross-attention width prune_decoder_hidden_size // prune_decoder_attention_downsample_rate "
                f"({cross_width})."
            )

    @classmethod
    def vit_b(cls, **kwargs) -> "VLTPVisionConfig":
        """SAM ViT-B with the paper's pruning: after layers 6 and 9, rate 0.5 each."""
        return cls(**{**SAM_VISION_PRESETS["vit_b"], "prune_layers": [6, 9], "prune_rates": [0.5, 0.5], **kwargs})

    @classmethod
    def vit_l(cls, **kwargs) -> "VLTPVisionConfig":
        """SAM ViT-L with the paper's pruning: after layers 12 and 18, rate 0.5 each."""
        return cls(**{**SAM_VISION_PRESETS["vit_l"], "prune_layers": [12, 18], "prune_rates": [0.5, 0.5], **kwargs})

    @classmethod
    def vit_h(cls, **kwargs) -> "VLTPVisionConfig":
        """SAM ViT-H with the paper's pruning: after layers 16 and 24, rate 0.5 each."""
        return cls(**{**SAM_VISION_PRESETS["vit_h"], "prune_layers": [16, 24], "prune_rates": [0.5, 0.5], **kwargs})


def check_prune_rates(rates, num_stages: int, name: str = "prune_rates"):
    """Raise `ValueError` unless `rates` holds one rate in [0, 1) per pruning stage."""
    rates = list(rates)
    if len(rates) != num_stages:
        raise ValueError(f"{name} must give one rate per pruning stage ({num_stages}), got {len(rates)}: {rates}.")
    if any(not 0.0 <= float(rate) < 1.0 for rate in rates):
        raise ValueError(f"{name} must each be in [0, 1), got {rates}.")


def check_prune_temperature(temperature, name: str = "prune_temperature"):
    """Raise `ValueError` unless `temperature` (which divides the pruning scores) is a finite number > 0."""
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not 0 < temperature < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}.")


class VLTPConfig(PreTrainedConfig):
    r"""
    Configuration of [`VLTPForTaskSegmentation`]: LLaVA reads the image and the task and answers with `[SEG]`; the
    projected hidden state of that answer guides the pruning inside SAM's ViT and prompts SAM's mask decoder.

    llava_config (`LlavaConfig` or `dict`, *optional*):
        The multimodal LLM (transformers' LLaVA). Defaults to LLaVA-1.5-7B's architecture.
    vision_config (`VLTPVisionConfig` or `dict`, *optional*):
        SAM's ViT with the prune decoder. Defaults to ViT-H pruned after layers 16 and 24 at rate 0.5.
    prompt_encoder_config (`SamPromptEncoderConfig` or `dict`, *optional*):
        SAM's prompt encoder (only its dense "no mask" embedding is used: the `[SEG]` embedding is the sparse prompt).
    mask_decoder_config (`SamMaskDecoderConfig` or `dict`, *optional*):
        SAM's mask decoder.
    seg_token (`str`, *optional*, defaults to `"[SEG]"`):
        The text of the segmentation token.
    seg_token_id (`int`, *optional*):
        Its id in the tokenizer (set when the token is added, see [`add_vltp_special_tokens`]).
    seg_hidden_state (`str`, *optional*, defaults to `"before_seg"`):
        Which LLM position feeds SAM: `"before_seg"` (LISA's choice: the state that predicts `[SEG]`, i.e. at the
        position before it) or `"seg"` (the state of the `[SEG]` token itself).
    projector (`str`, *optional*, defaults to `"mlp"`):
        LLaVA's vision-to-language projector: `"mlp"` (LLaVA-1.5's Linear-GELU-Linear, transformers' own) or
        `"linear"` (a single Linear, as LLaVA-v1 and the LISA checkpoints that VLTP finetunes from have).
    seg_hidden_layer (`int`, *optional*, defaults to -1):
        Which LLM layer's hidden state is taken (-1: the last, as LISA does).
    lm_loss_weight, mask_bce_loss_weight, mask_dice_loss_weight (`float`, *optional*, defaults to 1.0, 2.0, 0.5):
        LISA's loss weights of the language-model cross-entropy, the mask binary cross-entropy and the mask Dice loss.
    prune_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the pruning loss L_P of Eq. 12 (added to the mask loss L_X as in the paper).
    iou_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of SAM's IoU loss: the mean squared error between the mask decoder's predicted IoU and the actual IoU
        of its mask (thresholded at logit 0) with the target, as SAM trains its IoU head (LISA does not train it).
        0 leaves the head untrained, as LISA does.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the initial weights of the projection and SAM's prompt encoder and mask decoder.
    """

    model_type = "vltp"
    sub_configs = {
        "llava_config": LlavaConfig,
        "vision_config": VLTPVisionConfig,
        "prompt_encoder_config": SamPromptEncoderConfig,
        "mask_decoder_config": SamMaskDecoderConfig,
    }

    llava_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    prompt_encoder_config: dict | PreTrainedConfig | None = None
    mask_decoder_config: dict | PreTrainedConfig | None = None
    seg_token: str = "[SEG]"
    seg_token_id: int | None = None
    seg_hidden_state: str = "before_seg"
    projector: str = "mlp"
    seg_hidden_layer: int = -1
    lm_loss_weight: float = 1.0
    mask_bce_loss_weight: float = 2.0
    mask_dice_loss_weight: float = 0.5
    prune_loss_weight: float = 1.0
    iou_loss_weight: float = 1.0
    initializer_range: float = 0.02
    # LLaVA's word embeddings follow `llava_config.tie_word_embeddings` (untied in LLaVA-1.5).
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name, config_class in self.sub_configs.items():
            value = getattr(self, name)
            if value is None:
                value = config_class.vit_h() if config_class is VLTPVisionConfig else config_class()
            elif isinstance(value, dict):
                value = config_class(**{k: v for k, v in value.items() if k != "model_type"})
            setattr(self, name, value)
        super().__post_init__(**kwargs)
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"projector must be 'mlp' or 'linear', got {self.projector!r}.")
        if self.seg_hidden_state not in ("before_seg", "seg"):
            raise ValueError(f"seg_hidden_state must be 'before_seg' or 'seg', got {self.seg_hidden_state!r}.")
        prompt_width = self.mask_decoder_config.hidden_size
        if self.vision_config.guidance_dim != prompt_width or self.prompt_encoder_config.hidden_size != prompt_width:
            raise ValueError(
                "vision_config.guidance_dim, prompt_encoder_config.hidden_size and mask_decoder_config.hidden_size "
                "must be equal: the projected [SEG] state is both the prune decoder's guidance and the mask decoder's "
                f"prompt; got {self.vision_config.guidance_dim}, {self.prompt_encoder_config.hidden_size} and "
                f"{prompt_width}."
            )

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """LLaVA's language-model config (what `LlavaConfig.get_text_config` returns): the text side of the system,
        whose `vocab_size` `resize_token_embeddings` updates and whose settings generation reads."""
        return self.llava_config.get_text_config(decoder=decoder, encoder=encoder)

    @classmethod
    def llava15_7b_sam_vit_h(cls, **kwargs) -> "VLTPConfig":
        """The paper's system: LLaVA-1.5-7B and SAM ViT-H, pruned after layers 16 and 24 at rate 0.5."""
        return cls(llava_config=_llava15_7b(), vision_config=VLTPVisionConfig.vit_h(), **kwargs)

    @classmethod
    def llava15_7b_sam_vit_l(cls, **kwargs) -> "VLTPConfig":
        """LLaVA-1.5-7B and SAM ViT-L, pruned after layers 12 and 18 at rate 0.5."""
        return cls(llava_config=_llava15_7b(), vision_config=VLTPVisionConfig.vit_l(), **kwargs)


def _llava15_7b() -> LlavaConfig:
    """`llava-hf/llava-1.5-7b-hf`'s architecture: CLIP ViT-L/14 at 336 px and Vicuna-7B (vocabulary 32064)."""
    return LlavaConfig(text_config={"model_type": "llama", "vocab_size": 32064}, image_token_index=32000)


__all__ = ["SAM_VISION_PRESETS", "VLTPConfig", "VLTPVisionConfig"]
