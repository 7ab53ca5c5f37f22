"""KV cache for LLaVA models whose layers hold different numbers of tokens, with online admission.

Token dropping makes the cache ragged in two directions: across layers (a layer after the drop point holds fewer
entries than the layers before it) and across batch rows (rows keep different numbers of tokens). Following
transformers' own `DynamicSlidingWindowLayer`, each layer keeps two notions of length:

* logical: how many tokens of the conversation the layer has seen (`get_seq_length`); `generate()` uses it to slice
  already-cached inputs and to build positions, so it is the same in every layer;
* physical: how many slots the stored tensors have (`get_mask_sizes`, `get_query_offset`); attention masks are
  sized from it.

Each layer holds rectangular buffers `[batch, heads, capacity, head_dim]`, a per-row validity mask
`valid[batch, capacity]` (padding, holes and unused capacity are False, and attention never reads them), which of them
hold image tokens (`image[batch, capacity]`), and a per-row write pointer `next_slot[batch]`:

* a multi-token chunk (a prompt, a new user turn) is appended whole at the same column in every row;
* a single new token is written at its row's pointer, attends to what the row holds plus itself, and is *admitted*
  (kept for later tokens) only where the admission mask says so: the pointer moves on by 0 or 1 per row. This step
  is pure tensor code with no host synchronisation (see `write_token`), so it runs at full speed on CUDA.

Capacity comes in two kinds of layer, as transformers' `DynamicLayer` and `StaticLayer`, over one base
(`SparseCacheLayer`: buffers, writes, sizes, batch operations):

* growing (`GrowingSparseLayer`, the default): a prompt gets exactly the capacity it needs; during decoding capacity grows in blocks of
  `growth_block` slots. The host only learns how far the pointers got when the worst case (every token admitted since
  the last look) could overflow the buffer, i.e. at most once every `growth_block` steps. A layer holds little more
  than what it stores, and a decode step's attention reads its slots only up to that host-side bound on the pointers,
  but the shapes change, so a compiled decode step would recompile.
* fixed (`FixedSparseLayer`, `max_cache_len=N`, as transformers' `StaticCache`; `generate(..., cache_implementation="static")` makes one
  sized for the prompt and `max_new_tokens`): each layer's buffers are allocated once, at its first chunk, with room for
  `N` tokens of conversation: the slots that chunk stored plus one per token still to come, so a layer that dropped
  tokens at prefill gets a smaller buffer. A decode step then has static shapes and no host synchronisation at all (the
  logical length is a tensor, as in `StaticLayer`), so `torch.compile(model.forward, fullgraph=True)` captures it as
  one graph that runs for every step, and CUDA graphs can replay it (the buffers are marked as static addresses).
  A conversation longer than `max_cache_len` is refused with an error naming it wherever the host knows the length:
  at a multi-token chunk, and in eager decode steps, which count on the host. A compiled decode step cannot check
  (reading the length there would be a host synchronisation): writing past a layer's buffer then fails on the device
  (an index error on the CPU, a device-side assert on CUDA). `generate()` checks the prompt plus `max_new_tokens`
  before it starts, so its compiled steps never get there.

A cache holds one conversation: a chunk with another number of rows than the cache holds is refused (`reset()` empties
the cache for a new conversation), and `generate()` refuses a prompt that does not continue the conversation it holds.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

# The per-row token counts the models report for each layer (`TokenStream.token_counts`).
COUNT_NAMES = ("image_kept", "image_seen", "output_text_kept", "output_text_seen")


@dataclass
class IncomingChunk:
    """What the model is about to run through a layer: which slots are real tokens, and which to keep cached."""

    valid: torch.Tensor  # [batch, chunk] bool
    admit: torch.Tensor | None  # [batch, chunk] bool, or None to admit every valid slot
    logical_length: int  # number of input tokens the chunk stands for
    is_image: torch.Tensor | None = None  # [batch, chunk] bool: image tokens (None: the chunk has none)


def check_token_count(name: str, value):
    """`value` if it is None or a positive int (a number of tokens); otherwise a ValueError naming `name`."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int (a number of tokens), got {value!r}")
    return value


