"""The fixed-capacity SparseCache: decode steps of static shapes that compile to one graph, with the tokens of the
growing cache; and Dynamic-LLaVA decoding without a cache, whose cost falls with the tokens it drops."""

import pytest
import torch
from conftest import generated_cache
from test_dynamic_llava_decode import text_sparse_model
from test_dynamic_llava_prefill import inputs_for
from test_pmod import pmod_from
from test_yopo import ALL_KNOBS, yopo_from
from torch._dynamo.utils import counters

from sparse_llava.cache_sparse_llava import SparseCache
from sparse_llava.flops import flop_counter

NEW_TOKENS = 6
METHODS = ("dynamic-llava", "p-mod", "yopo")


@pytest.fixture(params=METHODS)
def sparse_model(request, base_checkpoints, converted):
    """Each method on the tiny LLaVA-1.5, deciding something at prefill and (Dynamic-LLaVA) while decoding."""
    base_model = base_checkpoints[("llava", "hub")][1]
    if request.param == "dynamic-llava":
        return text_sparse_model(converted, "llava")
    if request.param == "p-mod":
        return pmod_from(base_model)
    return yopo_from(base_model, **ALL_KNOBS)


@pytest.fixture
def compiler():
    """A clean torch.compile state, with dynamo's counters cleared, before and after the test."""
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def greedy(model, inputs, **settings):
    return model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, **settings
    )


