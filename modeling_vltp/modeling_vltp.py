"""VLTP models: SAM's ViT with vision-language guided token pruning.

This file imports only torch, transformers and, relatively, the other model files: it is copied to the Hub next to the
weights so that `trust_remote_code=True` works without this package installed.

How pruning runs inside SAM's ViT (paper Sec. 4.2-4.4):

- Layers 1..l_1 run densely, exactly as transformers' `SamVisionEncoder` runs them.
- At each stage m (after layer l_m) the prune decoder scores all N tokens of the full 64x64 grid, including the tokens
  frozen at the previous stage (reactivation). The top K_m = N - round(r_m N) tokens go on; their indices are sorted so
  the packed tokens stay in raster order.
- Until the next stage, LayerNorm, qkv, proj and MLP run on a packed (B, K_m, C) tensor (gather by index, scatter back),
  so the pruned tokens really leave the computation. Pruned tokens keep their features unchanged.
- Attention: in windowed layers the packed qkv is scattered into SAM's padded window grid, whose empty places hold
  exactly what SAM's zero padding produces (the qkv bias), and the pruned places are masked as keys; so a kept token
  attends to the kept tokens of its own 14x14 window plus SAM's padding keys of that window. In global layers the kept
  tokens attend to all kept tokens. The decomposed relative-position bias is taken at each token's original
  coordinates. With every token kept this is SAM's computation.
- After the last layer every token is merged back into the grid and SAM's neck runs on the full grid.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel, SamMaskDecoderConfig
from transformers import initialization as init
from transformers.models.sam.modeling_sam import (
    SamLayerNorm,
    SamPositionalEmbedding,
    SamTwoWayTransformer,
    SamVisionEncoder,
    SamVisionLayer,
)
from transformers.utils import ModelOutput

from .configuration_vltp import VLTPVisionConfig, check_prune_rates


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
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The full-grid tokens (B, grid, grid, hidden_size) after the patch embedding and after every layer; pruned
        tokens hold their frozen features.
    """

    last_hidden_state: torch.FloatTensor | None = None
    token_scores: tuple[torch.FloatTensor, ...] | None = None
    keep_indices: tuple[torch.LongTensor, ...] | None = None
    keep_probs: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
        self.guidance_proj = (
            nn.Identity() if config.guidance_dim == hidden else nn.Linear(config.guidance_dim, hidden)
        )
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

    def image_positional_embeddings(self, dtype: torch.dtype) -> torch.Tensor:
        """SAM-style random-Fourier positional encoding of the token grid, (d, grid, grid)."""
        size = self.grid_size
        device = self.positional_embedding.positional_embedding.device
        centers = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        y, x = torch.meshgrid(centers, centers, indexing="ij")
        encoding = self.positional_embedding(torch.stack([x, y], dim=-1))
        return encoding.permute(2, 0, 1).to(dtype)

    def forward(self, image_tokens: torch.Tensor, guidance_embeds: torch.Tensor) -> torch.Tensor:
        """Relevance logits (B, grid * grid) of the tokens `image_tokens` (B, grid, grid, D) to the guidance (B, g)."""
        batch_size = image_tokens.shape[0]
        image = self.conv1(image_tokens.permute(0, 3, 1, 2))
        image = self.layer_norm2(self.conv2(self.layer_norm1(image)))
        guidance = self.guidance_proj(guidance_embeds.to(image.dtype))
        query = self.query_token.to(image.dtype).expand(batch_size, -1)
        tokens = torch.stack([query, guidance], dim=1)[:, None]  # (B, 1, 2, d): one "point batch" of two tokens
        positional = self.image_positional_embeddings(image.dtype).expand(batch_size, -1, -1, -1)
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


@dataclass
class _KeptTokens:
    """Index bookkeeping of one pruning stage, computed once and shared by all layers of the stage."""

    indices: torch.Tensor  # (B, K) sorted row-major indices into the grid
    rows: torch.Tensor  # (B, K)
    cols: torch.Tensor  # (B, K)
    padded_indices: torch.Tensor | None = None  # (B, K) indices into SAM's padded window grid
    window_key_bias: torch.Tensor | None = None  # (B * windows, 1, 1, window**2): 0 for keys, very negative if pruned