def write_token(
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    next_slot: torch.Tensor,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    admit: torch.Tensor,
) -> torch.Tensor:
    """
    Online KV admission of one token per row, in place and without host synchronisation.

    Writes `new_key` / `new_value` (`[batch, heads, 1, head_dim]`) into `keys` / `values` at each row's `next_slot`,
    marks the slot valid where `admit[batch]` is True, and returns the advanced pointers. A row that does not admit
    the token keeps its pointer, so the slot is overwritten by the next token. Being in place, it is for inference:
    autograd cannot go back through several cached steps.
    """
    # Indexed writes, not `scatter_`: inductor updates a graph input in place for these, while it turned `scatter_`
    # into a copy of the whole buffer (milliseconds per layer and step in a compiled decode step).
    rows = torch.arange(next_slot.shape[0], device=next_slot.device)
    keys[rows, :, next_slot] = new_key[:, :, 0]
    values[rows, :, next_slot] = new_value[:, :, 0]
    valid[rows, next_slot] = admit
    return next_slot + admit.long()


class SparseCacheLayer(DynamicLayer):
    """
    What the two kinds of layer of a [`SparseCache`] share: key/value buffers, slot validity, which slots hold image
    tokens, per-row write pointers, the writes of a chunk and of a single token, sizes and batch operations. How
    capacity is found (grown, or fixed at the first chunk) and how the logical length is held are the subclasses':
    [`GrowingSparseLayer`] and [`FixedSparseLayer`].
    """

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.valid: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.next_slot: torch.Tensor | None = None
        # Host-side upper bound on max(next_slot): exact after a multi-token chunk (growing layers: +1 per decode step).
        self.slot_bound = 0
        self.single_token_step = False
        self.holds_images = False  # whether a chunk with image tokens was stored (known on the host)

    # --- what the subclasses decide -------------------------------------------------------------------------------

    @property
    def decode_slots(self) -> int:
        """How many leading slots a single-token step reads (keys, values and mask)."""
        raise NotImplementedError

    def has_room_for_token(self) -> bool:
        """Whether a single-token step surely fits without looking at the pointers (a host synchronisation)."""
        raise NotImplementedError

    def make_room(self, chunk: "IncomingChunk") -> None:
        """Give the buffers room for `chunk` at column `slot_bound`."""
        raise NotImplementedError

    def check_room(self, chunk: "IncomingChunk") -> None:
        """Refuse a chunk the layer must not take (a fixed layer's conversation past its `max_cache_len`)."""

    def count_tokens(self, logical_length: int) -> None:
        """Add the tokens of conversation a chunk stands for to the logical length (after the chunk is written)."""
        raise NotImplementedError

    def reset_length(self) -> None:
        raise NotImplementedError

    # --- storage ------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.valid is None else self.valid.shape[-1]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Not `super()`: transformers 4.57's takes only `key_states`.
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        batch_size, _, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros((batch_size, key_states.shape[1], self.capacity, head_dim))
        self.values = value_states.new_zeros((batch_size, value_states.shape[1], self.capacity, head_dim))

    def prepare(self, chunk: IncomingChunk) -> None:
        """Get ready to receive a chunk: make room, and for multi-token chunks align the rows' write pointers."""
        batch_size, chunk_length = chunk.valid.shape
        if self.valid is not None and batch_size != self.valid.shape[0]:  # shapes are known on the host: no sync
            raise ValueError(
                f"this SparseCache already holds a conversation of {self.valid.shape[0]} rows, and the input has "
                f"{batch_size}: pass a new cache (model.new_cache()) or empty this one with cache.reset()"
            )
        self.check_room(chunk)
        if self.valid is None:
            device = chunk.valid.device
            self.valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)
            self.image = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)
            self.next_slot = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.single_token_step = chunk_length == 1
        if self.single_token_step and self.capacity and self.has_room_for_token():
            return  # the common decode step: no host synchronisation
        # The worst case could overflow, or a multi-token chunk must start at one column in every row: look at where
        # the rows really are (one host sync per growth block of decode steps, or per prompt / new turn).
        self.slot_bound = int(self.next_slot.max()) if self.capacity else 0
        if not self.single_token_step:
            self.next_slot.fill_(self.slot_bound)
        if self.slot_bound + chunk_length > self.capacity:
            self.make_room(chunk)

    def visible_slots(self, chunk: IncomingChunk) -> torch.Tensor:
        """`[batch, slots]` bool: the physical 2-D attention mask for the chunk about to be written."""
        if self.single_token_step:
            # The slot at the pointer is free (unused, or holding a token that was not admitted): the new token sees it.
            return self.valid[:, : self.decode_slots].scatter(1, self.next_slot[:, None], chunk.valid)
        return torch.cat([self.valid[:, : self.slot_bound], chunk.valid], dim=-1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, chunk: IncomingChunk
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        admit = chunk.valid if chunk.admit is None else chunk.valid & chunk.admit
        if self.single_token_step:
            read = self.decode_slots
            advanced = write_token(
                self.keys, self.values, self.valid, self.next_slot, key_states, value_states, admit[:, 0]
            )
            self.next_slot.copy_(advanced)
            self.count_tokens(chunk.logical_length)
            return self.keys[..., :read, :], self.values[..., :read, :]
        self.count_tokens(chunk.logical_length)
        start, end = self.slot_bound, self.slot_bound + key_states.shape[-2]
        self.keys[..., start:end, :] = key_states
        self.values[..., start:end, :] = value_states
        self.valid[:, start:end] = admit
        # Single tokens are text, and the slots they are written to never held an image token: only chunks mark images.
        self.image[:, start:end] = False if chunk.is_image is None else admit & chunk.is_image
        self.holds_images |= chunk.is_image is not None
        # Rows that drop slots of the chunk would leave holes before later slots; holes are harmless (invalid).
        self.next_slot.fill_(end)
        self.slot_bound = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    # --- sizes ----------------------------------------------------------------------------------------------------

    def get_seq_length(self) -> int | torch.Tensor:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.single_token_step:
            return self.decode_slots, 0
        return self.slot_bound + query_length, 0

    def query_offset(self) -> int:
        # A single token sees every slot its mask allows; a chunk starts right after the aligned pointers.
        return self.decode_slots - 1 if self.single_token_step else self.slot_bound

    def stored_tokens(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.sum(-1)

    def stored_image_tokens(self) -> torch.Tensor | None:
        return None if self.image is None else self.image.sum(-1)

    def slot_bytes(self) -> int:
        """Bytes of one slot of one row (keys and values, all heads)."""
        if not self.is_initialized:
            return 0
        per_slot = self.keys.shape[1] * self.keys.shape[-1] * self.keys.element_size()
        return per_slot + self.values.shape[1] * self.values.shape[-1] * self.values.element_size()

    def allocated_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # --- generation utilities -------------------------------------------------------------------------------------

    def _apply_to_rows(self, function) -> None:
        for name in ("keys", "values", "valid", "image", "next_slot"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, function(tensor))

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.valid = self.image = self.next_slot = None
        self.slot_bound = 0
        self.holds_images = False
        self.reset_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_to_rows(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_to_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_to_rows(lambda tensor: tensor[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "SparseCache cannot be cropped: after token dropping, the last logical tokens do not map to a fixed "
            "number of stored slots. Generation modes that roll back the cache (assisted / speculative decoding, "
            "DoLa) are not supported with sparse-llava models."
        )


class GrowingSparseLayer(SparseCacheLayer):
    """
    A layer whose buffers grow: a prompt gets exactly the slots it needs, decoding adds `growth_block` slots at a time.
    Its logical length is a host integer, and a decode step reads its slots only up to the host-side bound on the
    pointers, so shapes change from step to step (as transformers' `DynamicLayer`, it is not compileable).
    """

    is_compileable = False

    def __init__(self, growth_block: int = 64):
        super().__init__()
        self.growth_block = growth_block
        self.cumulative_length = 0

    @property
    def decode_slots(self) -> int:
        # The slots up to the bound on the pointers, plus the new token's: not the unused end of the last block.
        return self.slot_bound + 1

    def has_room_for_token(self) -> bool:
        return self.slot_bound + 1 <= self.capacity

    def make_room(self, chunk: IncomingChunk) -> None:
        # A prompt gets exactly the room it needs; decoding grows the buffers a block at a time.
        slack = self.growth_block if self.single_token_step else 0
        extra = self.slot_bound + chunk.valid.shape[1] + slack - self.capacity
        self.valid = torch.nn.functional.pad(self.valid, (0, extra), value=False)
        self.image = torch.nn.functional.pad(self.image, (0, extra), value=False)
        if self.is_initialized:
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))

    def count_tokens(self, logical_length: int) -> None:
        self.cumulative_length += logical_length
        if self.single_token_step:
            self.slot_bound += 1  # the new token's slot: the bound stays an upper bound on every row's pointer

    def reset_length(self) -> None:
        self.cumulative_length = 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the name of transformers 4.57


class FixedSparseLayer(SparseCacheLayer):
    """
    A layer of fixed capacity, as transformers' `StaticLayer`: its buffers are allocated once, at its first chunk,
    with room for `max_cache_len` tokens of conversation (the slots that chunk stored plus one per token still to
    come). Its logical length is a tensor updated in place and a decode step reads the whole buffer, so decode steps
    have static shapes and no host synchronisation, and compile to one graph.
    """

    is_compileable = True

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = max_cache_len
        # A tensor, so that decode steps neither read nor write host state (a compiled step would otherwise
        # specialise on it and recompile).
        self.cumulative_length = torch.zeros((), dtype=torch.long)
        self.host_length = 0  # the logical length as the host last knew it (see `check_room`)

    @property
    def decode_slots(self) -> int:
        return self.capacity  # the whole buffer: a step's shapes never change

    def has_room_for_token(self) -> bool:
        # Always, up to `max_cache_len` (see `allocate`); writing past the end would fail on the device.
        return True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.mark_static(self.keys, self.values)

    @staticmethod
    def mark_static(*tensors: torch.Tensor) -> None:
        """Tell `torch.compile` that these buffers keep their address (updated in place), as `StaticLayer` does, so that
        CUDA graphs can replay a compiled step. Done on the host, outside a compiled region (prefill)."""
        if not torch.compiler.is_compiling():
            for tensor in tensors:
                torch._dynamo.mark_static_address(tensor)

    def prepare(self, chunk: IncomingChunk) -> None:
        if self.valid is None:
            self.cumulative_length = self.cumulative_length.to(chunk.valid.device)
        super().prepare(chunk)

    def check_room(self, chunk: IncomingChunk) -> None:
        """
        Refuse a chunk that would take the conversation past `max_cache_len`. The host reads the length from the
        device at a multi-token chunk (which synchronises anyway) and counts eager decode steps itself; a compiled
        decode step leaves the count alone and does not check (see the module docstring), so after compiled steps the
        count lags until the next multi-token chunk.
        """
        if torch.compiler.is_compiling():
            return
        if chunk.valid.shape[1] > 1:
            self.host_length = int(self.cumulative_length)
        seen = self.host_length + chunk.logical_length
        if seen > self.max_cache_len:
            raise ValueError(self.overflow_message(seen))
        self.host_length = seen

    def overflow_message(self, seen: int) -> str:
        return (
            f"the SparseCache was made for max_cache_len={self.max_cache_len} tokens of conversation, and this "
            f"chunk brings it to {seen}; make it with a larger max_cache_len (generate() sizes it as the prompt "
            f"plus max_new_tokens)"
        )

    def make_room(self, chunk: IncomingChunk) -> None:
        """
        Size the buffers at the first chunk: the slots the chunk takes, plus one per token of conversation still to
        come (`max_cache_len` minus the tokens seen with this chunk). Every later token adds at most one slot, and a
        later chunk at most its length, so the buffers never need to grow.
        """
        seen = int(self.cumulative_length) + chunk.logical_length
        if self.capacity or seen > self.max_cache_len:
            raise ValueError(self.overflow_message(seen))
        capacity = chunk.valid.shape[1] + self.max_cache_len - seen
        self.valid = torch.zeros((chunk.valid.shape[0], capacity), dtype=torch.bool, device=chunk.valid.device)
        self.image = torch.zeros_like(self.valid)
        self.mark_static(self.valid, self.image, self.next_slot, self.cumulative_length)

    def count_tokens(self, logical_length: int) -> None:
        self.cumulative_length.add_(logical_length)

    def reset_length(self) -> None:
        self.cumulative_length = torch.zeros((), dtype=torch.long)
        self.host_length = 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    get_max_cache_shape = get_max_length  # the name of transformers 4.57


class SparseCache(Cache):
    """
    The cache of sparse-llava models: one [`SparseCacheLayer`] per decoder layer.

    Before running a chunk through a layer, the model calls [`SparseCache.begin_chunk`] (which slots are valid, which
    to admit, how many logical tokens the chunk stands for); it returns the layer's physical 2-D attention mask.
    transformers' attention modules then call `update` as usual. `stored_tokens(layer_idx)`, `memory_bytes()` and
    `sparsity_report()` say what each layer holds.
    """

    def __init__(
        self, num_layers: int | None = None, config=None, growth_block: int = 64, max_cache_len: int | None = None
    ):
        if num_layers is None:
            if config is None:
                raise ValueError("SparseCache needs `num_layers` or a `config`")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        check_token_count("max_cache_len", max_cache_len)
        check_token_count("growth_block", growth_block)
        layers = [
            GrowingSparseLayer(growth_block) if max_cache_len is None else FixedSparseLayer(max_cache_len)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        # The chunk announced to the next `update`, in a list: torch 2.13's dynamo drops stores to attributes of plain
        # Python objects traced after a flex_attention call (a compiled flex decode step), and keeps those into a list.
        self._incoming: list[IncomingChunk | None] = [None]
        # [layer, count, batch] running sums of the models' token counts (see `record`).
        self.token_stats: torch.Tensor | None = None
        # The token ids of the conversation the cache holds, as far as `generate()` fed them (None: not known), so
        # that a later `generate()` can tell a continuation from an unrelated prompt.
        self.conversation_ids: torch.Tensor | None = None
        # Whether the position-limit warning was given for this conversation (generate() may give it up front).
        self.warned_position_limit = False

    @property
    def batch_size(self) -> int | None:
        """Rows of the conversation the cache holds (None while empty)."""
        valid = self.layers[0].valid
        return None if valid is None else valid.shape[0]

    @property
    def max_cache_len(self) -> int | None:
        """Tokens of conversation a fixed-capacity cache has room for; None for a growing one."""
        return getattr(self.layers[0], "max_cache_len", None)

    def begin_chunk(self, layer_idx: int, chunk: IncomingChunk) -> torch.Tensor:
        """Announce the chunk the next `update` of `layer_idx` receives; returns the layer's 2-D attention mask."""
        layer = self.layers[layer_idx]
        layer.prepare(chunk)
        self._incoming[0] = chunk
        return layer.visible_slots(chunk)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # Taken, not kept: the cache holds no reference to a step's tensors between steps.
        chunk, self._incoming[0] = self._incoming[0], None
        if chunk is None:
            raise RuntimeError("SparseCache.update called without begin_chunk(): use it with a sparse-llava model")
        return self.layers[layer_idx].update(key_states, value_states, chunk)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Masks are built in the physical index space of the layer (see module docstring).
        return self.layers[layer_idx].query_offset()

    def stored_tokens(self, layer_idx: int) -> torch.Tensor:
        """LongTensor `[batch]`: how many tokens layer `layer_idx` holds for each row."""
        stored = self.layers[layer_idx].stored_tokens()
        if stored is None:
            raise ValueError(f"layer {layer_idx} of the cache holds nothing yet")
        return stored

    def stored_image_tokens(self, layer_idx: int) -> torch.Tensor:
        """LongTensor `[batch]`: how many image tokens layer `layer_idx` holds for each row."""
        self.stored_tokens(layer_idx)  # same error when the layer holds nothing yet
        return self.layers[layer_idx].stored_image_tokens()

    def image_slots(self, layer_idx: int, num_slots: int) -> torch.Tensor:
        """`[batch, num_slots]` bool: which of the first `num_slots` slots of layer `layer_idx` hold image tokens."""
        return self.layers[layer_idx].image[:, :num_slots]

    def memory_bytes(self) -> int:
        """Bytes of keys and values of the tokens the cache holds (stored tokens x bytes per token, all layers)."""
        return sum(
            int(layer.stored_tokens().sum()) * layer.slot_bytes() for layer in self.layers if layer.is_initialized
        )

    def allocated_bytes(self) -> int:
        """Bytes of the key/value buffers as allocated (includes padding rows' slack and unused capacity)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def record(self, token_counts: list[dict[str, torch.Tensor]]) -> None:
        """
        Add one forward's per-layer, per-row token counts (see `SparseLlavaForConditionalGeneration.run_decoder`).
        Consecutive layers share one count object, so a decode step costs a few tensor operations, not one per layer.
        """
        increments, start = [], 0
        for end in range(1, len(token_counts) + 1):
            if end == len(token_counts) or token_counts[end] is not token_counts[start]:
                counts = torch.stack([token_counts[start][name] for name in COUNT_NAMES])
                increments.append(counts.unsqueeze(0).expand(end - start, -1, -1))
                start = end
        increment = torch.cat(increments)
        if self.token_stats is None:
            self.token_stats = increment
            if self.max_cache_len is not None:
                FixedSparseLayer.mark_static(self.token_stats)
        else:
            self.token_stats.add_(increment)  # in place, as the layers' buffers

    def sparsity_report(self) -> list[dict[str, list[int]]]:
        """Per layer, per row: tokens stored, and kept versus seen for image tokens and for output text."""
        report = []
        for layer_idx, layer in enumerate(self.layers):
            if layer.valid is None:
                continue
            counts = {} if self.token_stats is None else dict(zip(COUNT_NAMES, self.token_stats[layer_idx].tolist()))
            report.append({"stored": layer.stored_tokens().tolist(), **counts})
        return report

    def _apply_to_own_rows(self, function) -> None:
        """Apply a batch operation (on dim 0) to the rows of the cache's own records, as the layers do to theirs."""
        if self.token_stats is not None:
            self.token_stats = function(self.token_stats.transpose(0, 2)).transpose(0, 2)
        if self.conversation_ids is not None:
            self.conversation_ids = function(self.conversation_ids)

    def reset(self) -> None:
        super().reset()
        self.token_stats = None
        self.conversation_ids = None
        self.warned_position_limit = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_to_own_rows(lambda stats: stats.index_select(0, beam_idx.to(stats.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_own_rows(lambda stats: stats.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_own_rows(lambda stats: stats[indices, ...])
