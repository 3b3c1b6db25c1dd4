"""VLTP models: SAM's ViT with vision-language guided token pruning.

This file imports only torch, transformers and, relatively, the other model files: it is copied to the Hub next to the
weights so that `trust_remote_code=True` works without this package installed.

How pruning runs inside SAM's ViT (paper Sec. 4.2-4.4):

- Layers 1..l_1 run densely, exactly as transformers' `SamVisionEncoder` runs them.
- At each stage m (after layer l_m) the prune decoder scores all N tokens of the full 64x64 grid, including the tokens
  frozen at the previous stage (reactivation). The top K_m = N - round(r_m N) tokens go on; their indices are sorted so
  the packed tokens stay in raster order.
- Until the next stage, LayerNorm, qkv, proj and MLP run on a packed (B, K_m, C) tensor (gather by index, scatter
  back), so the pruned tokens really leave the computation. Pruned tokens keep their features unchanged.
- Attention: in windowed layers the packed qkv is scattered into SAM's padded window grid, whose empty places hold
  exactly what SAM's zero padding produces (the qkv bias), and the pruned places are masked as keys; so a kept token
  attends to the kept tokens of its own 14x14 window plus SAM's padding keys of that window. In global layers the kept
  tokens attend to all kept tokens. The decomposed relative-position bias is taken at each token's original
  coordinates. With every token kept this is SAM's computation.
- After the last layer every token is merged back into the grid and SAM's neck runs on the full grid.
"""

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel, SamMaskDecoderConfig
from transformers import initialization as init
from transformers.image_utils import is_valid_image
from transformers.models.sam.modeling_sam import (
    SamLayerNorm,
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPromptEncoder,
    SamTwoWayTransformer,
    SamVisionAttention,
    SamVisionEncoder,
    SamVisionLayer,
    SamVisionSdpaAttention,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .configuration_vltp import VLTPConfig, VLTPVisionConfig, check_prune_rates, without_remote_code


@dataclass
class VLTPVisionOutput(ModelOutput):
    r"""
    Output of [`VLTPSamVisionModel`].

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, output_channels, grid, grid)`):
        The image embeddings after SAM's neck (B, 256, 64, 64 at 1024x1024), every token merged back into the grid.
    token_scores (`tuple(torch.FloatTensor)`, one `(batch_size, grid * grid)` tensor per pruning stage):
        The prune decoder's relevance logits P_s (Eq. 10) of every token of the full grid, row-major. `None` without
        guidance.
    keep_indices (`tuple(torch.LongTensor)`, one `(batch_size, K_m)` tensor per pruning stage):
        Sorted row-major indices of the tokens that stage m kept. `None` without guidance.
    keep_probs (`tuple(torch.FloatTensor)`, one `(batch_size, grid * grid)` tensor per pruning stage):
        The smoothed pruning mask of Eq. 11, `sigmoid((P_s - t_m) / temperature)` with t_m the K_m-th highest score:
        what the pruning loss of Eq. 12 is computed on. `None` without guidance.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states` is given):
        The full-grid tokens (B, grid, grid, hidden_size) after the patch embedding and after every layer; pruned
        tokens hold their frozen features. With a list of indices, the entries not selected are `None`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True` with eager attention):
        One tensor per layer. Dense layers as in SAM: `(B * heads, L, L)` over the grid (global) or over each padded
        window's places (windowed, `B * windows * heads` rows). Pruned layers:
        - global: `(B * heads, K, K)`, the attention of each kept token over the kept tokens, both in the order of
          that stage's `keep_indices`;
        - windowed: `(B * windows * heads, window**2, window**2)` as SAM's; columns of pruned tokens are 0 (they are
          no keys); rows of pruned tokens are computed but discarded, like the rows of SAM's padding places.
    """

    last_hidden_state: torch.FloatTensor | None = None
    token_scores: tuple[torch.FloatTensor, ...] | None = None
    keep_indices: tuple[torch.LongTensor, ...] | None = None
    keep_probs: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VLTPTaskSegmentationOutput(ModelOutput):
    r"""
    Output of [`VLTPForTaskSegmentation`]. S is the number of `[SEG]` tokens in the batch (any number per sample).

    loss (`torch.FloatTensor`, *optional*, returned when `labels` or `masks` are given):
        `lm_loss_weight * lm_loss + mask_bce_loss_weight * mask_bce_loss + mask_dice_loss_weight * mask_dice_loss
        + prune_loss_weight * prune_loss + iou_loss_weight * iou_loss`.
    lm_loss, mask_bce_loss, mask_dice_loss, prune_loss, iou_loss (`torch.FloatTensor`, *optional*):
        The unweighted parts: LLaVA's next-token cross-entropy (with `labels`), the mask losses L_X, the pruning
        loss L_P of Eq. 12 (with `masks`; L_P only when pruning ran) and SAM's IoU loss (with `masks`: the squared
        error of `iou_scores` against the actual IoU of each thresholded mask, see [`iou_prediction_loss`]).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        LLaVA's next-token logits.
    pred_masks (`torch.FloatTensor` of shape `(S, mask_size, mask_size)`):
        Low-resolution mask logits (256x256 at 1024x1024 inputs), one per `[SEG]`.
    iou_scores (`torch.FloatTensor` of shape `(S,)`):
        SAM's predicted IoU of each mask (its IoU head; meaningful once trained with `iou_loss`).
    seg_embeds (`torch.FloatTensor` of shape `(S, guidance_dim)`):
        The projected `[SEG]` hidden states: the prune decoder's guidance and the mask decoder's prompt.
    seg_sample_indices (`torch.LongTensor` of shape `(S,)`):
        The sample each `[SEG]` belongs to.
    token_scores, keep_indices (`tuple(torch.Tensor)`, one `(S, ...)` tensor per pruning stage):
        As in [`VLTPVisionOutput`], per `[SEG]`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        LLaVA's language model, as [`LlavaForConditionalGeneration`] returns them: the input embeddings (image
        features in place of the image tokens) and the output of every decoder layer, each
        `(batch_size, sequence_length, hidden_size)`. SAM's ViT states are not included (at ViT-H they are
        64x64x1280 per layer and `[SEG]`): run `model.vision_model(..., output_hidden_states=True)` for them.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        LLaVA's language-model attention weights, one `(batch_size, num_heads, sequence_length, sequence_length)`
        tensor per decoder layer (needs an attention implementation that returns them, e.g. `"eager"`).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mask_bce_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None
    prune_loss: torch.FloatTensor | None = None
    iou_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    seg_embeds: torch.FloatTensor | None = None
    seg_sample_indices: torch.LongTensor | None = None
    token_scores: tuple[torch.FloatTensor, ...] | None = None
    keep_indices: tuple[torch.LongTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VLTPSegmentationResult:
    """What [`VLTPForTaskSegmentation.segment`] returns for one (image, task).

    mask: boolean (H, W) mask at the image's own size; empty when the answer has no `[SEG]` (the model says nothing
        fits) or when `score` is below `segment`'s `min_score`.
    score: SAM's predicted IoU of the mask decoded from `[SEG]` (`None` without `[SEG]`). It comes from SAM's IoU
        head, which tracks the real IoU only for a model trained with the IoU loss (`VLTPConfig.iou_loss_weight`).
    text: the generated answer. seg_found: whether the answer contained `[SEG]`.
    message: why the mask is empty (the model's answer without `[SEG]`, or the score below `min_score`), else `None`.
    kept_token_maps: one boolean (grid, grid) map per pruning stage, True where the ViT kept the token.
    """

    image_index: int
    task: str
    mask: torch.Tensor
    score: float | None
    text: str
    seg_found: bool
    kept_token_maps: list[torch.Tensor]
    message: str | None = None


class VLTPPruneDecoder(nn.Module):
    """The prune decoder F_prune (paper Fig. 3b, Eqs. 7-10).

    A neck reduces the ViT tokens from width D to d; a learned query token is concatenated with the guidance embedding
    (the projected `[SEG]` state); SAM's two-way transformer runs self-attention + MLP over the pair and two-way
    cross-attention with the image tokens; the relevance of each token is the inner product of the query's output
    with that token's output. One module serves every pruning stage.
    """

    def __init__(self, config: VLTPVisionConfig):
        super().__init__()
        hidden = config.prune_decoder_hidden_size
        self.grid_size = config.image_size // config.patch_size
        self.conv1 = nn.Conv2d(config.hidden_size, hidden, kernel_size=1, bias=False)
        self.layer_norm1 = SamLayerNorm(hidden, data_format="channels_first")
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = SamLayerNorm(hidden, data_format="channels_first")
        self.query_token = nn.Parameter(torch.zeros(1, hidden))
        self.guidance_proj = nn.Identity() if config.guidance_dim == hidden else nn.Linear(config.guidance_dim, hidden)
        transformer_config = SamMaskDecoderConfig(
            hidden_size=hidden,
            num_hidden_layers=config.prune_decoder_num_hidden_layers,
            num_attention_heads=config.prune_decoder_num_attention_heads,
            mlp_dim=config.prune_decoder_mlp_dim,
            attention_downsample_rate=config.prune_decoder_attention_downsample_rate,
            layer_norm_eps=config.layer_norm_eps,
        )
        transformer_config._attn_implementation = "eager"
        self.transformer = SamTwoWayTransformer(transformer_config)
        self.positional_embedding = SamPositionalEmbedding(_PositionalEmbeddingSize(hidden))

    def forward(self, image_tokens: torch.Tensor, guidance_embeds: torch.Tensor) -> torch.Tensor:
        """Relevance logits (B, grid * grid) of the tokens `image_tokens` (B, grid, grid, D) to the guidance (B, g)."""
        batch_size = image_tokens.shape[0]
        image = self.conv1(image_tokens.permute(0, 3, 1, 2))
        image = self.layer_norm2(self.conv2(self.layer_norm1(image)))
        guidance = self.guidance_proj(guidance_embeds.to(image.dtype))
        query = self.query_token.to(image.dtype).expand(batch_size, -1)
        tokens = torch.stack([query, guidance], dim=1)[:, None]  # (B, 1, 2, d): one "point batch" of two tokens
        positional = _grid_positional_encoding(self.positional_embedding, self.grid_size, image.device)
        positional = positional.to(image.dtype).expand(batch_size, -1, -1, -1)
        tokens_out, image_out = self.transformer(
            point_embeddings=tokens,
            image_embeddings=image,
            image_positional_embeddings=positional,
            attention_similarity=None,
        )
        # Eq. 10: inner product of the query token's output with every image token's output.
        return torch.einsum("bnd,bd->bn", image_out[:, 0], tokens_out[:, 0, 0])


@dataclass
class _PositionalEmbeddingSize:
    """The two fields `SamPositionalEmbedding` reads from a config."""

    hidden_size: int

    @property
    def num_pos_feats(self) -> int:
        return self.hidden_size // 2

    @property
    def scale(self) -> float:
        return self.hidden_size // 2


def _grid_positional_encoding(positional_embedding: SamPositionalEmbedding, size: int, device) -> torch.Tensor:
    """SAM's random-Fourier positional encoding of the centres of a size x size grid, (d, size, size). The coordinates
    are made on `device`, not next to the parameter, which offloading may keep on the meta device until
    `positional_embedding`'s own `forward` loads it."""
    centers = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(centers, centers, indexing="ij")
    return positional_embedding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


def select_tokens(token_scores: torch.Tensor, num_keep: int, temperature: float = 1.0):
    """Eq. 11: the sorted indices (B, K) of the `num_keep` highest-scoring tokens, and the smoothed pruning mask
    `sigmoid((P_s - t) / temperature)` (B, N), t being the `num_keep`-th highest score, used during training."""
    top = token_scores.topk(num_keep, dim=-1, sorted=False)
    threshold = top.values.detach().min(dim=-1, keepdim=True).values
    return top.indices.sort(dim=-1).values, torch.sigmoid((token_scores - threshold) / temperature)


def _straight_through_gate(keep_probs: torch.Tensor) -> torch.Tensor:
    """(B, N) gate whose value is exactly 1 and whose gradient is that of the smoothed mask. Applied to a stage's
    output it reaches only the kept tokens, since a pruned token's output equals its input."""
    return (keep_probs - keep_probs.detach()) + 1.0


@dataclass
class _KeptTokens:
    """Index bookkeeping of one pruning stage, computed once and shared by all layers of the stage."""

    indices: torch.Tensor  # (B, K) sorted row-major indices into the grid
    rows: torch.Tensor  # (B, K)
    cols: torch.Tensor  # (B, K)
    window_indices: torch.Tensor | None = None  # (B, K) places in SAM's padded grid laid out window by window
    window_key_bias: torch.Tensor | None = None  # (B * windows, 1, 1, window**2): 0 for keys, very negative if pruned

    def to(self, device, non_blocking: bool = False) -> "_KeptTokens":
        """A copy on `device`. accelerate's device hooks move a layer's inputs with this, so that a `device_map` may
        put the layers of one pruning stage on different devices."""
        moved = {
            field.name: value.to(device, non_blocking=non_blocking)
            for field in fields(self)
            if (value := getattr(self, field.name)) is not None
        }
        return replace(self, **moved)


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B', L, 3C) -> three (B', heads, L, head_dim)."""
    batch_size, length, _ = qkv.shape
    return qkv.view(batch_size, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(attn_output: torch.Tensor) -> torch.Tensor:
    """(B', heads, L, head_dim) -> (B', L, C)."""
    batch_size, _, length, _ = attn_output.shape
    return attn_output.transpose(1, 2).reshape(batch_size, length, -1)


class _PackedAttention:
    """Mixin for SAM's vision attention classes: with `kept_tokens` the attention runs on the kept tokens only.

    `hidden_states` is then the packed (B, K, C) LayerNorm output of the kept tokens (raster order), and the result is
    `(proj(attention output) (B, K, C), attention weights or None)`. Every parameter (qkv, proj, relative positions)
    is used inside this module's `forward`, so device hooks (accelerate's offload) and sharding wrappers see them.
    The eager class returns the weights, the SDPA class `None`, as SAM's own classes do:

    - global layer: `(B * heads, K, K)`, the attention of each kept token over the kept tokens (both in the order of
      `keep_indices`);
    - windowed layer: `(B * windows * heads, window**2, window**2)` over the places of SAM's padded window grid, as
      SAM's windowed layers return it; columns of pruned places are 0 (they are no keys), rows of pruned places are
      computed but discarded (their features do not change), like SAM's rows of padding places.
    """

    def __init__(self, config, window_size: int):
        super().__init__(config, window_size)
        self.window_size = window_size
        self.grid_size = config.image_size // config.patch_size

    def forward(self, hidden_states: torch.Tensor, kept_tokens: "_KeptTokens | None" = None, output_attentions=None):
        if kept_tokens is None:
            return super().forward(hidden_states)
        qkv = self.qkv(hidden_states)
        if self.window_size > 0:
            attn_output, attn_weights = self._packed_window_attention(qkv, kept_tokens)
        else:
            attn_output, attn_weights = self._packed_global_attention(qkv, kept_tokens)
        return self.proj(attn_output), attn_weights

    def _attend(self, query, key, value, bias):
        """Attention of (B', heads, L, head_dim) tensors with an additive bias; eager returns the weights too."""
        if isinstance(self, SamVisionSdpaAttention):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=bias), None
        logits = (query * self.scale) @ key.transpose(-2, -1) + bias
        attn_weights = F.softmax(logits, dtype=torch.float32, dim=-1).to(query.dtype)
        probs = F.dropout(attn_weights, p=self.dropout, training=self.training)
        return probs @ value, attn_weights.flatten(0, 1)

    def _packed_window_attention(self, qkv: torch.Tensor, kept: "_KeptTokens"):
        window = self.window_size
        batch_size, _, width3 = qkv.shape
        num_windows = kept.window_key_bias.shape[0] // batch_size
        # SAM pads the LayerNorm output with zeros: a padding place's qkv is qkv(0), the bias if there is one.
        fill = self.qkv(qkv.new_zeros(1, qkv.shape[-1] // 3))
        windows = fill.expand(batch_size, num_windows * window**2, width3)
        windows = windows.scatter(1, kept.window_indices[..., None].expand(-1, -1, width3), qkv)
        query, key, value = _split_heads(
            windows.view(batch_size * num_windows, window**2, width3), self.num_attention_heads
        )
        flat_windows, heads, length, head_dim = query.shape
        bias = kept.window_key_bias.expand(-1, heads, length, -1)
        if self.use_rel_pos:
            # SAM's decomposed relative position within a window, built so that the (windows, heads, L, L) bias comes
            # out contiguous (transformers' version leaves it strided, and reshaping it copies the largest tensor).
            grid_query = query.reshape(flat_windows * heads, window, window, head_dim)
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_query, self.get_rel_pos(window, window, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_query, self.get_rel_pos(window, window, self.rel_pos_w))
            rel_pos = rel_h.contiguous()[..., :, None] + rel_w.contiguous()[..., None, :]
            bias = rel_pos.view(flat_windows, heads, length, length).add_(kept.window_key_bias)
        attn_output, attn_weights = self._attend(query, key, value, bias)
        attn_output = _merge_heads(attn_output).reshape(batch_size, num_windows * window**2, -1)
        attn_output = attn_output.gather(1, kept.window_indices[..., None].expand(-1, -1, attn_output.shape[-1]))
        return attn_output, attn_weights

    def _packed_global_attention(self, qkv: torch.Tensor, kept: "_KeptTokens"):
        grid = self.grid_size
        query, key, value = _split_heads(qkv, self.num_attention_heads)
        bias = query.new_zeros(())
        if self.use_rel_pos:
            # Decomposed relative position at original coordinates: bias[i, j] = q_i R_h[h_i, h_j] + q_i R_w[w_i, w_j]
            rel_h = self.get_rel_pos(grid, grid, self.rel_pos_h)[kept.rows]  # (B, K, grid, head_dim)
            rel_w = self.get_rel_pos(grid, grid, self.rel_pos_w)[kept.cols]
            table_h = torch.einsum("bnkc,bkgc->bnkg", query, rel_h.to(query.dtype))  # (B, heads, K, grid)
            table_w = torch.einsum("bnkc,bkgc->bnkg", query, rel_w.to(query.dtype))
            num_heads, num_kept = query.shape[1], query.shape[2]
            key_rows = kept.rows[:, None, None, :].expand(-1, num_heads, num_kept, -1)
            key_cols = kept.cols[:, None, None, :].expand(-1, num_heads, num_kept, -1)
            bias = table_h.gather(-1, key_rows) + table_w.gather(-1, key_cols)
        attn_output, attn_weights = self._attend(query, key, value, bias)
        return _merge_heads(attn_output), attn_weights


class VLTPSamVisionAttention(_PackedAttention, SamVisionAttention):
    """SAM's eager vision attention, able to run on the kept tokens only (see `_PackedAttention`)."""


class VLTPSamVisionSdpaAttention(_PackedAttention, SamVisionSdpaAttention):
    """SAM's SDPA vision attention, able to run on the kept tokens only (see `_PackedAttention`)."""


VLTP_SAM_VISION_ATTENTION_CLASSES = {"eager": VLTPSamVisionAttention, "sdpa": VLTPSamVisionSdpaAttention}


class VLTPSamVisionLayer(SamVisionLayer):
    """`SamVisionLayer` that runs on the kept tokens only when given `kept_tokens`.

    Its parameters keep `SamVisionLayer`'s names. It is always called as a module, so forward hooks (output capture,
    accelerate's offload), FSDP2's `fully_shard` and transformers' gradient checkpointing (with the user's
    `gradient_checkpointing_kwargs`) apply to pruned layers exactly as to dense ones.
    """

    def __init__(self, config, window_size: int):
        super().__init__(config, window_size)
        self.attn = VLTP_SAM_VISION_ATTENTION_CLASSES[config._attn_implementation](config, window_size)

    def forward(self, hidden_states: torch.Tensor, kept_tokens: "_KeptTokens | None" = None) -> torch.Tensor:
        """(B, grid, grid, C) -> (B, grid, grid, C). With `kept_tokens`, LayerNorm, attention and MLP run on a packed
        (B, K, C) gather of the kept tokens, which are scattered back; the other tokens pass unchanged."""
        if kept_tokens is None:
            return super().forward(hidden_states)
        batch_size, grid, _, channels = hidden_states.shape
        full = hidden_states.reshape(batch_size, grid * grid, channels)
        index = kept_tokens.indices[..., None].expand(-1, -1, channels)
        packed = full.gather(1, index)
        attn_output, _ = self.attn(self.layer_norm1(packed), kept_tokens)
        packed = packed + attn_output
        packed = packed + self.mlp(self.layer_norm2(packed))
        return full.scatter(1, index, packed).view_as(hidden_states)


# Checkpoint files of at most this size: a 7B VLTP model (31 GB in float32) becomes 7 shards. transformers 5 defaults
# to 50GB, which would write it as a single file.
MAX_SHARD_SIZE = "5GB"


class VLTPPreTrainedModel(PreTrainedModel):
    config: VLTPVisionConfig
    config_class = VLTPVisionConfig
    base_model_prefix = "vltp"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["VLTPSamVisionLayer", "VLTPPruneDecoder"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def save_pretrained(
        self, save_directory, *args, max_shard_size: int | str = MAX_SHARD_SIZE, remote_code: bool = True, **kwargs
    ):
        """`PreTrainedModel.save_pretrained` (safetensors), sharded at `MAX_SHARD_SIZE` unless told otherwise. The
        package registers its classes for the Auto classes, so the folder (or the pushed repository) gets an
        `auto_map` and the model files and loads with `trust_remote_code=True` without this package; with
        `remote_code=False` it gets neither."""
        if remote_code:
            return super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size, **kwargs)
        with without_remote_code(self, self.config):
            return super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size, **kwargs)

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, SamPositionalEmbedding):
            init.normal_(module.positional_embedding, std=module.scale)
        elif isinstance(module, VLTPPruneDecoder):
            # Children are initialised first; the prune decoder then gets a usable std, since SAM's vision config
            # has an `initializer_range` of 1e-10 which would start it without any signal.
            std = self.config.prune_decoder_initializer_range
            for layer in module.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    init.normal_(layer.weight, std=std)
            init.normal_(module.query_token, std=1.0)