def decode(forward, model, inputs, cache, steps=NEW_TOKENS - 1):
    """
    Greedy decoding as `generate()` feeds it: the prefill through the model itself (not compiled), then `steps` single
    tokens through `forward`, each with a `[batch, 1]` attention mask and position ids. Returns the whole sequence.
    """
    width = inputs["input_ids"].shape[1]
    position = inputs["attention_mask"].long().cumsum(-1) - 1
    step_inputs = {"cache": cache, "use_cache": True, "logits_to_keep": 1, "output_token_start": width}
    with torch.no_grad():
        logits = model(**inputs, position_ids=position.clamp(min=0), **step_inputs).logits
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        position = position[:, -1:]
        for _ in range(steps):
            position = position + 1
            step = {"input_ids": tokens[-1], "attention_mask": torch.ones_like(tokens[-1]), "position_ids": position}
            tokens.append(forward(**step, **step_inputs).logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([inputs["input_ids"], *tokens], dim=1)


def test_static_cache_implementation_gives_the_growing_caches_tokens(sparse_model):
    inputs = inputs_for("llava")
    growing = greedy(sparse_model, inputs)
    fixed = greedy(sparse_model, inputs, cache_implementation="static")
    assert torch.equal(fixed.sequences, growing.sequences)
    cache, reference = generated_cache(fixed), generated_cache(growing)
    assert isinstance(cache, SparseCache) and cache.is_compileable and not reference.is_compileable
    # Sized as transformers sizes a StaticCache (the last token is never fed back), each layer for its own slots.
    width = inputs["input_ids"].shape[1]
    assert cache.max_cache_len == width + NEW_TOKENS - 1
    assert int(cache.get_seq_length()) == reference.get_seq_length() == width + NEW_TOKENS - 1
    prefill = sparse_model(**inputs, use_cache=True).cache
    for layer_idx, layer in enumerate(cache.layers):
        assert torch.equal(cache.stored_tokens(layer_idx), reference.stored_tokens(layer_idx))
        assert layer.capacity == prefill.layers[layer_idx].capacity + NEW_TOKENS - 1
    # Some layer stored fewer slots at prefill, and its fixed buffer is that much smaller.
    assert min(layer.capacity for layer in cache.layers) < cache.max_cache_len
    assert cache.sparsity_report() == reference.sparsity_report()


def test_compiled_decode_step_is_one_graph_with_the_eager_tokens(sparse_model, compiler):
    inputs = inputs_for("llava")
    eager = greedy(sparse_model, inputs).sequences
    width = inputs["input_ids"].shape[1]
    compiled = torch.compile(sparse_model.forward, fullgraph=True)  # inductor: the code users run
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens = decode(compiled, sparse_model, inputs, sparse_model.new_cache(max_cache_len=width + NEW_TOKENS))
    assert torch.equal(tokens, eager)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, at the first step; the other steps reuse it


def test_a_second_turn_on_a_fixed_cache(converted):
    """A new user turn is a multi-token chunk on a cache that already holds a conversation: it fits in the room left."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")

    def two_turns(cache):
        first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache)
        conversation = torch.cat([first, torch.arange(4, 9).repeat(2, 1)], dim=1)
        attention_mask = torch.cat(
            [inputs["attention_mask"], torch.ones_like(conversation[:, inputs["input_ids"].shape[1] :])], 1
        )
        return model.generate(
            input_ids=conversation, attention_mask=attention_mask, cache=cache, max_new_tokens=4, do_sample=False
        )

    growing, fixed = model.new_cache(), model.new_cache(max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS + 5 + 3)
    assert torch.equal(two_turns(fixed), two_turns(growing))
    assert int(fixed.get_seq_length()) == growing.get_seq_length() == fixed.max_cache_len
    for layer_idx in range(len(fixed.layers)):
        assert torch.equal(fixed.stored_tokens(layer_idx), growing.stored_tokens(layer_idx))


def test_a_fixed_cache_that_is_too_small_fails_clearly(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    with pytest.raises(ValueError, match="max_cache_len=10"):
        model(**inputs, cache=model.new_cache(max_cache_len=10), use_cache=True)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="offloaded")


def test_generate_checks_a_fixed_caches_room_before_it_starts(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    width = inputs["input_ids"].shape[1]
    cache = model.new_cache(max_cache_len=width + NEW_TOKENS - 2)  # one token short
    with pytest.raises(
        ValueError, match=f"max_cache_len={width + NEW_TOKENS - 2}.*max_cache_len={width + NEW_TOKENS - 1}"
    ):
        greedy(model, inputs, cache=cache)
    assert cache.batch_size is None  # refused before the prefill wrote anything


def test_a_hand_written_decode_loop_past_max_cache_len_fails_naming_it(sparse_model):
    """Eager decode steps count on the host: the step that would overflow is refused before it writes anything."""
    inputs = inputs_for("llava")
    width = inputs["input_ids"].shape[1]
    cache = sparse_model.new_cache(max_cache_len=width + 2)
    with pytest.raises(ValueError, match=f"max_cache_len={width + 2}.*brings it to {width + 3}"):
        decode(sparse_model, sparse_model, inputs, cache, steps=3)
    assert int(cache.get_seq_length()) == width + 2  # the two steps that fit ran; the third wrote nothing


@pytest.mark.parametrize("bad", [12.5, "64", True, 0, -3])
def test_max_cache_len_must_be_a_positive_int(converted, bad):
    model = text_sparse_model(converted, "llava")
    with pytest.raises(ValueError, match=f"max_cache_len must be a positive int .*got {bad!r}"):
        model.new_cache(max_cache_len=bad)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        greedy(model, inputs_for("llava"), cache_implementation="static", max_cache_len=bad)


@pytest.mark.parametrize("max_cache_len", [None, 64], ids=["growing", "fixed"])
def test_a_filled_cache_refuses_another_conversation(converted, max_cache_len):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    cache = model.new_cache(max_cache_len=max_cache_len)
    first = greedy(model, inputs, cache=cache).sequences
    held = int(cache.get_seq_length())
    # Another prompt of the same shape, followed by the first one's answer: longer than what the cache holds.
    other, answer = inputs_for("llava", seed=1), first[:, inputs["input_ids"].shape[1] :]
    unrelated = {**other, "input_ids": torch.cat([other["input_ids"], answer], 1)}
    unrelated["attention_mask"] = torch.cat([other["attention_mask"], torch.ones_like(answer)], 1)
    assert unrelated["input_ids"].shape[1] > held
    with pytest.raises(ValueError, match="already holds a conversation.*are not that conversation"):
        greedy(model, unrelated, cache=cache)
    with pytest.raises(ValueError, match="already holds a conversation of 2 rows, and the prompt has 1"):
        greedy(model, {name: value[:1] for name, value in inputs.items()}, cache=cache)
    with pytest.raises(ValueError, match="already holds a conversation of 2 rows, and the input has 1"):
        model(**{name: value[:1] for name, value in inputs.items()}, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="does not extend it"):
        greedy(model, inputs, cache=cache)
    assert int(cache.get_seq_length()) == held  # nothing was written by the refused calls
    # The sequences generate() returned, with a new turn appended, continue the conversation; so does a new one
    # after reset().
    turn = torch.arange(4, 9).repeat(2, 1)
    continued = torch.cat([first, turn], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(continued[:, inputs["input_ids"].shape[1] :])], 1)
    model.generate(input_ids=continued, attention_mask=mask, cache=cache, max_new_tokens=2, do_sample=False)
    cache.reset()
    assert torch.equal(greedy(model, unrelated, cache=cache).sequences, greedy(model, unrelated).sequences)


def test_generating_past_max_position_embeddings_warns_with_a_fixed_cache(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    text_config = model.config.get_text_config()
    limit = text_config.max_position_embeddings
    text_config.max_position_embeddings = inputs["input_ids"].shape[1] + 2
    try:
        for settings in ({"cache_implementation": "static"}, {}):
            with pytest.warns(UserWarning, match="beyond the model's max_position_embeddings") as record:
                greedy(model, inputs, **settings)
            assert sum("max_position_embeddings" in str(warning.message) for warning in record) == 1  # once
    finally:
        text_config.max_position_embeddings = limit


def test_generate_feeds_fixed_cache_steps_static_shapes(converted):
    """generate() hands a fixed cache's decode steps `[batch, 1]` inputs (no growing mask), as a compiled step needs."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(
            {
                name: tuple(kwargs[name].shape)
                for name in ("input_ids", "attention_mask")
                if kwargs.get(name) is not None
            }
        ),
        with_kwargs=True,
    )
    try:
        greedy(model, inputs, cache_implementation="static")
    finally:
        handle.remove()
    assert shapes[1:] == [{"input_ids": (2, 1), "attention_mask": (2, 1)}] * (NEW_TOKENS - 1)


