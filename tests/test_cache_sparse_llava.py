"""The SparseCache on its own: the admission write, the growing and the fixed-capacity layers (what each reads, holds
and refuses), and batch operations."""

import pytest
import torch
from test_dynamic_llava_decode import text_sparse_model
from test_dynamic_llava_prefill import inputs_for

from sparse_llava.cache_sparse_llava import (
    FixedSparseLayer,
    GrowingSparseLayer,
    IncomingChunk,
    SparseCache,
    write_token,
)


def chunk_of(length, batch=2, admit=None, generator=None):
    """A chunk of `length` valid slots per row, with random keys and values `[batch, 1 head, length, 4]`."""
    keys, values = (torch.randn(batch, 1, length, 4, generator=generator) for _ in range(2))
    chunk = IncomingChunk(valid=torch.ones(batch, length, dtype=torch.bool), admit=admit, logical_length=length)
    return chunk, keys, values


def feed(cache, chunk, keys, values, layer_idx=0):
    visible = cache.begin_chunk(layer_idx, chunk)
    return visible, cache.update(keys, values, layer_idx)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_admission_step_has_no_host_synchronisation(backend):
    """`write_token` compiles as one graph (no `.item()`, no data-dependent Python branching), and inductor's code
    writes the buffers it was given, in place."""
    torch._dynamo.reset()
    compiled = torch.compile(write_token, fullgraph=True, backend=backend)
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 8, 4, generator=generator), torch.randn(3, 2, 8, 4, generator=generator)
    valid = torch.zeros(3, 8, dtype=torch.bool)
    next_slot = torch.tensor([0, 2, 5])
    new_key, new_value = torch.randn(3, 2, 1, 4, generator=generator), torch.randn(3, 2, 1, 4, generator=generator)
    admit = torch.tensor([True, False, True])
    expected = [t.clone() for t in (keys, values, valid)]
    for row, slot in enumerate(next_slot.tolist()):
        expected[0][row, :, slot] = new_key[row, :, 0]
        expected[1][row, :, slot] = new_value[row, :, 0]
        expected[2][row, slot] = admit[row]
    advanced = compiled(keys, values, valid, next_slot, new_key, new_value, admit)
    assert advanced.tolist() == [1, 2, 6]
    for actual, wanted in zip((keys, values, valid), expected):
        assert torch.equal(actual, wanted)


def test_growing_cache_decode_step_reads_up_to_the_pointers_bound():
    """A growing layer's decode step hands attention (keys, values, mask) its slots up to the host-side bound on the
    rows' pointers, not the unused rest of its last growth block, and they hold exactly what each row admitted."""
    cache = SparseCache(num_layers=1, growth_block=8)
    generator = torch.Generator().manual_seed(0)
    chunk, keys, values = chunk_of(3, generator=generator)
    cache.begin_chunk(0, chunk)
    cache.update(keys, values, 0)
    admitted = [[key for key in keys[row, 0]] for row in range(2)]  # per row: the keys it holds, in order
    layer, shorter_than_buffer = cache.layers[0], 0
    admits = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]] * 4, dtype=torch.bool)
    for admit in admits:
        chunk, key, value = chunk_of(1, admit=admit[:, None], generator=generator)
        visible = cache.begin_chunk(0, chunk)
        mask_slots = layer.get_mask_sizes(1)[0]
        query_offset = cache.get_query_offset(0)
        read_keys, read_values = cache.update(key, value, 0)
        assert read_keys.shape[2] == read_values.shape[2] == visible.shape[1] == mask_slots == query_offset + 1
        shorter_than_buffer += read_keys.shape[2] < layer.capacity
        for row in range(2):
            seen = read_keys[row, 0][visible[row]]
            assert torch.equal(seen, torch.stack([*admitted[row], key[row, 0, 0]]))
            if admit[row]:
                admitted[row].append(key[row, 0, 0])
        assert not layer.valid[:, read_keys.shape[2] :].any()
    assert shorter_than_buffer > len(admits) // 2, shorter_than_buffer