class VLTPSamVisionEncoder(SamVisionEncoder):
    """`SamVisionEncoder`'s modules and parameter names, with [`VLTPSamVisionLayer`]s as layers."""

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            self.layers[i] = VLTPSamVisionLayer(config, layer.window_size)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch embedding plus the absolute positions, (B, grid, grid, C). [`VLTPSamVisionModel`] runs the
        layers (pruning between them) and the neck itself; `pos_embed` is read here, in its own module's `forward`,
        where accelerate's offload hooks load it."""
        hidden_states = self.patch_embed(pixel_values)
        return hidden_states if self.pos_embed is None else hidden_states + self.pos_embed


def _check_image_indices(image_indices: torch.Tensor, num_images: int, per: str, source: str) -> None:
    """Refuse `image_indices` that is not one integer per `per` naming one of the `num_images` images of `source`."""
    if image_indices.dim() != 1 or image_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"image_indices must be a 1-D integer tensor (one image index per {per}), got dtype "
            f"{image_indices.dtype} and shape {tuple(image_indices.shape)}."
        )
    if _can_read_values(image_indices) and ((image_indices < 0) | (image_indices >= num_images)).any():
        raise ValueError(
            f"image_indices must be in [0, {num_images - 1}] (one of the {num_images} images of {source}), got "
            f"values from {image_indices.min().item()} to {image_indices.max().item()}."
        )