# ---------------------------------------------------------------------------------------------------------------
# Dynamic-LLaVA without a cache: dropped past outputs leave the sequence of layers >= sparse_layer.
# ---------------------------------------------------------------------------------------------------------------


def set_output_keep_margin(model, margin: float | None) -> None:
    """Shift the output-text predictor's keep logit by `margin` (None: leave it)."""
    if margin is not None:
        with torch.no_grad():
            model.output_text_score_predictor.output_mlp[-1].bias.copy_(torch.tensor([margin, -margin]))


def test_no_cache_step_flops_fall_with_the_drop_rate(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    new_tokens = 16
    sequence = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    assert torch.equal(sequence, model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False))
    # One no-cache step as generate() runs it: the whole sequence, only the last position's logits.
    step = {
        "input_ids": sequence[:, :-1],
        "attention_mask": torch.cat(
            [inputs["attention_mask"], torch.ones_like(sequence[:, inputs["input_ids"].shape[1] : -1])], 1
        ),
        "pixel_values": inputs["pixel_values"],
        "output_token_start": inputs["input_ids"].shape[1],
        "use_cache": False,
        "logits_to_keep": 1,
    }
    sparse_layer = model.config.sparse_layer
    bias = model.output_text_score_predictor.output_mlp[-1].bias.clone()
    measured = []
    for margin in (1e4, None, -1e4):  # keep every output, the predictor's mix, drop every past output
        set_output_keep_margin(model, margin)
        with torch.no_grad(), flop_counter() as counter:
            output = model(**step)
        with torch.no_grad():
            model.output_text_score_predictor.output_mlp[-1].bias.copy_(bias)
        counts = output.token_counts[sparse_layer]
        measured.append((counter.get_total_flops(), counts["output_text_seen"] - counts["output_text_kept"]))
    (keep_all, none_dropped), (mixed, some_dropped), (drop_all, all_dropped) = measured
    assert none_dropped.sum() == 0 < some_dropped.sum() < all_dropped.sum()
    assert all_dropped.tolist() == [new_tokens - 2] * 2  # every past output but the newest token
    assert keep_all > mixed > drop_all
    # Rows stay rectangular, so a layer's stream narrows by the fewest tokens a row drops; what leaving the sequence
    # saves is at least those tokens' projections and FFN in every layer >= sparse_layer, in every row.
    layers = model.language_model.layers[sparse_layer:]
    per_token = sum(
        2 * module.weight.numel()
        for layer in layers
        for module in layer.modules()
        if isinstance(module, torch.nn.Linear)
    )
    for flops, dropped in ((mixed, some_dropped), (drop_all, all_dropped)):
        assert keep_all - flops >= len(dropped) * int(dropped.min()) * per_token
