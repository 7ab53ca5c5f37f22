"""p-MoD (Zhang et al., ICCV 2025, arXiv 2412.04449) on the sparse-llava base.

In each Mixture-of-Depths layer a router scores the routed (vision) tokens from the layer's input; every sample
keeps its top `trunc(n * R_l)` of them (in float32, as the reference; see `kept_token_count`), with the retention
ratio R_l decaying with depth (progressive ratio decay).
The decoder layer runs on the kept tokens and the text tokens only, so skipped tokens have no K/V in that layer.
Outputs follow the reference code (TanhNorm weight `w = 1 + 0.2 * tanh(r)`, symmetric re-weighting "STRing"):

| token | output of a MoD layer |
|---|---|
| kept vision token | `h + w * FFN(h)`, with `h = x + Attn(x)` |
| skipped vision token | `w * x` |
| text token | `h + FFN(h)` (the plain layer) |

so the router gets a gradient from kept and skipped tokens alike. Decode steps (text only) run every layer densely
over what each layer holds.
"""

from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .cache_sparse_llava import SparseCache
from .compat_transformers import CACHE_NAME, checkpointed_call
from .configuration_pmod import PMoDConfig
from .modeling_sparse_llava import SparseLlavaForConditionalGeneration, TokenStream, scatter_slots