def _can_read_values(tensor: torch.Tensor) -> bool:
    """Whether input checks may read `tensor`'s values: not on the meta device (there are none), and not while
    `torch.compile` traces (a graph cannot branch on them)."""
    return tensor.device.type != "meta" and not torch.compiler.is_compiling()


class VLTPSamVisionModel(VLTPPreTrainedModel):
    """SAM's ViT image encoder with VLTP's vision-language guided token pruning.

    The ViT's parameters carry exactly `SamVisionModel`'s names (`vision_encoder.*`), so
    `VLTPSamVisionModel.from_pretrained(<SamVisionModel or SamModel checkpoint>, prune_layers=..., prune_rates=...)`
    loads SAM's weights and initialises only the prune decoder (`prune_decoder.*`).

    Semantics of `forward`:

    - Without guidance, or with every rate 0, the output is exactly `SamVisionModel`'s (with a rate of 0 the prune
      decoder still scores the tokens, and every token is kept).
    - At stage m the prune decoder scores all N tokens of the full grid (tokens frozen at the previous stage are
      re-evaluated); the top K_m = N - round(r_m N) go on (Eq. 11); the others keep their features unchanged until the
      next stage; after the last layer every token is merged back into the grid before the neck.
    - Kept tokens attend only to kept tokens: in windowed layers to the kept tokens of their own window plus SAM's
      padding keys of that window, in global layers to all kept tokens; relative positions come from each token's
      original coordinates.
    - The pruned tokens leave the computation: LayerNorm, qkv, proj and MLP run on a packed (B, K, C) tensor. K is
      fixed per stage, so shapes are static and batches of images with different kept sets work.
    - Training: the selection itself is the same hard top-K. When autograd records, each stage's output is gated by a
      straight-through version of the smoothed mask of Eq. 11 (`sigmoid((P_s - t_m) / T)`, value exactly 1 on kept
      tokens), so the segmentation loss reaches the prune decoder while the forward values stay those of inference;
      the pruning loss of Eq. 12 ([`vltp_pruning_loss`]) supervises `keep_probs` directly.
    """

    _can_record_outputs = {"hidden_states": VLTPSamVisionLayer, "attentions": SamVisionAttention}

    def __init__(self, config: VLTPVisionConfig):
        super().__init__(config)
        config.validate_pruning()
        self.vision_encoder = VLTPSamVisionEncoder(config)
        self.prune_decoder = VLTPPruneDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_encoder.patch_embed

    @property
    def grid_size(self) -> int:
        return self.config.image_size // self.config.patch_size

    def num_kept_tokens(self, prune_rate: float) -> int:
        """K = N - round(r N), at least one token (see [`VLTPVisionConfig.num_kept_tokens`])."""
        return self.config.num_kept_tokens(prune_rate)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        guidance_embeds: torch.Tensor | None = None,
        prune_rates: list[float] | tuple[float, ...] | None = None,
        image_indices: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VLTPVisionOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Images as SAM's image processor prepares them (longest side resized, normalised, padded).
        guidance_embeds (`torch.FloatTensor` of shape `(num_guidances, guidance_dim)`, *optional*):
            The vision-language guidance (the projected `[SEG]` hidden state). Without it nothing is pruned, and
            `prune_rates` is refused. Non-finite values are refused (they would make the kept set arbitrary).
        prune_rates (`list[float]`, *optional*):
            One rate in [0, 1) per stage, overriding `config.prune_rates` for this call (the paper's zero-shot rate
            changes, Table 4).
        image_indices (`torch.LongTensor` of shape `(num_guidances,)`, *optional*):
            The image of `pixel_values` each guidance belongs to, for several guidances (tasks) per image. The patch
            embedding and the layers before the first stage that prunes (a stage at rate 0 keeps every token) do not
            depend on the guidance: they run once per image, and their output is then repeated for each of its
            guidances (`index_select`); from that stage on the layers run once per guidance, and every output has one
            row per guidance. Without it guidance `s` belongs to image `s` (`num_guidances == batch_size`). Hidden
            states and attentions of the layers that run once per image have one row per image.
        output_hidden_states (`bool` or `list[int]`, *optional*):
            As in transformers: `True` for every hidden state, or the indices of those to return (the others are
            `None`).
        output_attentions (`bool`, *optional*):
            Return each layer's attention weights (eager attention only, as in SAM); for pruned layers see
            [`VLTPVisionOutput.attentions`].
        """
        prune_rates = self._check_inputs(pixel_values, guidance_embeds, prune_rates, image_indices)
        encoder = self.vision_encoder
        hidden_states = encoder(pixel_values)

        pruning = guidance_embeds is not None and len(self.config.prune_layers) > 0
        stage_starts = list(self.config.prune_layers) if pruning else []
        boundaries = [0, *stage_starts, self.config.num_hidden_layers]
        token_scores, keep_indices, keep_probs = [], [], []
        # One row per image until a stage prunes: what runs before does not depend on the guidance.
        per_image = image_indices is not None
        for stage, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
            layers = encoder.layers[start:end]
            kept = None
            if stage > 0:
                # The prune decoder scores every guidance's tokens, even where the stage then keeps them all.
                guided = hidden_states.index_select(0, image_indices) if per_image else hidden_states
                scores = self.prune_decoder(guided, guidance_embeds)
                indices, probs = select_tokens(
                    scores, self.num_kept_tokens(prune_rates[stage - 1]), self.config.prune_temperature
                )
                token_scores.append(scores)
                keep_indices.append(indices)
                keep_probs.append(probs)
                if indices.shape[-1] < scores.shape[-1]:  # with every token kept the stage runs densely
                    hidden_states, per_image = guided, False
                    kept = self._kept_tokens(indices, hidden_states.dtype)
            stage_input = hidden_states
            for layer in layers:
                hidden_states = layer(hidden_states, kept)
            if kept is not None and torch.is_grad_enabled() and keep_probs[-1].requires_grad:
                # Straight-through: the gate is exactly 1 (values unchanged) but carries the prune decoder's gradient.
                gate = _straight_through_gate(keep_probs[-1]).view(*hidden_states.shape[:-1], 1)
                hidden_states = hidden_states * gate + stage_input * (1 - gate)

        image_embeddings = encoder.neck(hidden_states)
        if per_image:
            image_embeddings = image_embeddings.index_select(0, image_indices)
        return VLTPVisionOutput(
            last_hidden_state=image_embeddings,
            token_scores=tuple(token_scores) if pruning else None,
            keep_indices=tuple(keep_indices) if pruning else None,
            keep_probs=tuple(keep_probs) if pruning else None,
        )

    def _check_inputs(self, pixel_values, guidance_embeds, prune_rates, image_indices) -> list[float]:
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {', '.join(map(str, expected))}) as SAM's image "
                f"processor prepares them (resized to longest side {config.image_size}, padded), got "
                f"{tuple(pixel_values.shape)}."
            )
        num_images = pixel_values.shape[0]
        if image_indices is not None:
            if guidance_embeds is None:
                raise ValueError("image_indices maps guidances to images, so it needs guidance_embeds.")
            _check_image_indices(image_indices, num_images, "guidance", "pixel_values")
        if guidance_embeds is not None:
            if image_indices is None:
                expected_guidance, rows = (num_images, config.guidance_dim), "one guidance per image"
            else:
                expected_guidance, rows = (image_indices.shape[0], config.guidance_dim), "one per image index"
            if tuple(guidance_embeds.shape) != expected_guidance:
                raise ValueError(
                    f"guidance_embeds must have shape (num_guidances, guidance_dim) = {expected_guidance}, {rows}, "
                    f"got {tuple(guidance_embeds.shape)}."
                )
            if _can_read_values(guidance_embeds) and not torch.isfinite(guidance_embeds).all():
                raise ValueError(
                    "guidance_embeds holds NaN or infinite values: the prune decoder's scores, and so the kept "
                    "tokens, would be arbitrary."
                )
        elif prune_rates is not None and any(float(rate) > 0 for rate in prune_rates):
            # Refused rather than ignored: a caller passing rates expects pruning, and would otherwise time or
            # evaluate the dense model without noticing. All-zero rates ask for the dense computation, which runs.
            raise ValueError(
                f"prune_rates {list(prune_rates)} were given without guidance_embeds, but nothing is pruned without "
                "guidance: pass guidance_embeds, or leave prune_rates out (or all 0) for the dense encoder."
            )
        if prune_rates is None:
            return list(config.prune_rates)
        check_prune_rates(prune_rates, len(config.prune_layers))
        return [float(rate) for rate in prune_rates]

    def _kept_tokens(self, indices: torch.Tensor, dtype: torch.dtype) -> _KeptTokens:
        grid = self.grid_size
        rows, cols = indices // grid, indices % grid
        kept = _KeptTokens(indices=indices, rows=rows, cols=cols)
        window = self.config.window_size
        if window > 0 and any(layer.window_size > 0 for layer in self.vision_encoder.layers):
            # SAM's padded window grid, laid out window by window (the order its window partition produces), so that
            # windowed layers scatter qkv straight into windows and gather their outputs straight back.
            per_side = -(-grid // window)
            place_in_window = (rows % window) * window + cols % window
            kept.window_indices = ((rows // window) * per_side + cols // window) * window**2 + place_in_window
            layout = torch.arange(per_side**2 * window**2, device=indices.device)
            window_of, place = layout // window**2, layout % window**2
            layout_rows = (window_of // per_side) * window + place // window
            layout_cols = (window_of % per_side) * window + place % window
            # Keys: SAM's padding places always (they hold the qkv bias), grid places only where the token is kept.
            is_padding = (layout_rows >= grid) | (layout_cols >= grid)
            is_key = is_padding.expand(indices.shape[0], -1).scatter(1, kept.window_indices, True)
            # Far below any logit yet finite, so that a window whose tokens are all pruned gives finite values and
            # gradients (its queries are discarded) instead of NaN.
            masked = torch.finfo(dtype).min / 2
            key_bias = torch.zeros(is_key.shape, dtype=dtype, device=indices.device).masked_fill(~is_key, masked)
            kept.window_key_bias = key_bias.view(-1, 1, 1, window**2)
        return kept


def pruning_targets(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """P_gt of Eqs. 13-14: 1 for every patch that holds at least one positive pixel of the ground-truth mask.

    `masks` (B, H, W) are in the encoder's input frame (H, W multiples of `patch_size`); the result is (B, N) with
    N = (H / P) * (W / P) in row-major order, idx = i * (W / P) + j (0-based).
    """
    if masks.dim() != 3 or masks.shape[-1] % patch_size or masks.shape[-2] % patch_size:
        raise ValueError(
            f"masks must have shape (batch_size, H, W) with H and W multiples of the patch size {patch_size}, "
            f"got {tuple(masks.shape)}."
        )
    patches = F.max_pool2d((masks > 0).float()[:, None], kernel_size=patch_size)
    return patches.flatten(1)


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of (B, ...) probabilities against {0, 1} targets, averaged over the batch."""
    probs, targets = probs.flatten(1), targets.flatten(1).to(probs.dtype)
    intersection = (probs * targets).sum(-1)
    return (1 - (2 * intersection + eps) / (probs.sum(-1) + targets.sum(-1) + eps)).mean()


