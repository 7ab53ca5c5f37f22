"""YOPO (Zhang et al., arXiv 2410.06169) on the sparse-llava base, with the savings made real.

The reference implementation prunes by masking a dense computation; here each pruned piece of work is not done:

* neighbour-window attention: a vision query attends only to the text before it and to the `w x w` vision neighbours
  of its own image, computed tile by tile (`WindowBlocks`), so the cost is linear in the number of vision tokens;
* inactive heads: a head pruned for vision tokens computes no query, key, value or output for them (the projections
  run on the kept heads' slices of the weights), and no query reads vision keys through it. The cache stays
  rectangular, so before the cutoff a pruned head's vision slots hold zeros: pruning heads saves compute, not memory;
* layer cutoff: from `vision_layer_cutoff` on, vision tokens leave the sequence, and those layers cache no vision K/V;
* sparse FFN: vision tokens run the FFN on the first `ffn_vision_keep_ratio` of its neurons (sliced weights).

Text tokens are computed exactly as in the base model, except for what they no longer read. With
`attention_semantics="reference"` the released checkpoints' semantics (weights on removed vision keys zeroed after the
softmax) are reproduced: vision keys are then computed in every layer and head, their values only where read; a zero
value is what "weight zeroed after the softmax" means, so the cache stores zeros there and decoding runs unchanged.

Attention in the YOPO layers runs through `torch.nn.functional.scaled_dot_product_attention` with per-head masks (text
queries over every slot, vision queries per window tile), whatever `attn_implementation` says. Other layers, and decode
steps, run transformers' attention with the configured backend; a decode step whose pruned heads must not read cached
vision keys hands it a per-head mask (sdpa, eager; flex_attention: a `BlockMask` whose mask function reads the head
index). The flash backends cannot take one, so there those steps run through the YOPO layer too.
"""

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .cache_sparse_llava import IncomingChunk, SparseCache
from .compat_transformers import attention_backend, checkpointed_call
from .configuration_yopo import YopoConfig
from .modeling_sparse_llava import SparseLlavaForConditionalGeneration, TokenStream, gather_slots, scatter_slots


@dataclass
class VisionLayout:
    """
    Where a chunk's text and vision tokens sit, and the window neighbours of each vision token. Lists are
    left-aligned per row, with `*_present` marking real entries.
    """

    text_index: torch.Tensor  # [batch, texts] slot of each text token
    text_present: torch.Tensor  # [batch, texts]
    vision_index: torch.Tensor  # [batch, visions] slot of each vision token
    vision_present: torch.Tensor  # [batch, visions]
    window_blocks: "WindowBlocks | None" = None  # None: window off


@dataclass
class WindowBlocks:
    """
    Neighbour-window attention in blocks: each block is a `b x b` tile of one image grid (its queries) and the tile
    widened by the window radius on every side (its keys), so every query finds its whole window in its block's keys.
    Attention then runs per block as a small dense problem (fast matrix products) at a cost linear in the number of
    vision tokens. Entries are rows of the token-major `[batch * visions]` vision list, -1 where a cell is empty.
    """

    queries: torch.Tensor  # [blocks, b * b]
    keys: torch.Tensor  # [blocks, (b + 2r) ** 2]
    allowed: torch.Tensor  # [blocks, b * b, (b + 2r) ** 2] key within the query's window, both present
    batch_index: torch.Tensor  # [blocks] the row each block belongs to


@dataclass
class YopoStream(TokenStream):
    layout: VisionLayout | None = None  # set at the first layer of a chunk with images


@dataclass
class LayerPlan:
    """What one decoder layer computes for vision tokens (head indices are query heads, key/value heads)."""

    query_heads: list[int]  # heads whose vision queries are computed
    key_heads: list[int]  # key/value heads whose vision keys are computed
    value_heads: list[int]  # key/value heads whose vision values are computed (others are zero or never read)
    pruned_heads: list[int]  # query heads that must not read vision keys (renormalize semantics)
    ffn_neurons: int
    window: int
    vision_in_layer: bool  # vision tokens are in this layer's sequence
    dense: bool  # the layer computes exactly what the base layer computes


