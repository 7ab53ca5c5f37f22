"""KV cache for LLaVA models whose layers hold different numbers of tokens.

Token dropping makes the cache ragged in two directions: across layers (a layer after the drop point holds fewer
entries than the layers before it) and across batch rows (rows keep different numbers of tokens). Following
transformers' own `DynamicSlidingWindowLayer`, each layer keeps two notions of length:

* logical: how many tokens of the conversation the layer has seen (`get_seq_length`); `generate()` uses it to slice
  already-cached inputs and to build positions, so it is the same in every layer;
* physical: how many slots the stored tensors have (`get_mask_sizes`, `get_query_offset`); the attention masks are
  sized from it.

Rows are held rectangular (`[batch, heads, slots, head_dim]`) with a per-row validity mask `valid[batch, slots]`;
the model turns it into the attention mask of that layer, so padding slots and holes are never attended to.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SparseCacheLayer(DynamicLayer):
    """One layer of a [`SparseCache`]: keys and values plus the validity of each stored slot."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.valid: torch.Tensor | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch_size = key_states.shape[0]
        self.keys = key_states.new_zeros((batch_size, key_states.shape[1], 0, key_states.shape[-1]))
        self.values = value_states.new_zeros((batch_size, value_states.shape[1], 0, value_states.shape[-1]))
        self.valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=key_states.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor, logical_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk; `valid[batch, chunk]` marks which of its slots hold a real token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.valid = torch.cat([self.valid, valid.to(self.valid.device)], dim=-1)
        self.cumulative_length += logical_length
        return self.keys, self.values

    @property
    def physical_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length + query_length, 0

    def stored_tokens(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.sum(-1)

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        super().reset()
        self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            super().reorder_cache(beam_idx)
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]
            self.valid = self.valid[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SparseCache cannot be cropped: after token dropping, the last logical tokens do not map to a fixed "
            "number of stored slots. Generation modes that roll back the cache (assisted / speculative decoding, "
            "DoLa) are not supported with sparse-llava models."
        )


class SparseCache(Cache):
    """
    The cache of sparse-llava models: one [`SparseCacheLayer`] per decoder layer.

    The model announces each chunk it is about to run through a layer with [`SparseCache.set_incoming`] (which slots
    are valid and how many logical tokens the chunk stands for); transformers' attention modules then call `update`
    as usual. Use `stored_tokens(layer_idx)` and `memory_bytes()` to see what each layer holds.
    """

    def __init__(self, num_layers: int | None = None, config=None):
        if num_layers is None:
            if config is None:
                raise ValueError("SparseCache needs `num_layers` or a `config`")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[SparseCacheLayer() for _ in range(num_layers)])
        self._incoming_valid: torch.Tensor | None = None
        self._incoming_logical_length = 0

    def set_incoming(self, valid: torch.Tensor, logical_length: int) -> None:
        """Describe the chunk the next `update` calls will append: `valid[batch, chunk]` and its logical length."""
        self._incoming_valid = valid
        self._incoming_logical_length = logical_length

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._incoming_valid is None:
            raise RuntimeError("SparseCache.update called without set_incoming(): use it with a sparse-llava model")
        return self.layers[layer_idx].update(
            key_states, value_states, self._incoming_valid, self._incoming_logical_length
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Masks are built in the physical index space of the layer (see module docstring).
        return self.layers[layer_idx].physical_length

    def physical_length(self, layer_idx: int) -> int:
        return self.layers[layer_idx].physical_length

    def valid_slots(self, layer_idx: int) -> torch.Tensor | None:
        """`valid[batch, slots]` of a layer, or None before the first update."""
        return self.layers[layer_idx].valid

    def stored_tokens(self, layer_idx: int) -> torch.Tensor:
        """LongTensor `[batch]`: how many tokens layer `layer_idx` holds for each row."""
        stored = self.layers[layer_idx].stored_tokens()
        if stored is None:
            raise ValueError(f"layer {layer_idx} of the cache holds nothing yet")
        return stored

    def memory_bytes(self) -> int:
        """Bytes held by keys and values in all layers (the physical, rectangular tensors)."""
        return sum(layer.memory_bytes() for layer in self.layers)