def vltp_pruning_loss(keep_probs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
    """L_P of Eq. 12: binary cross-entropy + Dice of each stage's smoothed pruning mask against P_gt, summed over
    stages. `keep_probs` as returned by [`VLTPSamVisionModel`], `targets` from [`pruning_targets`]."""
    loss = targets.new_zeros(())
    for probs in keep_probs:
        probs = probs.float().clamp(1e-6, 1 - 1e-6)
        loss = loss + F.binary_cross_entropy(probs, targets.float()) + dice_loss(probs, targets)
    return loss


def iou_prediction_loss(
    iou_scores: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """SAM's IoU loss: mean squared error between the predicted IoUs (S,) and the actual IoU of each mask, thresholded
    at logit 0, with its {0, 1} target, over the pixels where `valid` is 1. The actual IoU is a target (no gradient);
    an empty mask of an empty target counts 1, as the metrics' `empty_target_iou` does."""
    with torch.no_grad():
        predicted = (mask_logits > 0) & (valid > 0)
        target = (targets > 0) & (valid > 0)
        intersection = (predicted & target).flatten(1).sum(-1).float()
        union = (predicted | target).flatten(1).sum(-1).float()
        actual = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return F.mse_loss(iou_scores.float(), actual)


def weighted_loss(config: VLTPConfig, parts: dict) -> torch.Tensor | None:
    """The training loss: the sum of the loss parts that were computed (not `None`), each times the config's
    `<name>_weight` (e.g. `mask_dice_loss_weight` for `mask_dice_loss`); `None` when no part was computed."""
    weighted = [getattr(config, f"{name}_weight") * part for name, part in parts.items() if part is not None]
    return sum(weighted) if weighted else None


class VLTPLinearProjector(nn.Module):
    """LLaVA-v1's vision-to-language projector, a single Linear (LISA's `mm_projector`); `VLTPConfig.projector`
    selects it instead of LLaVA-1.5's two-layer MLP."""

    def __init__(self, config):
        super().__init__()
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size * num_feature_layers,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


# What `VLTPForTaskSegmentation.forward` passes on to `LlavaForConditionalGeneration.forward`, besides the inputs it
# names itself. Left out on purpose: `inputs_embeds` (`[SEG]` is found in `input_ids`), `cache`/`past_key_values`
# (the teacher-forced pass reads `[SEG]` positions over the whole sequence) and `is_causal` (the prompt would see the
# answer).
_LLAVA_FORWARD_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "logits_to_keep",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_sizes",
        "mm_encoder_outputs",
        "num_items_in_batch",  # LLaVA's loss then sums over the batch and divides by it
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
)


@contextlib.contextmanager
def _offloaded_weights_loaded(module: nn.Module):
    """Loads the weights accelerate offloaded in `module` and its submodules for the whole block, and offloads them
    again after it: transformers' `SamMaskDecoder.forward` reads `iou_token.weight` and `mask_tokens.weight` without
    calling those modules, so their own offload hooks would never load them. The hooks (an `AlignDevicesHook` with
    `offload=True`, possibly inside a `SequentialHook`) are duck-typed: this file imports only torch and
    transformers. Without offloading this does nothing."""
    hooked = []
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            hooked.append((submodule, hook))
    for submodule, hook in hooked:
        hook.pre_forward(submodule)
    try:
        yield
    finally:
        for submodule, hook in hooked:
            hook.post_forward(submodule, None)


class VLTPSamModel(VLTPPreTrainedModel):
    """SAM's side of VLTP in `SamModel`'s layout: the pruned ViT (`vision_model`, a [`VLTPSamVisionModel`]),
    `shared_image_embedding`, `prompt_encoder` and `mask_decoder`, prompted by projected `[SEG]` embeddings, which
    also guide the pruning. It decodes masks, computes the losses L_X, L_P and SAM's IoU loss, and is what stage 2
    (VLTP@Finetune) trains from cached `[SEG]` embeddings without loading LLaVA.

    [`VLTPForTaskSegmentation`] is this model plus LLaVA and `text_hidden_fcs`, under the same parameter names, so
    `VLTPSamModel.from_pretrained(<VLTP checkpoint>)` loads SAM's side and skips LLaVA's weights.
    """

    config: VLTPConfig
    config_class = VLTPConfig
    main_input_name = "sam_pixel_values"
    _keys_to_ignore_on_load_unexpected = [r"^llava\.", r"^text_hidden_fcs\."]
    _tied_weights_keys = {
        "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"
    }

    def __init__(self, config: VLTPConfig):
        super().__init__(config)
        self._add_sam_modules(config)
        self.post_init()

    def _add_sam_modules(self, config: VLTPConfig):
        self.vision_model = VLTPSamVisionModel(config.vision_config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        config.mask_decoder_config._attn_implementation = "eager"
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # SAM's two copies of the positional encoding are one parameter whatever `tie_word_embeddings` says (which
        # is about LLaVA's word embeddings, and which peft's `merge_and_unload` resets).
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    def image_positional_embeddings(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """SAM's dense positional encoding of the image-embedding grid, (B, d, grid, grid), on the device of
        `image_embeddings`."""
        size = self.config.prompt_encoder_config.image_embedding_size
        encoding = _grid_positional_encoding(self.shared_image_embedding, size, image_embeddings.device)
        return encoding[None].expand(image_embeddings.shape[0], -1, -1, -1)

    def forward(
        self,
        sam_pixel_values: torch.Tensor,
        seg_embeds: torch.Tensor,
        masks: torch.Tensor | None = None,
        reshaped_input_sizes: torch.Tensor | None = None,
        prune_rates: list[float] | None = None,
        image_indices: torch.LongTensor | None = None,
    ) -> VLTPTaskSegmentationOutput:
        r"""
        sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The images as SAM's image processor prepares them.
        seg_embeds (`torch.FloatTensor` of shape `(num_tasks, guidance_dim)`):
            Projected `[SEG]` embeddings (e.g. from a cache of `VLTPForTaskSegmentation.seg_embeddings`): one per
            image, or any number per image with `image_indices`.
        masks (`torch.FloatTensor` of shape `(num_tasks, image_size, image_size)`, *optional*):
            One target per `[SEG]` embedding, in SAM's input frame; with them `loss` is L_X + L_P (Eq. 12) plus
            SAM's IoU loss, weighted by the config's mask, pruning and IoU loss weights.
        reshaped_input_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*), prune_rates:
            As in [`VLTPForTaskSegmentation.forward`], per image.
        image_indices (`torch.LongTensor` of shape `(num_tasks,)`, *optional*):
            The image of each `[SEG]` embedding, for several tasks per image: SAM's dense layers then run once per
            image. Without it embedding s belongs to image s. `seg_sample_indices` of the output repeats it.
        """
        seg_embeds = seg_embeds.to(self.dtype)
        if image_indices is None:
            pred_masks, iou_scores, vision = self.decode_masks(sam_pixel_values, seg_embeds, prune_rates)
            samples = torch.arange(len(seg_embeds), device=seg_embeds.device)
        else:
            pred_masks, iou_scores, vision = self._decode_by_image(
                sam_pixel_values, seg_embeds, image_indices, prune_rates
            )
            samples = image_indices
        losses = {}
        if masks is not None:
            losses = self._mask_losses(pred_masks, iou_scores, vision, masks, reshaped_input_sizes, samples)
        return self._segmentation_output(losses, pred_masks, iou_scores, seg_embeds, samples, vision)

    def decode_masks(
        self, sam_pixel_values: torch.Tensor, seg_embeds: torch.Tensor, prune_rates=None, image_indices=None
    ) -> tuple[torch.Tensor, torch.Tensor, VLTPVisionOutput]:
        """One mask per guidance: the pruned ViT guided by `seg_embeds` (S, d), then SAM's mask decoder prompted by
        them. `image_indices` (S,) names the image of `sam_pixel_values` each guidance belongs to (the ViT's layers
        before the first stage that prunes then run once per image); without it there is one image per guidance.
        Returns low-resolution mask logits (S, h, w), predicted IoUs (S,) and the vision output."""
        vision = self.vision_model(
            sam_pixel_values, guidance_embeds=seg_embeds, prune_rates=prune_rates, image_indices=image_indices
        )
        image_embeddings = vision.last_hidden_state
        num_masks = image_embeddings.shape[0]
        # SAM's no-mask prompt, read through the embedding's own forward: offloading loads its weight only there.
        no_mask = self.prompt_encoder.no_mask_embed(
            torch.zeros(1, 1, 1, dtype=torch.long, device=image_embeddings.device)
        )
        dense_embeddings = no_mask.permute(0, 3, 1, 2).expand(-1, -1, *image_embeddings.shape[-2:])
        positional = self.image_positional_embeddings(image_embeddings).to(image_embeddings.dtype)
        with _offloaded_weights_loaded(self.mask_decoder):
            masks, iou_scores = self.mask_decoder(
                image_embeddings=image_embeddings,
                image_positional_embeddings=positional,
                sparse_prompt_embeddings=seg_embeds[:, None, None, :].to(image_embeddings.dtype),
                dense_prompt_embeddings=dense_embeddings.to(image_embeddings.dtype).expand(num_masks, -1, -1, -1),
                multimask_output=False,
            )
        return masks[:, 0, 0], iou_scores[:, 0, 0], vision

    def _decode_by_image(self, sam_pixel_values, seg_embeds, image_indices, prune_rates=None, share: bool = True):
        """`decode_masks` with guidance s on image `image_indices[s]` of `sam_pixel_values`: SAM's dense layers run
        once per image that has a guidance, or once per guidance with `share=False` (the unshared reference)."""
        if not share:
            return self.decode_masks(sam_pixel_values[image_indices], seg_embeds, prune_rates)
        images, inverse = image_indices.unique(return_inverse=True)
        return self.decode_masks(sam_pixel_values[images], seg_embeds, prune_rates, inverse)

    def _mask_losses(self, pred_masks, iou_scores, vision, targets, reshaped_input_sizes, samples) -> dict:
        """L_X (LISA's mask BCE and Dice over each image's unpadded region), L_P (Eq. 12) and SAM's IoU loss, per
        `[SEG]`."""
        size = targets.shape[-1]
        logits = F.interpolate(pred_masks[:, None].float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
        targets = targets.float()
        valid = torch.ones_like(targets)
        if reshaped_input_sizes is not None:
            heights, widths = reshaped_input_sizes[samples].to(targets.device).unbind(-1)
            coords = torch.arange(size, device=targets.device)
            valid = (coords[None, :, None] < heights[:, None, None]) & (coords[None, None, :] < widths[:, None, None])
            valid = valid.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        bce = ((bce * valid).flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1)).mean()
        dice = dice_loss(torch.sigmoid(logits) * valid, targets * valid)
        prune = None
        if vision.keep_probs:
            prune = vltp_pruning_loss(
                vision.keep_probs, pruning_targets(targets, self.config.vision_config.patch_size)
            )
        iou = iou_prediction_loss(iou_scores, logits, targets, valid)
        return {"mask_bce_loss": bce, "mask_dice_loss": dice, "prune_loss": prune, "iou_loss": iou}

    def _segmentation_output(
        self, losses: dict, pred_masks, iou_scores, seg_embeds, samples, vision, llm=None
    ) -> VLTPTaskSegmentationOutput:
        """The output, with `loss` the config's weighted sum of the loss parts that were computed."""
        return VLTPTaskSegmentationOutput(
            loss=weighted_loss(self.config, losses),
            **losses,
            logits=None if llm is None else llm.logits,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
            seg_embeds=seg_embeds,
            seg_sample_indices=samples,
            token_scores=vision.token_scores,
            keep_indices=vision.keep_indices,
            hidden_states=None if llm is None else llm.hidden_states,
            attentions=None if llm is None else llm.attentions,
        )


# The former name of `VLTPSamModel`, kept so that code importing it still runs.
VLTPSamSegmenter = VLTPSamModel


class VLTPForTaskSegmentation(VLTPSamModel):
    """VLTP's task-oriented segmentation system (paper Sec. 3, Fig. 2): LLaVA reads the image and the task and answers
    with `[SEG]`; the projected hidden state of that answer (`text_hidden_fcs`, as in LISA) guides the token pruning
    inside SAM's ViT ([`VLTPSamVisionModel`]) and is the sparse prompt of SAM's mask decoder.

    It is [`VLTPSamModel`] (SAM's side) plus LLaVA. Parameters: `llava.*` (transformers'
    `LlavaForConditionalGeneration`), `text_hidden_fcs.*`, and [`VLTPSamModel`]'s at the top level: `vision_model.*`
    (the pruned SAM ViT) and, in `SamModel`'s layout, `shared_image_embedding.*`, `prompt_encoder.*` and
    `mask_decoder.*`, so that SAM's prompt encoder and mask decoder load by key.
    """

    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = ["VLTPSamVisionLayer", "VLTPPruneDecoder", "LlamaDecoderLayer", "CLIPEncoderLayer"]
    # The mask losses are per-batch means: transformers' Trainer must average the loss over gradient-accumulation
    # steps itself rather than hand `num_items_in_batch` to the model.
    accepts_loss_kwargs = False

    def __init__(self, config: VLTPConfig):
        # Not `VLTPSamModel.__init__`: LLaVA's modules come first, the parameter order of the existing checkpoints.
        VLTPPreTrainedModel.__init__(self, config)
        self.llava = LlavaForConditionalGeneration(config.llava_config)
        if config.projector == "linear":
            self.llava.model.multi_modal_projector = VLTPLinearProjector(config.llava_config)
        text_width = config.llava_config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, config.vision_config.guidance_dim)
        )
        self._add_sam_modules(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llava.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.llava.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llava.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.llava.set_output_embeddings(new_embeddings)

    def seg_positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample index, position of the hidden state that feeds SAM) of every `[SEG]` in `input_ids`."""
        if self.config.seg_token_id is None:
            raise ValueError(
                "config.seg_token_id is not set: add [SEG] to the tokenizer and set it (see VLTPProcessor)."
            )
        samples, positions = (input_ids == self.config.seg_token_id).nonzero(as_tuple=True)
        if self.config.seg_hidden_state == "before_seg":
            positions = positions - 1
        return samples, positions

    def seg_embeddings(self, input_ids, attention_mask=None, pixel_values=None, labels=None, **llava_kwargs):
        """LLaVA on a teacher-forced batch and the projected `[SEG]` states: returns LLaVA's output (its hidden states
        always computed, since `[SEG]`'s state is read from them), the embeddings (S, guidance_dim) that guide SAM,
        and the sample each `[SEG]` belongs to (S,). `llava_kwargs` go to `LlavaForConditionalGeneration.forward`."""
        llm = self.llava(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            labels=labels,
            output_hidden_states=True,
            return_dict=True,
            **llava_kwargs,
        )
        samples, positions = self.seg_positions(input_ids)
        seg_embeds = self.text_hidden_fcs(llm.hidden_states[self.config.seg_hidden_layer][samples, positions])
        return llm, seg_embeds, samples

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        masks: torch.FloatTensor | None = None,
        reshaped_input_sizes: torch.LongTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        prune_rates: list[float] | None = None,
        image_indices: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VLTPTaskSegmentationOutput | tuple:
        r"""
        input_ids, attention_mask, pixel_values, labels:
            LLaVA's inputs as [`VLTPProcessor`] prepares them (`pixel_values` for CLIP; `labels` -100 except on the
            answer).
        sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The same images prepared for SAM; with `image_indices`, each image once, `(num_images, 3, image_size,
            image_size)`.
        masks (`torch.FloatTensor` of shape `(batch_size, image_size, image_size)`, *optional*):
            Target masks in SAM's input frame (0/1, zero padding); every `[SEG]` of a sample is trained towards its
            sample's mask.
        reshaped_input_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            The unpadded (height, width) of each image in SAM's frame: the mask losses only count those pixels. With
            `image_indices`, one per image of `sam_pixel_values`, `(num_images, 2)`.
        original_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            Not used here (`post_process_masks` needs it); accepted so that a processor's whole output can be passed.
        prune_rates (`list[float]`, *optional*):
            Override the vision config's pruning rates for this call.
        image_indices (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            The image of `sam_pixel_values` each sample asks about, for batches holding several tasks of one image:
            SAM's ViT then runs once per image up to the first stage that prunes (see
            [`VLTPSamVisionModel.forward`]). Without it sample `b` has image `b`.
        output_hidden_states, output_attentions (`bool`, *optional*):
            Return LLaVA's language-model hidden states / attention weights (see [`VLTPTaskSegmentationOutput`]).
        kwargs:
            Passed on to [`LlavaForConditionalGeneration`]'s forward: `position_ids`, `use_cache`, `logits_to_keep`,
            `vision_feature_layer`, `vision_feature_select_strategy`, `image_sizes`, `mm_encoder_outputs`,
            `num_items_in_batch` and the packed-sequence arguments; any other name raises `TypeError`.
        """
        unknown = sorted(set(kwargs) - _LLAVA_FORWARD_KWARGS)
        if unknown:
            raise TypeError(
                f"VLTPForTaskSegmentation.forward got unexpected keyword arguments {unknown}; besides its own "
                f"arguments it passes on to LLaVA only {sorted(_LLAVA_FORWARD_KWARGS)}."
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch_size = input_ids.shape[0]
        if sam_pixel_values is None:
            raise ValueError("sam_pixel_values are required: the images as SAM's image processor prepares them.")
        per_sample = [("masks", masks)]
        if image_indices is None:
            per_sample.append(("sam_pixel_values", sam_pixel_values))
        else:
            per_sample.append(("image_indices", image_indices))
            _check_image_indices(image_indices, len(sam_pixel_values), "sample", "sam_pixel_values")
            if reshaped_input_sizes is not None and len(reshaped_input_sizes) != len(sam_pixel_values):
                raise ValueError(
                    f"With image_indices, reshaped_input_sizes gives each image of sam_pixel_values its size: "
                    f"{len(sam_pixel_values)} rows, got {len(reshaped_input_sizes)}."
                )
        for name, value in per_sample:
            if value is not None and value.shape[0] != batch_size:
                raise ValueError(f"{name} has batch size {value.shape[0]} but input_ids has {batch_size}.")
        image_size = self.config.vision_config.image_size
        if masks is not None and tuple(masks.shape[1:]) != (image_size, image_size):
            raise ValueError(
                f"masks must be (batch_size, {image_size}, {image_size}) in SAM's input frame (see VLTPProcessor), "
                f"got {tuple(masks.shape)}."
            )

        llm, seg_embeds, samples = self.seg_embeddings(
            input_ids, attention_mask, pixel_values, labels, output_attentions=output_attentions, **kwargs
        )
        if not output_hidden_states:
            llm.hidden_states = None
        losses = {"lm_loss": llm.loss}
        if len(samples) > 0:
            # The [SEG] of one image (of one sample, or of the samples `image_indices` gives it) share its dense
            # layers: they run once per image.
            images = samples if image_indices is None else image_indices[samples]
            pred_masks, iou_scores, vision = self._decode_by_image(sam_pixel_values, seg_embeds, images, prune_rates)
            if masks is not None:
                losses.update(
                    self._mask_losses(pred_masks, iou_scores, vision, masks[samples], reshaped_input_sizes, images)
                )
        else:  # no [SEG] in the batch: no mask to predict, and nothing for the mask losses
            mask_size = 4 * self.config.prompt_encoder_config.image_embedding_size
            pred_masks = seg_embeds.new_zeros(0, mask_size, mask_size)
            iou_scores = seg_embeds.new_zeros(0)
            vision = VLTPVisionOutput()
            if masks is not None:
                zero = seg_embeds.new_zeros(())
                losses.update(mask_bce_loss=zero, mask_dice_loss=zero, iou_loss=zero)
        output = self._segmentation_output(losses, pred_masks, iou_scores, seg_embeds, samples, vision, llm)
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def segment(
        self,
        images,
        tasks,
        processor,
        prune_rates: list[float] | None = None,
        max_new_tokens: int = 32,
        share_image_work: bool = True,
        max_batch_rows: int | None = None,
        min_score: float | None = None,
        **generate_kwargs,
    ) -> list[VLTPSegmentationResult]:
        """Segment what each task asks for in each image.

        `images` is one PIL image (then `tasks` is a task or a list of tasks for it) or a list of images (then `tasks`
        is one task for all, or a list with one task or list of tasks per image). Returns one
        [`VLTPSegmentationResult`] per (image, task), image by image. LLaVA generates with its KV cache, batched over
        every (image, task); the hidden state that feeds SAM is collected from the generation steps (the first `[SEG]`
        of each answer). A task whose answer has no `[SEG]` (the model says nothing fits) gets an empty mask,
        `seg_found=False` and a `message` quoting the answer. With `min_score`, a mask whose score (SAM's predicted
        IoU) is below it is emptied too: `seg_found` stays True, `score` is kept and `message` says so.

        With `share_image_work` (the default) the work that does not depend on the task is done once per image: CLIP
        and the projector, LLaVA's prefill of the prompt up to the last image token (each task continues from that KV
        cache; the prompt template must put the question after the image, else only the SAM side is shared), and
        SAM's ViT layers before the first stage that prunes (at rate 0, the whole ViT). `False` runs every
        (image, task) on its own, for debugging; both give the same results up to float rounding. `max_batch_rows`
        caps the number of (image, task) rows per forward pass, to bound memory: the rows run in chunks of at most
        that many, in order (an image whose tasks span two chunks is encoded in both). Extra keyword arguments go to
        `generate`.
        """
        pairs = self._check_segment_arguments(
            images, tasks, prune_rates, max_new_tokens, max_batch_rows, min_score, generate_kwargs
        )
        image_list = _as_list(images)
        rows_per_pass = max_batch_rows or len(pairs)
        results = []
        for start in range(0, len(pairs), rows_per_pass):
            results += self._segment_rows(
                image_list,
                pairs[start : start + rows_per_pass],
                processor,
                prune_rates,
                share_image_work,
                min_score,
                dict(max_new_tokens=max_new_tokens, **generate_kwargs),
            )
        return results

    def _check_segment_arguments(
        self, images, tasks, prune_rates, max_new_tokens, max_batch_rows, min_score, generate_kwargs
    ):
        """Every check of `segment`'s arguments, before any compute; returns the (image index, task) pairs."""
        pairs = _image_task_pairs(images, tasks)
        for index, image in enumerate(_as_list(images)):
            if not is_valid_image(image):
                raise ValueError(
                    f"images[{index}] is a {type(image).__name__}: give PIL images or (H, W, 3) arrays or tensors."
                )
        if prune_rates is not None:
            check_prune_rates(prune_rates, len(self.config.vision_config.prune_layers))
        for name, value in (("max_new_tokens", max_new_tokens), ("max_batch_rows", max_batch_rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_new_tokens is None:
            raise ValueError("max_new_tokens must be a positive integer, got None.")
        if min_score is not None and (
            isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score)
        ):
            raise ValueError(f"min_score must be a finite number (a predicted IoU, e.g. 0.5), got {min_score!r}.")
        reserved = sorted(set(generate_kwargs) & _SEGMENT_GENERATE_ARGUMENTS)
        if reserved:
            raise ValueError(f"segment sets {reserved} itself: they cannot be passed on to generate.")
        return pairs

    def _segment_rows(self, image_list, pairs, processor, prune_rates, share, min_score, generate_kwargs):
        """`segment` for one chunk of (image index, task) rows."""
        chunk_images = sorted({image for image, _ in pairs})
        local = {image: k for k, image in enumerate(chunk_images)}
        image_of_row = torch.tensor([local[image] for image, _ in pairs], device=self.device)
        # One preprocessing per image (the processor also checks the images); its prompts are not used.
        image_inputs = processor(
            images=[image_list[i] for i in chunk_images],
            tasks=[next(task for image, task in pairs if image == i) for i in chunk_images],
            return_tensors="pt",
        ).to(self.device)
        tokenizer = processor.tokenizer
        prompts = _tokenize_prompts(processor, [task for _, task in pairs])
        prefix_length = _shared_prefix_length(prompts, processor.image_token_id) if share else 0
        input_ids, attention_mask = _pad_prompts(prompts, prefix_length, tokenizer.pad_token_id, self.device)
        generate_kwargs = {
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **generate_kwargs,
        }
        clip_pixels = image_inputs["pixel_values"].to(self.dtype)
        if prefix_length:
            # The prompt up to the last image token is the same text for every row: prefill it once per image, and
            # let every task continue from its image's KV cache (pads sit between prefix and question, masked).
            prefix = self.llava(
                input_ids=input_ids[:1, :prefix_length].expand(len(chunk_images), -1),
                pixel_values=clip_pixels,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = prefix.cache
            cache.batch_select_indices(image_of_row)
            generate_kwargs.update(cache=cache)
        else:
            generate_kwargs.update(pixel_values=clip_pixels[image_of_row])
        generated = self.llava.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        new_tokens = generated.sequences[:, input_ids.shape[1] :]
        # The state at generation step k is the one that predicted new token k ("before_seg"); the [SEG] token's own
        # state is computed one step later ("seg").
        offset = 0 if self.config.seg_hidden_state == "before_seg" else 1
        rows_with_seg, hidden = [], []
        for row, tokens in enumerate(new_tokens.tolist()):
            if self.config.seg_token_id in tokens:
                step = tokens.index(self.config.seg_token_id) + offset
                if step < len(generated.hidden_states):
                    rows_with_seg.append(row)
                    hidden.append(generated.hidden_states[step][self.config.seg_hidden_layer][row, -1])
        if rows_with_seg:
            seg_embeds = self.text_hidden_fcs(torch.stack(hidden))
            seg_images = image_of_row[rows_with_seg]
            sam_pixels = image_inputs["sam_pixel_values"].to(self.dtype)
            mask_logits, iou_scores, vision = self._decode_by_image(
                sam_pixels, seg_embeds, seg_images, prune_rates, share
            )
            kept_maps = self._kept_token_maps(vision.keep_indices, len(rows_with_seg))
            masks = processor.post_process_masks(
                mask_logits.float(),
                image_inputs["original_sizes"][seg_images],
                image_inputs["reshaped_input_sizes"][seg_images],
            )

        results = []
        for row, (image_index, task) in enumerate(pairs):
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            found, message = row in rows_with_seg, None
            if found:
                k = rows_with_seg.index(row)
                mask, score, maps = masks[k].bool().cpu(), iou_scores[k].item(), [m[k].cpu() for m in kept_maps]
                if min_score is not None and score < min_score:
                    mask = torch.zeros_like(mask)
                    message = f"the mask's score {score:.3f} is below min_score {min_score:g}, so no mask"
            else:
                height, width = image_inputs["original_sizes"][local[image_index]].tolist()
                mask, score, maps = torch.zeros(height, width, dtype=torch.bool), None, []
                message = f"the model answered {text!r} without {self.config.seg_token}, so no mask"
            results.append(
                VLTPSegmentationResult(
                    image_index=image_index,
                    task=task,
                    mask=mask,
                    score=score,
                    text=text,
                    seg_found=found,
                    kept_token_maps=maps,
                    message=message,
                )
            )
        return results

    def _kept_token_maps(self, keep_indices, num_masks: int) -> list[torch.Tensor]:
        grid = self.vision_model.grid_size
        if keep_indices is None:
            return []
        return [
            torch.zeros(num_masks, grid * grid, dtype=torch.bool, device=kept.device)
            .scatter(1, kept, True)
            .view(num_masks, grid, grid)
            for kept in keep_indices
        ]


# What `segment` passes to `generate` itself.
_SEGMENT_GENERATE_ARGUMENTS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "cache",
        "past_key_values",
        "use_cache",
        "output_hidden_states",
        "return_dict_in_generate",
    }
)