WINDOW_BLOCK = 8  # side of the query tiles of window attention (keys: the tile widened by the window radius)


def tile_grid(rows: torch.Tensor, columns: torch.Tensor, token_rows: torch.Tensor, radius: int):
    """
    Cut a grid (cells at `rows`, `columns` holding tokens `token_rows`) into `WINDOW_BLOCK`-sided tiles: per tile, the
    tokens of its cells (`[tiles, b * b]`) and of the cells within `radius` around it (`[tiles, (b + 2r) ** 2]`),
    row-major, -1 for empty cells. Tiles without tokens are left out.
    """
    block = WINDOW_BLOCK
    tiles_down, tiles_across = -(-(int(rows.max()) + 1) // block), -(-(int(columns.max()) + 1) // block)
    cell_map = torch.full((tiles_down * block + 2 * radius, tiles_across * block + 2 * radius), -1)
    cell_map[rows + radius, columns + radius] = token_rows
    top, left = torch.meshgrid(torch.arange(tiles_down) * block, torch.arange(tiles_across) * block, indexing="ij")
    top, left = top.flatten()[:, None, None], left.flatten()[:, None, None]
    inside, around = torch.arange(block), torch.arange(block + 2 * radius)
    queries = cell_map[top + radius + inside[:, None], left + radius + inside[None, :]].flatten(1)
    keys = cell_map[top + around[:, None], left + around[None, :]].flatten(1)
    occupied = (queries >= 0).any(1)
    return queries[occupied], keys[occupied]


def left_aligned(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row of `mask`, left-aligned, and which of them are real."""
    width = int(mask.sum(-1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, mask.gather(1, order)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `[batch, heads, tokens, head_dim]` states, as `apply_rotary_pos_emb` does for queries and keys."""
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def weights_loaded(module: torch.nn.Module):
    """
    A context in which `module`'s own weights hold their values, for using them outside its forward. accelerate's
    offloading (a `device_map` putting the module on "cpu" or "disk") leaves placeholders on the meta device and loads
    the weights only around the module's forward; its `align_module_device` loads them for a block. A module without
    accelerate's hook (`_hf_hook`, where accelerate attaches it) holds its weights already: nothing is imported or done.
    """
    if not hasattr(module, "_hf_hook"):
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


def linear_rows(linear: torch.nn.Linear, hidden: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """`linear` restricted to some output features."""
    with weights_loaded(linear):
        bias = None if linear.bias is None else linear.bias[rows]
        return F.linear(hidden, linear.weight[rows], bias)


def linear_columns(linear: torch.nn.Linear, hidden: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
    """`linear` restricted to some input features (`hidden` holds only those)."""
    with weights_loaded(linear):
        return F.linear(hidden, linear.weight[:, columns], linear.bias)


class YopoLlavaForConditionalGeneration(SparseLlavaForConditionalGeneration):
    """
    YOPO over a LLaVA-1.5 or LLaVA-NeXT base: neighbour-window vision attention, vision heads pruned per layer, vision
    tokens dropped from `config.vision_layer_cutoff` on, and a narrower FFN for vision tokens. No new weights.
    """

    config_class = YopoConfig
    config: YopoConfig
    # Pruned heads need per-head masks, which flash-attention kernels do not take: under flash, the layers that need
    # them compute their attention in the YOPO layer (SDPA), so every case stays exact (see the module docstring).
    _supports_flash_attn = True

    def __init__(self, config: YopoConfig):
        super().__init__(config)
        self.plans = [self.layer_plan(layer) for layer in range(config.get_text_config().num_hidden_layers)]
        self._index_tensors: dict = {}
        self.post_init()

    def layer_plan(self, layer_idx: int) -> LayerPlan:
        config, text_config = self.config, self.config.get_text_config()
        num_heads, num_kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
        group = num_heads // num_kv_heads
        query_heads = config.vision_heads(layer_idx)
        used_kv_heads = sorted({head // group for head in query_heads})
        vision_layer = config.vision_layer(layer_idx)
        if config.attention_semantics == "reference":  # the config checked that whole groups are pruned
            key_heads, value_heads, pruned = list(range(num_kv_heads)), used_kv_heads if vision_layer else [], []
            vision_in_layer = True
        elif vision_layer:
            key_heads = value_heads = used_kv_heads
            pruned = [head for head in range(num_heads) if head not in query_heads]
            vision_in_layer = True
        else:  # the vision tokens have left the sequence
            query_heads, key_heads, value_heads, pruned, vision_in_layer = [], [], [], [], False
        ffn_neurons = config.ffn_vision_neurons() if config.ffn_vision_keep_ratio < 1 else text_config.intermediate_size
        dense = (
            vision_layer
            and len(query_heads) == num_heads
            and ffn_neurons == text_config.intermediate_size
            and config.neighbor_window == 0
        )
        return LayerPlan(
            query_heads, key_heads, value_heads, pruned, ffn_neurons, config.neighbor_window, vision_in_layer, dense
        )

    def pruned_head_mask(self, layer_idx: int, device) -> torch.Tensor:
        """`[heads]` bool: the heads of layer `layer_idx` that must not read vision keys (cached per device, so that
        decode steps copy nothing from the host)."""
        key = ("pruned", layer_idx, device)
        if key not in self._index_tensors:
            mask = torch.zeros(self.config.get_text_config().num_attention_heads, dtype=torch.bool)
            mask[self.plans[layer_idx].pruned_heads] = True
            self._index_tensors[key] = mask.to(device)
        return self._index_tensors[key]

    def index_tensor(self, indices: list[int], device) -> torch.Tensor:
        """`indices` as a LongTensor on `device` (cached per device)."""
        key = ("index", tuple(indices), device)
        if key not in self._index_tensors:
            self._index_tensors[key] = torch.tensor(indices, dtype=torch.long, device=device)
        return self._index_tensors[key]

    def head_index(self, heads: list[int], head_dim: int, device) -> torch.Tensor:
        """Row indices of the given heads in a `[heads * head_dim, ...]` projection weight (cached per device)."""
        key = (tuple(heads), head_dim, device)
        if key not in self._index_tensors:
            rows = torch.tensor(heads, dtype=torch.long).unsqueeze(-1) * head_dim + torch.arange(head_dim)
            self._index_tensors[key] = rows.flatten().to(device)
        return self._index_tensors[key]

    # ----------------------------------------------------------------------------------------------------------
    # Between layers: lay out the chunk once, and drop vision tokens at the cutoff.
    # ----------------------------------------------------------------------------------------------------------

    def before_layer(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None) -> TokenStream:
        if not stream.has_images:
            return stream
        if layer_idx == 0:
            stream = YopoStream.extend(stream, layout=self.vision_layout(stream))
        if layer_idx == self.config.vision_layer_cutoff and self.config.attention_semantics == "renormalize":
            # Rows are right-aligned: the last slot is each row's last token, whose logits predict what comes next.
            if bool((stream.is_image[:, -1] & stream.valid[:, -1]).any()):
                raise ValueError(
                    "an input ends with an image token, whose state leaves the sequence at vision_layer_cutoff; end "
                    "the prompt with text (e.g. the assistant's turn marker)"
                )
            stream = replace(stream.select(~stream.is_image), layout=None)
        return stream

    def vision_layout(self, stream: TokenStream) -> VisionLayout:
        is_image = stream.is_image & stream.valid
        text_index, text_present = left_aligned(stream.valid & ~is_image)
        vision_index, vision_present = left_aligned(is_image)
        layout = VisionLayout(text_index, text_present, vision_index, vision_present)
        if self.config.neighbor_window and vision_index.shape[1]:
            layout.window_blocks = self.window_blocks(stream, layout)
        return layout

    def window_blocks(self, stream: TokenStream, layout: VisionLayout) -> WindowBlocks:
        """Tile every image grid of the chunk into window blocks (host-side, once per chunk)."""
        num_visions = layout.vision_index.shape[1]
        image = torch.where(layout.vision_present, stream.image_index.gather(1, layout.vision_index), -1).cpu()
        offset = stream.image_offset.gather(1, layout.vision_index).cpu()
        radius, block = self.config.neighbor_window // 2, WINDOW_BLOCK
        queries, keys = [], []
        for image_idx in range(len(stream.image_lengths)):
            first = ((image == image_idx) & (offset == 0)).nonzero()
            if not len(first):
                continue  # an image of a padded-away or absent row
            row, start = first[0].tolist()
            cells = self.image_cells(stream, image_idx)
            # An image's tokens are consecutive in its row's vision list.
            token_rows = row * num_visions + start + torch.arange(len(cells))
            for grid in cells[:, 0].unique().tolist():
                in_grid = cells[:, 0] == grid
                grid_queries, grid_keys = tile_grid(cells[in_grid, 1], cells[in_grid, 2], token_rows[in_grid], radius)
                queries.append(grid_queries)
                keys.append(grid_keys)
        queries, keys = torch.cat(queries), torch.cat(keys)
        side = block + 2 * radius
        query_cell, key_cell = torch.arange(block * block), torch.arange(side * side)
        # A query at (i, j) of its tile sits at (i + r, j + r) of the widened tile; its window is within r of that.
        near_rows = (key_cell[None, :] // side - query_cell[:, None] // block - radius).abs() <= radius
        near_columns = (key_cell[None, :] % side - query_cell[:, None] % block - radius).abs() <= radius
        allowed = (near_rows & near_columns)[None] & (queries >= 0)[:, :, None] & (keys >= 0)[:, None, :]
        device = layout.vision_index.device
        return WindowBlocks(
            queries.to(device), keys.to(device), allowed.to(device), (queries.max(1).values // num_visions).to(device)
        )

    def image_cells(self, stream: TokenStream, image_idx: int) -> torch.Tensor:
        """`[n, 3]` long: for each token of an image, its grid (0 base image, 1 high resolution), row and column."""
        length = stream.image_lengths[image_idx]
        vision_config = self.config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        if self.config.base_model_type == "llava":
            if length != side * side:
                raise ValueError(f"neighbor_window needs square patch grids; image {image_idx} has {length} tokens")
            positions = torch.arange(length)
            return torch.stack([torch.zeros_like(positions), positions // side, positions % side], dim=-1)
        # LLaVA-NeXT: let transformers lay out a stand-in image (zeros, newline = 1) to find where the newlines fall.
        image_size = stream.image_sizes[image_idx]
        num_tiles = image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, vision_config.image_size)
        packed, _ = self.model.pack_image_features(
            [torch.zeros(num_tiles, side * side, 1)],
            image_size.unsqueeze(0).cpu(),
            vision_feature_select_strategy="default",
            image_newline=torch.ones(1),
        )
        is_newline = packed[0][side * side :, 0] == 1
        if side * side + len(is_newline) != length:
            raise ValueError(f"image {image_idx}: {length} tokens do not match its LLaVA-NeXT layout")
        base = torch.arange(side * side)
        row = is_newline.long().cumsum(0) - is_newline.long()  # a newline ends its row
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), is_newline.nonzero().flatten() + 1])
        column = torch.arange(len(is_newline)) - row_start[row]
        base_cells = torch.stack([torch.zeros_like(base), base // side, base % side], dim=-1)
        return torch.cat([base_cells, torch.stack([torch.ones_like(row), row, column], dim=-1)])

    # ----------------------------------------------------------------------------------------------------------
    # One decoder layer.
    # ----------------------------------------------------------------------------------------------------------

    def run_layer(self, layer_idx, decoder_layer, stream: TokenStream, cache: SparseCache | None, **kwargs):
        plan = self.plans[layer_idx]
        layout = getattr(stream, "layout", None)
        if layout is not None and plan.vision_in_layer and not plan.dense:
            if decoder_layer.gradient_checkpointing and self.training and cache is None:
                # The layer's own checkpointing wrapper is bypassed here (its sub-modules are called), so apply it.
                def checkpointed(hidden_states):
                    return self.yopo_layer(
                        layer_idx, decoder_layer, replace(stream, hidden_states=hidden_states), layout, None
                    )

                return checkpointed_call(decoder_layer, checkpointed, stream.hidden_states)
            return self.yopo_layer(layer_idx, decoder_layer, stream, layout, cache)
        if self.pruned_heads_hold_vision(layer_idx, cache):
            # Text reading cached vision keys that some heads must not see. A decode step runs transformers' own layer
            # with a per-head mask (`decode_step_visibility`), which the sdpa, eager and flex backends take; a
            # multi-token chunk, or another backend (flash), goes through the YOPO layer.
            decode_step = stream.hidden_states.shape[1] == 1
            per_head_backends = ("sdpa", "eager", "flex_attention")
            if not (decode_step and attention_backend(self.config.get_text_config()) in per_head_backends):
                return self.yopo_layer(layer_idx, decoder_layer, stream, self.text_only_layout(stream), cache)
        return super().run_layer(layer_idx, decoder_layer, stream, cache, **kwargs)

    def pruned_heads_hold_vision(self, layer_idx: int, cache: SparseCache | None) -> bool:
        """Whether layer `layer_idx` has heads that must not read the vision keys its cache holds (known on the host)."""
        return cache is not None and bool(self.plans[layer_idx].pruned_heads) and cache.layers[layer_idx].holds_images

    def decode_step_visibility(self, layer_idx: int, slots_visible: torch.Tensor, cache: SparseCache | None):
        if not self.pruned_heads_hold_vision(layer_idx, cache):
            return slots_visible
        # Image slots are set only by chunks, so a decode step reads them as they were left at prefill.
        image = cache.image_slots(layer_idx, slots_visible.shape[1])
        pruned = self.pruned_head_mask(layer_idx, slots_visible.device)
        return slots_visible[:, None, :] & ~(image[:, None, :] & pruned[None, :, None])

    @staticmethod
    def text_only_layout(stream: TokenStream) -> VisionLayout:
        batch_size, length = stream.valid.shape
        index = torch.arange(length, device=stream.valid.device).expand(batch_size, -1)
        empty = index[:, :0]
        return VisionLayout(index, stream.valid, empty, empty.bool())

    def yopo_layer(self, layer_idx, decoder_layer, stream: TokenStream, layout: VisionLayout, cache):
        plan = self.plans[layer_idx]
        attention = decoder_layer.self_attn
        head_dim = attention.head_dim
        x = stream.hidden_states
        batch_size, length, _ = x.shape
        device = x.device
        normed = decoder_layer.input_layernorm(x)
        cos, sin = stream.position_embeddings

        # Text tokens: queries, keys and values in every head.
        text_normed = gather_slots(normed, layout.text_index)
        text_cos, text_sin = gather_slots(cos, layout.text_index), gather_slots(sin, layout.text_index)
        text_query = self.heads(attention.q_proj(text_normed), head_dim)
        text_key = self.heads(attention.k_proj(text_normed), head_dim)
        text_value = self.heads(attention.v_proj(text_normed), head_dim)
        text_query, text_key = apply_rotary_pos_emb(text_query, text_key, text_cos, text_sin)

        # Vision tokens: only the heads the plan keeps.
        num_kv_heads = attention.config.num_key_value_heads
        vision_normed = gather_slots(normed, layout.vision_index)
        vision_cos, vision_sin = gather_slots(cos, layout.vision_index), gather_slots(sin, layout.vision_index)
        num_visions = layout.vision_index.shape[1]
        vision_key = x.new_zeros((batch_size, num_kv_heads, num_visions, head_dim))
        vision_value = torch.zeros_like(vision_key)
        if num_visions and plan.key_heads:
            rows = self.head_index(plan.key_heads, head_dim, device)
            key = self.heads(linear_rows(attention.k_proj, vision_normed, rows), head_dim)
            vision_key[:, plan.key_heads] = rotate(key, vision_cos, vision_sin)
        if num_visions and plan.value_heads:
            rows = self.head_index(plan.value_heads, head_dim, device)
            vision_value[:, plan.value_heads] = self.heads(linear_rows(attention.v_proj, vision_normed, rows), head_dim)

        # The chunk's keys and values in slot order, stored in (and extended with) the cache.
        def in_slot_order(text_states, vision_states):
            states = x.new_zeros((batch_size, num_kv_heads, length, head_dim))
            states = scatter_slots(states, text_states, layout.text_index, layout.text_present, dim=2)
            return scatter_slots(states, vision_states, layout.vision_index, layout.vision_present, dim=2)

        chunk_key, chunk_value = in_slot_order(text_key, vision_key), in_slot_order(text_value, vision_value)
        is_image = stream.is_image & stream.valid
        if cache is None:
            keys, values, slots_valid, slot_is_image = chunk_key, chunk_value, stream.valid, is_image
        else:
            chunk = IncomingChunk(
                valid=stream.valid,
                admit=None,
                logical_length=stream.logical_length,
                is_image=is_image if stream.has_images else None,
            )
            slots_valid = cache.begin_chunk(layer_idx, chunk)
            keys, values = cache.update(chunk_key, chunk_value, layer_idx)
            slot_is_image = cache.image_slots(layer_idx, keys.shape[2])
        past = keys.shape[2] - length

        text_output = self.text_attention(
            layer_idx, attention, text_query, keys, values, slots_valid, slot_is_image, layout, past, plan
        )
        text_hidden = gather_slots(x, layout.text_index) + attention.o_proj(text_output)
        text_hidden = text_hidden + decoder_layer.mlp(decoder_layer.post_attention_layernorm(text_hidden))
        output = scatter_slots(x, text_hidden, layout.text_index, layout.text_present)
        if not num_visions:
            return output

        vision_hidden = gather_slots(x, layout.vision_index)
        if plan.query_heads:
            rows = self.head_index(plan.query_heads, head_dim, device)
            query = self.heads(linear_rows(attention.q_proj, vision_normed, rows), head_dim)
            query = rotate(query, vision_cos, vision_sin)
            kv_of_query = [head // attention.num_key_value_groups for head in plan.query_heads]
            vision_output = self.vision_attention(
                attention,
                query,
                keys,
                values,
                self.index_tensor(kv_of_query, device),
                slots_valid,
                slot_is_image,
                layout,
                past,
                vision_key[:, kv_of_query],
                vision_value[:, kv_of_query],
                plan,
            )
            vision_hidden = vision_hidden + linear_columns(attention.o_proj, vision_output, rows)
        elif attention.o_proj.bias is not None:
            with weights_loaded(attention.o_proj):
                vision_hidden = vision_hidden + attention.o_proj.bias
        vision_hidden = vision_hidden + self.narrow_ffn(
            decoder_layer.mlp, decoder_layer.post_attention_layernorm(vision_hidden), plan.ffn_neurons
        )
        return scatter_slots(output, vision_hidden, layout.vision_index, layout.vision_present)

    def text_attention(self, layer_idx, attention, query, keys, values, slots_valid, slot_is_image, layout, past, plan):
        """Text queries: causal attention over every slot the layer holds, minus vision keys of pruned heads."""
        key_slot = torch.arange(keys.shape[2], device=keys.device)
        allowed = slots_valid[:, None, :] & (key_slot <= (past + layout.text_index).unsqueeze(-1))
        allowed = allowed.unsqueeze(1)  # [batch, 1, texts, slots]
        if plan.pruned_heads:
            pruned = self.pruned_head_mask(layer_idx, keys.device)
            hidden = slot_is_image[:, None, None, :] & pruned[None, :, None, None]
            allowed = allowed & ~hidden
        # Rows of absent text entries would have nothing to attend to (NaN): let them attend anywhere, they are unused.
        allowed = allowed | ~layout.text_present[:, None, :, None]
        groups = attention.num_key_value_groups
        output = F.scaled_dot_product_attention(
            query, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=allowed, scale=attention.scaling
        )
        return output.transpose(1, 2).flatten(2)

    def vision_attention(
        self,
        attention,
        query,
        keys,
        values,
        kv_heads,
        slots_valid,
        slot_is_image,
        layout,
        past,
        vision_key,
        vision_value,
        plan,
    ):
        """
        Vision queries of the kept heads: the text before them and their window neighbours (or every key causally).
        `keys` / `values` hold every key/value head; `kv_heads[heads]` is the one each query head reads.
        """
        batch_size, num_heads, num_visions, head_dim = query.shape
        query_slot = past + layout.vision_index  # [batch, visions]
        if not plan.window:
            key_slot = torch.arange(keys.shape[2], device=keys.device)
            allowed = slots_valid[:, None, :] & (key_slot <= query_slot.unsqueeze(-1))
            allowed = (allowed | ~layout.vision_present.unsqueeze(-1)).unsqueeze(1)
            output = F.scaled_dot_product_attention(
                query, keys[:, kv_heads], values[:, kv_heads], attn_mask=allowed, scale=attention.scaling
            )
            return output.transpose(1, 2).flatten(2)

        # Text keys: the past slots that are not image tokens (compacted: earlier images' slots are never read here),
        # and the chunk's text tokens before the query; gathered for the kept heads in one copy, so that no vision slot
        # (of the chunk or of earlier images) is copied.
        past_index, past_present = left_aligned(slots_valid[:, :past] & ~slot_is_image[:, :past])
        text_slots = torch.cat([past_index, past + layout.text_index], dim=1)
        rows = torch.arange(batch_size, device=keys.device)[:, None, None]
        text_keys = keys[rows, kv_heads[None, :, None], text_slots[:, None, :]]  # [batch, heads, texts, head_dim]
        text_values = values[rows, kv_heads[None, :, None], text_slots[:, None, :]]
        chunk_visible = layout.text_present[:, None, :] & (
            layout.text_index[:, None, :] < layout.vision_index[:, :, None]
        )
        text_visible = torch.cat([past_present[:, None, :].expand(-1, num_visions, -1), chunk_visible], dim=-1)

        # Window keys, block by block (see `WindowBlocks`): every block is a small dense attention problem.
        blocks = layout.window_blocks
        query_rows, key_rows = blocks.queries.clamp(min=0), blocks.keys.clamp(min=0)

        def token_major(states):  # [batch, heads, visions, head_dim] -> [batch * visions, heads, head_dim]
            return states.transpose(1, 2).reshape(batch_size * num_visions, num_heads, head_dim)

        def per_block(states, rows):  # -> [blocks, heads, rows, head_dim]
            return token_major(states).index_select(0, rows.flatten()).unflatten(0, rows.shape).transpose(1, 2)

        block_keys = torch.cat([text_keys[blocks.batch_index], per_block(vision_key, key_rows)], dim=2)
        block_values = torch.cat([text_values[blocks.batch_index], per_block(vision_value, key_rows)], dim=2)
        block_text_visible = text_visible.flatten(0, 1)[query_rows]  # [blocks, b * b, text keys]
        allowed = torch.cat([block_text_visible, blocks.allowed], dim=-1)
        allowed |= (blocks.queries < 0).unsqueeze(-1)  # empty cells attend anywhere (no NaN); their output is unused
        output = F.scaled_dot_product_attention(
            per_block(query, query_rows), block_keys, block_values, attn_mask=allowed[:, None], scale=attention.scaling
        )
        # Back to the vision list; empty cells go to a spare row.
        target = torch.where(blocks.queries >= 0, blocks.queries, batch_size * num_visions).flatten()
        result = output.new_zeros((batch_size * num_visions + 1, num_heads * head_dim))
        result = result.index_copy(0, target, output.transpose(1, 2).flatten(2).flatten(0, 1))
        return result[:-1].view(batch_size, num_visions, num_heads * head_dim)

    @staticmethod
    def narrow_ffn(mlp, hidden: torch.Tensor, neurons: int) -> torch.Tensor:
        """The FFN restricted to its first `neurons` neurons (what the zeroed neurons of the reference leave)."""
        if neurons == mlp.intermediate_size:
            return mlp(hidden)
        gate = linear_rows(mlp.gate_proj, hidden, slice(0, neurons))
        up = linear_rows(mlp.up_proj, hidden, slice(0, neurons))
        return linear_columns(mlp.down_proj, mlp.act_fn(gate) * up, slice(0, neurons))

    @staticmethod
    def heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
        """`[batch, tokens, heads * head_dim]` -> `[batch, heads, tokens, head_dim]`."""
        return projected.unflatten(-1, (-1, head_dim)).transpose(1, 2)


__all__ = ["YopoLlavaForConditionalGeneration"]
