"""Dynamic-LLaVA (Huang et al., ICLR 2025, arXiv 2412.00876) on the sparse-llava base.

Two learned predictors read the hidden states entering decoder layer `sparse_layer`:

* the image predictor scores each image token; at prefill every image keeps its top `floor(n * vision_keep_ratio)`
  tokens and layers `>= sparse_layer` run on the shortened sequence (their KV cache holds only kept tokens);
* the output-text predictor scores each generated token (logit 0 = keep, logit 1 = drop, as in the reference code).

In training (`model.train()`) no token is removed: the predictors' decisions are hard Gumbel-Softmax samples with
the straight-through estimator, and layers `>= sparse_layer` hide the dropped keys with a float keep policy multiplied
into their attention (the reference's MaskedSoftmax), so the language-modelling loss trains the predictors. A
regulariser pulls each mask's kept fraction towards its target ratio.

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

IGNORE_INDEX = -100  # label of the positions the language-modelling loss skips


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
        hidden_states = hidden_states.to(self.output_mlp[-1].weight.dtype)  # float32 in a half-precision model
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
        return self.output_mlp(hidden_states.to(self.output_mlp[-1].weight.dtype))  # float32 in a half model


class DynamicLlavaForConditionalGeneration(SparseLlavaForConditionalGeneration):
    """
    Dynamic-LLaVA over a LLaVA-1.5 or LLaVA-NeXT base.

    At prefill, the image predictor runs once on the hidden states entering layer `config.sparse_layer`, and each
    image keeps its top `floor(n * config.vision_keep_ratio)` tokens (for LLaVA-NeXT an image's tokens are its base
    tile, high-resolution tiles and newline tokens). System and instruction tokens are never dropped. Layers from
    `sparse_layer` on run on the shortened sequence, so the KV cache of those layers holds only kept tokens; look at
    `cache.stored_tokens(layer_idx)`.

    During decoding (`config.text_sparsification`), the output-text predictor reads each generated token at the same
    layer. Without a cache, past generated tokens it drops leave the sequence of layers `>= sparse_layer` (the newest
    token always stays), so a step costs less the more it drops; this needs only the last position's logits
    (`logits_to_keep=1`, as `generate()` asks), otherwise every token is computed and hidden from later ones. With a
    cache, each new token is computed and attends to itself and the cache, and its K/V is admitted to the caches of
    layers `>= sparse_layer` only if the predictor keeps it. All compute the same thing: a token's decision depends on
    earlier tokens only, through the full layers below `sparse_layer`.

    In training mode every token stays: the image tokens (when `vision_keep_ratio < 1`) and the tokens of each row's
    last answer (found from `labels`, when `text_sparsification` and the answer has at least
    `config.output_text_min_length` tokens) get hard Gumbel-Softmax keep decisions at temperature `self.gumbel_tau`
    (see `sparse_llava.training.GumbelTemperatureCallback`), which layers `>= sparse_layer` multiply into their
    attention. The loss adds `config.mask_loss_weight` times the squared gap between each mask's kept fraction and its
    target ratio, averaged over the batch (`loss_terms` holds the parts).
    """

    config_class = DynamicLlavaConfig
    config: DynamicLlavaConfig
    new_module_names = ("image_score_predictor", "output_text_score_predictor")
    # Loaded in half precision, the predictors keep float32 weights and run in float32 on the upcast hidden states:
    # their scores make the keep decisions (a top-k, a `keep > drop` comparison), which half-precision rounding turns
    # into ties and flips. They are small next to the language model (8.6M + 2.3M parameters for 7B).
    _keep_in_fp32_modules_strict = ["image_score_predictor", "output_text_score_predictor"]

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__(config)
        self.image_score_predictor = ImageScorePredictor(config)
        self.output_text_score_predictor = OutputTextScorePredictor(config)
        # Gumbel-Softmax temperature of the training decisions; a training schedule lowers it step by step.
        self.gumbel_tau = config.gumbel_tau_start
        self.post_init()

    def before_layer(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None) -> TokenStream:
        if layer_idx != self.config.sparse_layer:
            return stream
        if self.training:
            return self.sample_training_policy(stream)
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

    def image_keep_logits(self, stream: TokenStream):
        """
        The image predictor's keep/drop logits `[images, longest, 2]`, one row per image (shorter images padded), with
        `valid[images, longest]`; `logits[image_of_token, offset_in_image]` lists the image slots in row-major order.
        """
        is_image = stream.is_image
        lengths = torch.tensor(stream.image_lengths, device=is_image.device)
        image_of_token, offset_in_image = stream.image_index[is_image], stream.image_offset[is_image]

        num_images, longest = len(stream.image_lengths), max(stream.image_lengths)
        per_image = stream.hidden_states.new_zeros((num_images, longest, stream.hidden_states.shape[-1]))
        per_image = per_image.index_put((image_of_token, offset_in_image), stream.hidden_states[is_image])
        valid = torch.arange(longest, device=is_image.device) < lengths[:, None]
        return self.image_score_predictor(per_image, valid), valid, image_of_token, offset_in_image

    def select_image_tokens(self, stream: TokenStream) -> torch.Tensor:
        """`[batch, slots]` bool: the image tokens each image keeps (top-k of the image predictor's keep score)."""
        is_image = stream.is_image
        logits, valid, image_of_token, offset_in_image = self.image_keep_logits(stream)
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

    # ----------------------------------------------------------------------------------------------------------
    # Training: Gumbel-Softmax decisions with the straight-through estimator, applied as an attention policy.
    # ----------------------------------------------------------------------------------------------------------

    def sample_keep_decisions(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard 0/1 keep decisions from keep/drop `logits[..., 2]`; the gradient is the soft sample's (STE)."""
        return F.gumbel_softmax(logits.float(), tau=self.gumbel_tau, hard=True)[..., 0]

    def sample_training_policy(self, stream: TokenStream) -> TokenStream:
        """
        The stream layers `>= sparse_layer` see in training: every token, with a float `key_policy` (1 for text, the
        sampled decision for image tokens and for the last answer's tokens) and the mask regularisers.
        """
        policy = torch.ones_like(stream.valid, dtype=stream.hidden_states.dtype)
        losses = {}
        rows = torch.arange(stream.valid.shape[0], device=stream.valid.device)[:, None].expand_as(stream.valid)
        if stream.has_images and self.config.vision_keep_ratio < 1:
            logits, _, image_of_token, offset_in_image = self.image_keep_logits(stream)
            decisions = self.sample_keep_decisions(logits)[image_of_token, offset_in_image]  # image slots, row-major
            policy = policy.masked_scatter(stream.is_image, decisions.to(policy.dtype))
            kept_fraction, has_images = self.fraction_per_row(decisions, rows[stream.is_image], stream.is_image)
            gap = (self.config.vision_keep_ratio - kept_fraction[has_images]) ** 2
            losses["image_mask_loss"] = self.config.mask_loss_weight * gap.mean()
        if self.config.text_sparsification and stream.labels is not None:
            answer = last_answer_tokens(stream.labels) & stream.valid
            if answer.any():
                decisions = self.sample_keep_decisions(self.output_text_score_predictor(stream.hidden_states[answer]))
                kept_fraction, _ = self.fraction_per_row(decisions, rows[answer], answer)
                # Shorter answers keep every token, and their rows add nothing to the loss (the reference sets their
                # target to their own kept fraction); the predictor still runs on them, so that every parameter
                # takes part in every step, as DDP without `find_unused_parameters` needs.
                sparsified = answer.sum(-1) >= self.config.output_text_min_length
                decisions = torch.where(sparsified[rows[answer]], decisions, torch.ones_like(decisions))
                policy = policy.masked_scatter(answer, decisions.to(policy.dtype))
                gap = (self.config.output_text_keep_ratio - kept_fraction) ** 2 * sparsified
                losses["output_text_mask_loss"] = self.config.mask_loss_weight * gap.mean()
        if not losses:
            return stream
        return replace(
            stream,
            key_policy=policy,
            admit=policy.detach() > 0.5,
            auxiliary_losses={**stream.auxiliary_losses, **losses},
        )

    @staticmethod
    def fraction_per_row(decisions: torch.Tensor, row_of_decision: torch.Tensor, selected: torch.Tensor):
        """Per row, the mean of its `decisions` (0 where it has none), and whether it has any."""
        count = selected.sum(-1)
        kept = decisions.new_zeros(selected.shape[0]).index_add(0, row_of_decision, decisions)
        return kept / count.clamp(min=1), count > 0


def last_answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """
    `[batch, seq]` bool: the tokens of each row's last answer, the last run of positions whose label is not ignored
    (earlier turns' answers count as instructions, as in the reference).
    """
    in_answer = labels != IGNORE_INDEX
    answers_later = in_answer.flip(-1).cumsum(-1).flip(-1) > 0  # an answer token at or after this position
    breaks_later = (~in_answer & answers_later).flip(-1).cumsum(-1).flip(-1) > 0
    return in_answer & ~breaks_later


__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "ImageScorePredictor",
    "OutputTextScorePredictor",
]