def test_cache_batch_operations_keep_rows_consistent(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    stored = [cache.stored_tokens(i).clone() for i in range(4)]
    cache.batch_repeat_interleave(2)
    assert cache.stored_tokens(3).tolist() == stored[3].repeat_interleave(2).tolist()
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))
    assert cache.stored_tokens(3).tolist() == stored[3].repeat_interleave(2)[[3, 0, 1, 2]].tolist()
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.stored_tokens(0).tolist() == [int(stored[0][0])]
    assert isinstance(cache, SparseCache)


def test_each_kind_of_layer_has_its_own_length_reads_and_compileability():
    generator = torch.Generator().manual_seed(0)
    growing, fixed = SparseCache(num_layers=1, growth_block=8), SparseCache(num_layers=1, max_cache_len=12)
    assert isinstance(growing.layers[0], GrowingSparseLayer) and isinstance(fixed.layers[0], FixedSparseLayer)
    assert not growing.is_compileable and fixed.is_compileable
    assert (growing.max_cache_len, fixed.max_cache_len) == (None, 12)
    # transformers 5.x asks a layer for get_max_length, 4.57 for get_max_cache_shape
    for name in ("get_max_length", "get_max_cache_shape"):
        assert getattr(growing.layers[0], name)() == -1 and getattr(fixed.layers[0], name)() == 12
    for cache in (growing, fixed):
        feed(cache, *chunk_of(3, generator=generator))
        for _ in range(2):
            feed(cache, *chunk_of(1, admit=torch.tensor([[True], [False]]), generator=generator))
    grown, static = growing.layers[0], fixed.layers[0]
    # Logical length: a host int when growing, a 0-d tensor (updated in place, as StaticLayer's) when fixed.
    assert grown.get_seq_length() == 5 and isinstance(grown.get_seq_length(), int)
    assert isinstance(static.get_seq_length(), torch.Tensor) and int(static.get_seq_length()) == 5
    # A growing layer grew by one block at the first decode step and reads up to the bound on its pointers; a fixed
    # one was sized at its first chunk for max_cache_len (3 slots + 9 tokens to come) and reads its whole buffer.
    assert (grown.capacity, grown.decode_slots) == (3 + 1 + 8, 3 + 2 + 1)
    assert (static.capacity, static.decode_slots) == (12, 12)
    assert growing.stored_tokens(0).tolist() == fixed.stored_tokens(0).tolist() == [5, 3]


def test_a_fixed_layer_refuses_a_token_past_max_cache_len_before_writing_it():
    generator = torch.Generator().manual_seed(0)
    cache = SparseCache(num_layers=1, max_cache_len=5)
    feed(cache, *chunk_of(3, generator=generator))
    for _ in range(2):
        feed(cache, *chunk_of(1, admit=torch.ones(2, 1, dtype=torch.bool), generator=generator))
    keys_before = cache.layers[0].keys.clone()
    with pytest.raises(ValueError, match="max_cache_len=5 tokens of conversation, and this chunk brings it to 6"):
        feed(cache, *chunk_of(1, generator=generator))
    assert int(cache.get_seq_length()) == 5 and torch.equal(cache.layers[0].keys, keys_before)
    cache.reset()  # empty again: a new conversation fits
    feed(cache, *chunk_of(5, generator=generator))
    assert int(cache.get_seq_length()) == 5


@pytest.mark.parametrize("max_cache_len", [None, 16], ids=["growing", "fixed"])
def test_a_chunk_of_another_batch_size_is_refused(max_cache_len):
    cache = SparseCache(num_layers=1, max_cache_len=max_cache_len)
    feed(cache, *chunk_of(3))
    with pytest.raises(ValueError, match="already holds a conversation of 2 rows, and the input has 3"):
        feed(cache, *chunk_of(1, batch=3))