def kept_token_count(num_routed: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    How many of `num_routed` tokens a MoD layer with retention ratio `ratio` keeps, with the reference's arithmetic:
    `trunc(n * R)` with `n` in float32 (the reference multiplies an int32 count by the Python float ratio, which
    torch computes in float32). A float64 `floor(n * R)` differs by one token at some counts (first at n = 2365 in
    layer 10 of the 32-layer schedule), and released routers were trained keeping exactly the float32 count.
    """
    return torch.trunc(num_routed.to(torch.float32) * ratio).long()


@dataclass
class RoutedStream(TokenStream):
    router_logits: torch.Tensor | None = None  # [batch, slots] the current MoD layer's router output


class TokenRouter(nn.Linear):
    """
    `hidden -> 1` router of a MoD layer (zero-initialised, as in the reference: every weight starts at 1).

    Its logits are computed in float32 whatever the model's dtype: they rank the tokens, and in bfloat16 (8 bits of
    mantissa) hundreds of vision tokens' logits tie, so the tie-break by position, not the router, would pick the
    kept tokens. The reference ranks in the model's dtype and has these ties; its notes advise ranking the raw logits
    instead (p_mod.md 7.5). In float32 models nothing changes.
    """

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float(), self.bias.float())


class PMoDLlavaForConditionalGeneration(SparseLlavaForConditionalGeneration):
    """
    p-MoD over a LLaVA-1.5 or LLaVA-NeXT base: vision tokens skip whole decoder layers in the layers listed in
    `config.mod_layers`, keeping `kept_token_count(n, config.retention_ratio(layer))` of each sample's `n` routed
    tokens. `cache.stored_tokens(layer_idx)` shows what each layer holds.
    """

    config_class = PMoDConfig
    config: PMoDConfig
    new_module_names = ("routers",)

    def __init__(self, config: PMoDConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.routers = nn.ModuleDict({str(layer): TokenRouter(hidden_size) for layer in config.mod_layers})
        self.post_init()
        if config.mod_layers:
            # Loaded in half precision, the routers keep their float32 weights (they are tiny): see `TokenRouter`. Set
            # on the instance, after `post_init`: transformers 4.57 refuses a class-level entry that names no parameter
            # (a model without MoD layers has no router).
            self._keep_in_fp32_modules_strict = {*(self._keep_in_fp32_modules_strict or ()), "routers"}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, TokenRouter):
            module.weight.zero_()
            module.bias.zero_()
        else:
            super()._init_weights(module)

    def before_layer(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None) -> TokenStream:
        if str(layer_idx) not in self.routers or not stream.has_images:
            return stream if stream.admit is None else replace(stream, admit=None, router_logits=None)
        # The router runs once per layer: its logits rank the tokens here and weigh them in `run_layer`.
        logits = self.routers[str(layer_idx)](stream.hidden_states).squeeze(-1)
        return RoutedStream.extend(stream, admit=self.route(layer_idx, stream, logits), router_logits=logits)

    def routed(self, stream: TokenStream) -> torch.Tensor:
        """`[batch, slots]` bool: the tokens routers may let skip layers."""
        routed = stream.is_image & stream.valid
        if self.config.routed_tokens == "vision_hr" and self.config.base_model_type == "llava_next":
            base_tile = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
            if self.config.vision_feature_select_strategy == "full":
                base_tile += 1  # the CLS token is kept
            routed &= stream.image_offset >= base_tile
        return routed

    def route(self, layer_idx: int, stream: TokenStream, logits: torch.Tensor) -> torch.Tensor:
        """
        `[batch, slots]` bool: the tokens layer `layer_idx` runs on (its top `kept_token_count` routed ones and text),
        from its router's `logits[batch, slots]`.
        """
        routed = self.routed(stream)
        logits = logits.detach()
        num_kept = kept_token_count(routed.sum(-1), self.config.retention_ratio(layer_idx))
        # Ranked by router logit; ties (e.g. untrained, zero-initialised routers) broken by position.
        score = logits.masked_fill(~routed, -torch.inf)
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        return ~routed | (rank < num_kept[:, None])

    def run_layer(self, layer_idx, decoder_layer, stream: TokenStream, cache: SparseCache | None, **kwargs):
        if stream.admit is None:
            return super().run_layer(layer_idx, decoder_layer, stream, cache, **kwargs)
        if stream.shortened:
            raise ValueError("p-MoD layers expect the full token stream")
        x = stream.hidden_states
        routed = self.routed(stream)
        # TanhNorm in float32, as the router's logits; it is cast to the model's dtype only where it scales states.
        weight = 1 + self.config.router_weight_scale * torch.tanh(stream.router_logits)

        # The decoder layer on the kept tokens only (their K/V alone enter this layer's cache).
        kept = replace(stream.select(stream.admit), admit=None)  # what remains is all kept
        attention_mask = self.layer_attention_mask(layer_idx, kept, cache)
        kept_weight = torch.where(self.routed(kept), weight.gather(1, kept.source_index), 1.0)
        block = partial(self.kept_tokens_block, decoder_layer, cache=cache, **kwargs)
        if decoder_layer.gradient_checkpointing and self.training and cache is None:
            # The layer's own checkpointing wrapper is bypassed here (its sub-modules are called), so apply it.
            kept_output = checkpointed_call(
                decoder_layer, block, kept.hidden_states, kept_weight, attention_mask, *kept.position_embeddings
            )
        else:
            kept_output = block(kept.hidden_states, kept_weight, attention_mask, *kept.position_embeddings)

        skipped_output = torch.where(routed.unsqueeze(-1), weight.unsqueeze(-1).to(x.dtype) * x, x)
        return scatter_slots(skipped_output, kept_output, kept.source_index, kept.valid)

    @staticmethod
    def kept_tokens_block(decoder_layer, hidden_states, weight, attention_mask, cos, sin, cache=None, **kwargs):
        """A decoder layer with its FFN branch scaled by `weight`: `h + w * FFN(h)`, `h = x + Attn(x)`."""
        attention, _ = decoder_layer.self_attn(
            hidden_states=decoder_layer.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            position_embeddings=(cos, sin),
            **kwargs,
        )
        h = hidden_states + attention
        ffn = decoder_layer.mlp(decoder_layer.post_attention_layernorm(h))
        return h + weight.unsqueeze(-1).to(ffn.dtype) * ffn


__all__ = ["PMoDLlavaForConditionalGeneration", "RoutedStream", "TokenRouter", "kept_token_count"]
