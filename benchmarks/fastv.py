"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764), a training-free baseline.

Only for the benchmark (it is not shipped): at layer K (2) the image tokens that received the least attention from the
last prompt token in layer K-1 (post-softmax, averaged over heads) are dropped; the fraction R (50%) of each row's
image tokens goes, the rest keep their original positions for layers K.. as in FastV's KV-cache implementation.
"""

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from sparse_llava import SparseLlavaConfig
from sparse_llava.modeling_sparse_llava import SparseLlavaForConditionalGeneration, TokenStream


class FastVLlava(SparseLlavaForConditionalGeneration):
    config_class = SparseLlavaConfig

    def __init__(self, config: SparseLlavaConfig, layer: int = 2, drop_ratio: float = 0.5):
        super().__init__(config)
        self.fastv_layer, self.drop_ratio = layer, drop_ratio
        self._scoring_stream: TokenStream | None = None
        self.post_init()

    def before_layer(self, layer_idx: int, stream: TokenStream, cache) -> TokenStream:
        if not stream.has_images:
            return stream
        if layer_idx == self.fastv_layer - 1:
            self._scoring_stream = stream  # the input of layer K-1, whose attention ranks the image tokens
        if layer_idx != self.fastv_layer:
            return stream
        attention = self.last_token_attention(self.language_model.layers[layer_idx - 1], self._scoring_stream)
        is_image = stream.is_image & stream.valid
        score = attention.masked_fill(~is_image, -math.inf)
        num_kept = (is_image.sum(-1).double() * (1 - self.drop_ratio)).floor().long()
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        return stream.select(~is_image | (rank < num_kept[:, None]))

    @staticmethod
    def last_token_attention(decoder_layer, stream: TokenStream) -> torch.Tensor:
        """`[batch, slots]`: the last token's attention over the stream in `decoder_layer`, averaged over heads."""
        attention_module = decoder_layer.self_attn
        hidden = decoder_layer.input_layernorm(stream.hidden_states)
        batch, slots, _ = hidden.shape
        head_dim = attention_module.head_dim
        query = attention_module.q_proj(hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        key = attention_module.k_proj(hidden).view(batch, slots, -1, head_dim).transpose(1, 2)
        cos, sin = stream.position_embeddings
        query, _ = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
        key = repeat_kv(key, attention_module.num_key_value_groups)
        scores = (query @ key.transpose(-1, -2)) * attention_module.scaling  # [batch, heads, 1, slots]
        scores = scores.masked_fill(~stream.valid[:, None, None, :], -math.inf)
        return scores.softmax(-1).mean(1)[:, 0]