class VLTPPreTrainedModel(PreTrainedModel):
    config: VLTPVisionConfig
    config_class = VLTPVisionConfig
    base_model_prefix = "vltp"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SamVisionLayer", "VLTPPruneDecoder"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        # SAM's encoder is a `PreTrainedModel` of its own and initialises itself; this covers the prune decoder,
        # with a usable std (SAM's `initializer_range` of 1e-10 would start it without any signal).
        std = self.config.prune_decoder_initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, SamLayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SamPositionalEmbedding):
            init.normal_(module.positional_embedding, std=module.scale)
        elif isinstance(module, VLTPPruneDecoder):
            init.normal_(module.query_token, std=1.0)


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
    - The pruned tokens leave the computation: LayerNorm, qkv, proj and MLP run on a packed (B, K, C) tensor. K is fixed
      per stage, so shapes are static and batches of images with different kept sets work.
    - Training: the selection itself is the same hard top-K. When autograd records, each stage's output is gated by a
      straight-through version of the smoothed mask of Eq. 11 (`sigmoid((P_s - t_m) / T)`, value exactly 1 on kept
      tokens), so the segmentation loss reaches the prune decoder while the forward values stay those of inference;
      the pruning loss of Eq. 12 ([`vltp_pruning_loss`]) supervises `keep_probs` directly.
    """

    def __init__(self, config: VLTPVisionConfig):
        super().__init__(config)
        config.validate_pruning()
        self.vision_encoder = SamVisionEncoder(config)
        self.prune_decoder = VLTPPruneDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_encoder.patch_embed

    @property
    def grid_size(self) -> int:
        return self.config.image_size // self.config.patch_size

    def num_kept_tokens(self, prune_rate: float) -> int:
        """K = N - round(r N), at least one token."""
        num_tokens = self.grid_size**2
        return max(1, num_tokens - round(prune_rate * num_tokens))

    def forward(
        self,
        pixel_values: torch.Tensor,
        guidance_embeds: torch.Tensor | None = None,
        prune_rates: list[float] | tuple[float, ...] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> VLTPVisionOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Images as SAM's image processor prepares them (longest side resized, normalised, padded).
        guidance_embeds (`torch.FloatTensor` of shape `(batch_size, guidance_dim)`, *optional*):
            The vision-language guidance (the projected `[SEG]` hidden state). Without it nothing is pruned.
        prune_rates (`list[float]`, *optional*):
            One rate in [0, 1) per stage, overriding `config.prune_rates` for this call (the paper's zero-shot rate
            changes, Table 4).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        prune_rates = self._check_inputs(pixel_values, guidance_embeds, prune_rates)

        encoder = self.vision_encoder
        hidden_states = encoder.patch_embed(pixel_values)
        if encoder.pos_embed is not None:
            hidden_states = hidden_states + encoder.pos_embed
        all_hidden_states = (hidden_states,) if output_hidden_states else None

        pruning = guidance_embeds is not None and len(self.config.prune_layers) > 0
        stage_starts = list(self.config.prune_layers) if pruning else []
        boundaries = [0, *stage_starts, self.config.num_hidden_layers]
        token_scores, keep_indices, keep_probs = [], [], []
        for stage, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
            layers = encoder.layers[start:end]
            if stage == 0:
                hidden_states, all_hidden_states = self._run_dense(layers, hidden_states, all_hidden_states)
                continue
            scores = self.prune_decoder(hidden_states, guidance_embeds)
            num_keep = self.num_kept_tokens(prune_rates[stage - 1])
            kept = scores.topk(num_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
            probs = soft_keep_mask(scores, num_keep, self.config.prune_temperature)
            token_scores.append(scores)
            keep_indices.append(kept)
            keep_probs.append(probs)
            if num_keep == scores.shape[-1]:
                hidden_states, all_hidden_states = self._run_dense(layers, hidden_states, all_hidden_states)
            else:
                gate = _straight_through_gate(probs, kept) if torch.is_grad_enabled() and probs.requires_grad else None
                hidden_states, all_hidden_states = self._run_pruned(
                    layers, hidden_states, self._kept_tokens(kept, hidden_states.dtype), gate, all_hidden_states
                )

        last_hidden_state = encoder.neck(hidden_states)
        output = VLTPVisionOutput(
            last_hidden_state=last_hidden_state,
            token_scores=tuple(token_scores) if pruning else None,
            keep_indices=tuple(keep_indices) if pruning else None,
            keep_probs=tuple(keep_probs) if pruning else None,
            hidden_states=all_hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def _check_inputs(self, pixel_values, guidance_embeds, prune_rates) -> list[float]:
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {', '.join(map(str, expected))}) as SAM's image processor "
                f"prepares them (resized to longest side {config.image_size}, padded), got {tuple(pixel_values.shape)}."
            )
        if guidance_embeds is not None:
            expected_guidance = (pixel_values.shape[0], config.guidance_dim)
            if tuple(guidance_embeds.shape) != expected_guidance:
                raise ValueError(
                    f"guidance_embeds must have shape (batch_size, guidance_dim) = {expected_guidance}, one guidance "
                    f"per image, got {tuple(guidance_embeds.shape)}."
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
            padded = grid + (window - grid % window) % window
            kept.padded_indices = rows * padded + cols
            # Keys of the padded window grid: SAM's padding places are keys, grid places only where the token is kept.
            is_key = torch.ones(indices.shape[0], padded, padded, dtype=torch.bool, device=indices.device)
            is_key[:, :grid, :grid] = False
            is_key = is_key.flatten(1).scatter(1, kept.padded_indices, True).view(-1, padded, padded, 1)
            is_key = _window_partition(is_key, window).flatten(1)
            # Far below any logit yet finite, so that a window whose tokens are all pruned gives finite values and
            # gradients (its queries are discarded) instead of NaN.
            masked = torch.finfo(dtype).min / 2
            kept.window_key_bias = torch.zeros(is_key.shape, dtype=dtype, device=indices.device)
            kept.window_key_bias = kept.window_key_bias.masked_fill(~is_key, masked)[:, None, None, :]
        return kept

    def _run_dense(self, layers, hidden_states, all_hidden_states):
        for layer in layers:
            hidden_states = layer(hidden_states)
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states

    def _run_pruned(self, layers, hidden_states, kept: _KeptTokens, gate, all_hidden_states):
        batch_size, grid, _, channels = hidden_states.shape
        full = hidden_states.reshape(batch_size, grid * grid, channels)
        index = kept.indices[..., None].expand(-1, -1, channels)
        packed_in = full.gather(1, index)
        packed = packed_in
        for layer in layers:
            if layer.gradient_checkpointing and self.training and torch.is_grad_enabled():
                packed = torch.utils.checkpoint.checkpoint(
                    _packed_layer_forward, layer, packed, kept, grid, use_reentrant=False
                )
            else:
                packed = _packed_layer_forward(layer, packed, kept, grid)
            if all_hidden_states is not None:
                all_hidden_states += (full.scatter(1, index, packed).view_as(hidden_states),)
        if gate is not None:
            # Straight-through: `gate` is exactly 1 (so `packed` is unchanged) but carries the prune decoder's gradient.
            packed = packed * gate[..., None] + packed_in * (1 - gate[..., None])
        return full.scatter(1, index, packed).view_as(hidden_states), all_hidden_states


def _window_partition(hidden_states: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * windows, window * window, C), SAM's window order."""
    batch_size, height, width, channels = hidden_states.shape
    hidden_states = hidden_states.view(batch_size, height // window, window, width // window, window, channels)
    return hidden_states.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _window_unpartition(windows: torch.Tensor, window: int, batch_size: int, size: int) -> torch.Tensor:
    """Inverse of `_window_partition` for a square padded grid of side `size`: -> (B, size * size, C)."""
    channels = windows.shape[-1]
    windows = windows.view(batch_size, size // window, size // window, window, window, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(batch_size, size * size, channels)


def _packed_layer_forward(layer: SamVisionLayer, packed: torch.Tensor, kept: _KeptTokens, grid: int) -> torch.Tensor:
    """`SamVisionLayer.forward` on the kept tokens only: (B, K, C) -> (B, K, C)."""
    attn = layer.attn
    qkv = attn.qkv(layer.layer_norm1(packed))
    if layer.window_size > 0:
        attn_output = _packed_window_attention(attn, qkv, kept, layer.window_size, grid)
    else:
        attn_output = _packed_global_attention(attn, qkv, kept, grid)
    packed = packed + attn.proj(attn_output)
    return packed + layer.mlp(layer.layer_norm2(packed))


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B', L, 3C) -> three (B', heads, L, head_dim)."""
    batch_size, length, _ = qkv.shape
    return qkv.view(batch_size, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(attn_output: torch.Tensor) -> torch.Tensor:
    """(B', heads, L, head_dim) -> (B', L, C)."""
    batch_size, _, length, _ = attn_output.shape
    return attn_output.transpose(1, 2).reshape(batch_size, length, -1)


def _packed_window_attention(attn, qkv: torch.Tensor, kept: _KeptTokens, window: int, grid: int) -> torch.Tensor:
    batch_size, _, width3 = qkv.shape
    padded = grid + (window - grid % window) % window
    # SAM pads the LayerNorm output with zeros, so a padding place's qkv is the qkv bias.
    fill = attn.qkv.bias if attn.qkv.bias is not None else qkv.new_zeros(width3)
    canvas = fill.to(qkv.dtype).expand(batch_size, padded * padded, width3)
    canvas = canvas.scatter(1, kept.padded_indices[..., None].expand(-1, -1, width3), qkv)
    windows = _window_partition(canvas.view(batch_size, padded, padded, width3), window)
    query, key, value = _split_heads(windows, attn.num_attention_heads)
    bias = kept.window_key_bias
    if attn.use_rel_pos:
        num_windows, heads, length, head_dim = query.shape
        rel_pos = attn.get_decomposed_rel_pos(
            query.reshape(num_windows * heads, length, head_dim),
            attn.rel_pos_h,
            attn.rel_pos_w,
            (window, window),
            (window, window),
        )
        bias = bias + rel_pos.reshape(num_windows, heads, length, length)
    attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    attn_output = _window_unpartition(_merge_heads(attn_output), window, batch_size, padded)
    return attn_output.gather(1, kept.padded_indices[..., None].expand(-1, -1, attn_output.shape[-1]))


def _packed_global_attention(attn, qkv: torch.Tensor, kept: _KeptTokens, grid: int) -> torch.Tensor:
    query, key, value = _split_heads(qkv, attn.num_attention_heads)
    bias = None
    if attn.use_rel_pos:
        # Decomposed relative position at the original coordinates: bias[i, j] = q_i . R_h[h_i, h_j] + q_i . R_w[w_i, w_j]
        rel_h = attn.get_rel_pos(grid, grid, attn.rel_pos_h)[kept.rows]  # (B, K, grid, head_dim)
        rel_w = attn.get_rel_pos(grid, grid, attn.rel_pos_w)[kept.cols]
        table_h = torch.einsum("bnkc,bkgc->bnkg", query, rel_h.to(query.dtype))  # (B, heads, K, grid)
        table_w = torch.einsum("bnkc,bkgc->bnkg", query, rel_w.to(query.dtype))
        num_heads, num_kept = query.shape[1], query.shape[2]
        key_rows = kept.rows[:, None, None, :].expand(-1, num_heads, num_kept, -1)
        key_cols = kept.cols[:, None, None, :].expand(-1, num_heads, num_kept, -1)
        bias = table_h.gather(-1, key_rows) + table_w.gather(-1, key_cols)
    attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return _merge_heads(attn_output)


def _straight_through_gate(keep_probs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B, K) gate whose value is exactly 1 and whose gradient is that of the kept tokens' smoothed mask."""
    probs = keep_probs.gather(1, kept)
    return (probs - probs.detach()) + 1.0


def soft_keep_mask(token_scores: torch.Tensor, num_keep: int, temperature: float = 1.0) -> torch.Tensor:
    """The smoothed pruning mask of Eq. 11: `sigmoid((P_s - t) / temperature)`, t the `num_keep`-th highest score."""
    threshold = token_scores.detach().topk(num_keep, dim=-1).values[..., -1:]
    return torch.sigmoid((token_scores - threshold) / temperature)


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


__all__ = [
    "VLTPPreTrainedModel",
    "VLTPPruneDecoder",
    "VLTPSamVisionModel",
    "VLTPVisionOutput",
    "dice_loss",
    "pruning_targets",
    "soft_keep_mask",
    "vltp_pruning_loss",
]