def _tokenize_prompts(processor, tasks: list[str]) -> list[list[int]]:
    """The unpadded token ids of each task's chat prompt, `<image>` expanded as the processor expands it."""
    image_token = processor.tokenizer.convert_ids_to_tokens(processor.image_token_id)
    texts = [
        processor.build_prompt(task).replace(image_token, image_token * processor.num_image_tokens) for task in tasks
    ]
    return processor.tokenizer(texts)["input_ids"]


def _shared_prefix_length(prompts: list[list[int]], image_token_id: int) -> int:
    """Length of the prompt up to and including the last image token when every row has that same prefix (then it
    does not depend on the task and can be prefilled once per image), else 0."""
    first = prompts[0]
    if image_token_id not in first:
        return 0
    length = len(first) - first[::-1].index(image_token_id)
    return length if all(prompt[:length] == first[:length] for prompt in prompts) else 0


def _pad_prompts(prompts: list[list[int]], prefix_length: int, pad_token_id: int, device):
    """Batch prompts for generation, every row ending with its own last token: the pads of a row go right after the
    first `prefix_length` tokens (left padding when 0), masked. With the attention-mask-derived positions that
    `generate` uses, each token gets the same position in both layouts. Returns `input_ids`, `attention_mask`."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids, attention_mask = [], []
    for prompt in prompts:
        padding = longest - len(prompt)
        input_ids.append(prompt[:prefix_length] + [pad_token_id] * padding + prompt[prefix_length:])
        attention_mask.append([1] * prefix_length + [0] * padding + [1] * (len(prompt) - prefix_length))
    return torch.tensor(input_ids, device=device), torch.tensor(attention_mask, device=device)


def _as_list(items) -> list:
    """A list or tuple as a list; anything else as a one-item list."""
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _image_task_pairs(images, tasks) -> list[tuple[int, str]]:
    """Flatten `segment`'s (images, tasks) into (image index, task) pairs, image by image."""
    if not isinstance(images, (list, tuple)):
        per_image = [_as_list(tasks)]
    elif not isinstance(tasks, (list, tuple)):
        per_image = [[tasks]] * len(images)
    else:
        if len(tasks) != len(images):
            raise ValueError(
                f"Got {len(images)} images but {len(tasks)} task entries: give one task (or list of tasks) per "
                "image, or a single task for all."
            )
        per_image = [_as_list(entry) for entry in tasks]
    pairs = [(index, task) for index, entries in enumerate(per_image) for task in entries]
    if not pairs or not all(isinstance(task, str) and task.strip() for _, task in pairs):
        raise ValueError("Every task must be a non-empty string, and at least one task is needed.")
    return pairs


__all__ = [
    "MAX_SHARD_SIZE",
    "VLTPForTaskSegmentation",
    "VLTPSamModel",
    "VLTPSamSegmenter",
    "VLTPLinearProjector",
    "VLTPSegmentationResult",
    "VLTPTaskSegmentationOutput",
    "VLTPPreTrainedModel",
    "VLTPPruneDecoder",
    "VLTPSamVisionModel",
    "VLTPVisionOutput",
    "dice_loss",
    "iou_prediction_loss",
    "pruning_targets",
    "select_tokens",
    "vltp_pruning_loss",
    "weighted_loss",
]
