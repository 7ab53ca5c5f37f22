"""Dynamic-LLaVA (Huang et al., ICLR 2025, arXiv 2412.00876) on the sparse-llava base.

Two learned predictors read the hidden states entering decoder layer `sparse_layer`:

* the image predictor scores each image token; at prefill every image keeps its top `floor(n * vision_keep_ratio)`
  tokens and layers `>= sparse_layer` run on the shortened sequence (their KV cache holds only kept tokens);
* the output-text predictor scores each generated token (logit 0 = keep, logit 1 = drop, as in the reference code).

The predictors' sub-module structure and shapes follow the reference implementation exactly, so the released
checkpoints' weights map onto them one to one.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .cache_sparse_llava import SparseCache
from .configuration_dynamic_llava import DynamicLlavaConfig
from .modeling_sparse_llava import SparseLlavaForConditionalGeneration, TokenStream


class PredictorSelfAttn(nn.Module):
    """Multi-head self-attention of the image predictor (fused `qkv` without bias, as in the reference)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        x = F.scaled_dot_product_attention(query, key, value, attn_mask=key_valid[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class PredictorMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm transformer block (timm ViT style: no layer scale, no dropout, no positional embedding)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PredictorSelfAttn(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PredictorMlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class ImageScorePredictor(nn.Module):
    """
    Scores the tokens of each image. Input `[images, tokens, hidden]` with `valid[images, tokens]` (images of
    different lengths are padded); output keep/drop logits `[images, tokens, 2]`.

    Each token's feature is split in half: a local half, and a global half averaged over the image's tokens.
    """

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__()
        dim = config.predictor_hidden_size
        self.down_mlp = nn.Sequential(
            nn.LayerNorm(config.text_config.hidden_size), nn.Linear(config.text_config.hidden_size, dim), nn.GELU()
        )
        self.transformer = nn.ModuleList(
            PredictorBlock(dim, config.predictor_num_heads, config.predictor_intermediate_size)
            for _ in range(config.predictor_num_layers)
        )
        self.output_mlp = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        policy = valid.unsqueeze(-1).to(hidden_states.dtype)
        x = self.down_mlp(hidden_states) * policy
        for block in self.transformer:
            x = block(x, valid)
        half = x.shape[-1] // 2
        local_features, global_features = x[..., :half], x[..., half:]
        global_features = (global_features * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp(min=1)
        x = torch.cat([local_features, global_features.expand_as(local_features)], dim=-1)
        return self.output_mlp(x)


class OutputTextScorePredictor(nn.Module):
    """Scores each generated token on its own: `[..., hidden]` -> keep/drop logits `[..., 2]`."""

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__()
        dim = config.predictor_hidden_size
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(config.text_config.hidden_size),
            nn.Linear(config.text_config.hidden_size, dim),
            nn.GELU(),
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output_mlp(hidden_states)


class DynamicLlavaForConditionalGeneration(SparseLlavaForConditionalGeneration):
    """
    Dynamic-LLaVA over a LLaVA-1.5 or LLaVA-NeXT base.

    At prefill, the image predictor runs once on the hidden states entering layer `config.sparse_layer`, and each
    image keeps its top `floor(n * config.vision_keep_ratio)` tokens (for LLaVA-NeXT an image's tokens are its base
    tile, high-resolution tiles and newline tokens). System and instruction tokens are never dropped. Layers from
    `sparse_layer` on run on the shortened sequence, so the KV cache of those layers holds only kept tokens; look at
    `past_key_values.stored_tokens(layer_idx)`.

    During decoding (`config.text_sparsification`), the output-text predictor reads each generated token at the same
    layer. Without a cache, past generated tokens it drops leave the sequence of layers `>= sparse_layer` (the newest
    token always stays). With a cache, each new token is computed and attends to itself and the cache, and its K/V
    is admitted to the caches of layers `>= sparse_layer` only if the predictor keeps it. Both compute the same
    thing: a token's decision depends on earlier tokens only, through the full layers below `sparse_layer`.
    """

    config_class = DynamicLlavaConfig
    config: DynamicLlavaConfig
    new_module_names = ("image_score_predictor", "output_text_score_predictor")

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__(config)
        self.image_score_predictor = ImageScorePredictor(config)
        self.output_text_score_predictor = OutputTextScorePredictor(config)
        self.post_init()

    def before_layer(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None) -> TokenStream:
        if self.training and torch.is_grad_enabled():
            raise NotImplementedError(
                "Dynamic-LLaVA's training forward (Gumbel-Softmax decisions with masked attention) is not implemented "
                "yet; use the model in eval mode"
            )
        if layer_idx != self.config.sparse_layer:
            return stream
        keep = None
        if stream.has_images and self.config.vision_keep_ratio < 1:
            keep = ~stream.is_image | self.select_image_tokens(stream)
        if self.config.text_sparsification and stream.has_output_tokens:
            admit = ~stream.is_output | self.output_tokens_to_keep(stream)
            if cache is None and stream.last_logits_only:
                # Generation without a cache re-runs the sequence each step: dropped past outputs leave it (the
                # newest token, whose logits are wanted, always stays). Only layers >= sparse_layer pay for them.
                newest = stream.valid & (stream.valid.flip(-1).cumsum(-1).flip(-1) == 1)
                keep = admit | newest if keep is None else keep & (admit | newest)
            else:
                # With a cache, or when every position's logits are wanted (teacher forcing): every token is
                # computed and attends to itself; later tokens see it, and the cache stores it, only if admitted.
                stream = replace(stream, admit=admit)
        return stream if keep is None else stream.select(keep)

    def output_tokens_to_keep(self, stream: TokenStream) -> torch.Tensor:
        """`[batch, slots]` bool: the output-text predictor keeps a token when its keep logit beats its drop logit."""
        logits = self.output_text_score_predictor(stream.hidden_states)
        return logits[..., 0] > logits[..., 1]

    def select_image_tokens(self, stream: TokenStream) -> torch.Tensor:
        """`[batch, slots]` bool: the image tokens each image keeps (top-k of the image predictor's keep score)."""
        is_image = stream.is_image
        lengths = torch.tensor(stream.image_lengths, device=is_image.device)
        image_of_token, offset_in_image = stream.image_index[is_image], stream.image_offset[is_image]

        num_images, longest = len(stream.image_lengths), max(stream.image_lengths)
        per_image = stream.hidden_states.new_zeros((num_images, longest, stream.hidden_states.shape[-1]))
        per_image[image_of_token, offset_in_image] = stream.hidden_states[is_image]
        valid = torch.arange(longest, device=is_image.device) < lengths[:, None]

        logits = self.image_score_predictor(per_image, valid)
        keep_score = F.log_softmax(logits.float(), dim=-1)[..., 0].masked_fill(~valid, -math.inf)
        num_kept = torch.tensor(
            [math.floor(n * self.config.vision_keep_ratio) for n in stream.image_lengths], device=is_image.device
        )
        # Stable sorting breaks ties by position, so a row gives the same choice alone or in any batch.
        rank = keep_score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        keep_per_image = rank < num_kept[:, None]

        keep = torch.zeros_like(is_image)
        keep[is_image] = keep_per_image[image_of_token, offset_in_image]
        return keep


__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "ImageScorePredictor",
    "OutputTextScorePredictor",
]
