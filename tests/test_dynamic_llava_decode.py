"""Dynamic-LLaVA decoding: output-token dropping without a cache, online KV admission with one."""

import pytest
import torch
from conftest import generated_cache, load_dynamic
from test_dynamic_llava_prefill import inputs_for, row_alone, spread_predictor_scores
from transformers.cache_utils import Cache

NEW_TOKENS = 12


def force_output_decisions(model, keep_all: bool = False, seed: int = 3):
    """
    Keep everything, or give the output-text predictor random weights with a symmetric last layer (keep logit = -drop
    logit), so that it keeps some generated tokens and drops others (seed 3: about half, in both tiny bases).
    """
    last = model.output_text_score_predictor.output_mlp[-1]
    with torch.no_grad():
        if keep_all:
            last.weight.zero_()
            last.bias.copy_(torch.tensor([10.0, -10.0]))
            return
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.output_text_score_predictor.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        direction = torch.randn(last.weight.shape[1], generator=generator)
        last.weight.copy_(torch.stack([direction, -direction]))
        last.bias.zero_()


def text_sparse_model(converted, base="llava", keep_all=False, **overrides):
    model = load_dynamic(converted(base, **overrides))
    spread_predictor_scores(model)
    force_output_decisions(model, keep_all=keep_all)
    return model


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_keep_everything_equals_dense_llava(base, base_checkpoints, converted):
    base_model = base_checkpoints[(base, "hub")][1]
    model = text_sparse_model(converted, base, keep_all=True, vision_keep_ratio=1.0)
    inputs = inputs_for(base)
    expected = base_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    for use_cache in (True, False):
        actual = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache)
        assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_cached_and_uncached_compute_the_same_sparsified_attention(base, converted):
    model = text_sparse_model(converted, base)
    inputs = inputs_for(base)
    cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert cached.sequences.tolist() == uncached.tolist()
    # The decisions really were mixed: some generated tokens admitted, some not.
    report = generated_cache(cached).sparsity_report()
    sparse = report[model.config.sparse_layer]
    assert all(0 < kept < seen for kept, seen in zip(sparse["output_text_kept"], sparse["output_text_seen"]))
    dense = report[0]
    assert dense["output_text_kept"] == dense["output_text_seen"] == [NEW_TOKENS - 1] * 2


def test_uncached_no_dropping_changes_the_result(converted):
    """Guard for the test above: output-token dropping does change generation here, so equality means something."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    sparse = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    model.config.text_sparsification = False
    dense = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert sparse.tolist() != dense.tolist()


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_padded_batch_equals_each_sample_alone_while_decoding(base, converted):
    model = text_sparse_model(converted, base)
    inputs = inputs_for(base)
    batched = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    for row in range(2):
        alone = model.generate(
            **row_alone(inputs, row), max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
        )
        assert alone.sequences[0, -NEW_TOKENS:].tolist() == batched.sequences[row, -NEW_TOKENS:].tolist()
        for layer_idx in range(model.config.text_config.num_hidden_layers):
            batched_stored = generated_cache(batched).stored_tokens(layer_idx)[row]
            assert int(generated_cache(alone).stored_tokens(layer_idx)[0]) == int(batched_stored), layer_idx


def test_admission_follows_the_predictor(converted):
    """Layers >= sparse_layer store the prompt's kept tokens plus exactly the generated tokens the predictor keeps."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    decisions = []
    handle = model.output_text_score_predictor.register_forward_hook(
        lambda module, args, logits: decisions.append(logits[..., 0] > logits[..., 1])
    )
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
    prompt_stored = [prefill.cache.stored_tokens(i).clone() for i in range(4)]
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    handle.remove()
    admitted = torch.cat(decisions, dim=1).sum(-1)  # one decision per fed generated token
    assert torch.cat(decisions, dim=1).shape[1] == NEW_TOKENS - 1
    cache = generated_cache(output)
    for layer_idx in range(4):
        stored = cache.stored_tokens(layer_idx)
        if layer_idx < model.config.sparse_layer:
            assert stored.tolist() == (prompt_stored[layer_idx] + NEW_TOKENS - 1).tolist()
        else:
            assert stored.tolist() == (prompt_stored[layer_idx] + admitted).tolist()


def test_memory_bytes_is_what_the_stored_tokens_imply(converted):
    model = text_sparse_model(converted, "llava")
    output = model.generate(
        **inputs_for("llava"), max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
    )
    cache = generated_cache(output)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    bytes_per_token = 2 * text.num_key_value_heads * head_dim * 4  # keys and values, float32
    stored = sum(int(cache.stored_tokens(i).sum()) for i in range(text.num_hidden_layers))
    assert cache.memory_bytes() == stored * bytes_per_token
    assert cache.allocated_bytes() >= cache.memory_bytes()


def test_sampling_with_a_fixed_seed(converted):
    model = text_sparse_model(converted, "llava_next")
    inputs = inputs_for("llava_next")
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, use_cache=use_cache))
    assert runs[0].tolist() == runs[1].tolist()


def test_beam_search_cached_equals_uncached(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    cached = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_modes_that_roll_back_the_cache_fail_clearly(converted):
    model = text_sparse_model(converted, "llava")
    with torch.no_grad():
        cache = model(**inputs_for("llava"), use_cache=True).cache
    if hasattr(Cache, "is_croppable"):  # newer generate()s read it before rolling back a cache
        assert not cache.is_croppable
    cache.crop(0)  # nothing to remove: fine
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_multi_turn_chunk_is_admitted_whole(converted):
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    cache = generated_cache(first)
    before = [cache.stored_tokens(i).clone() for i in range(4)]
    turn = torch.randint(4, 90, (2, 5))
    conversation = torch.cat([first.sequences, turn], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW_TOKENS + 5, dtype=torch.long)], dim=1)
    second = model.generate(
        input_ids=conversation,
        attention_mask=attention_mask,
        cache=cache,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
    )
    # The chunk (turn 1's last generated token, never fed yet, and the 5 user tokens) is stored whole in every
    # layer; of the 3 tokens fed while generating turn 2, the full layers store all, the sparse ones what they admit.
    for layer_idx in range(4):
        after_turn = before[layer_idx] + 1 + 5
        stored = generated_cache(second).stored_tokens(layer_idx)
        if layer_idx < model.config.sparse_layer:
            assert stored.tolist() == (after_turn + 3).tolist()
        else:
            assert (stored >= after_turn).all() and (stored <= after_turn + 3).all()
    counts = generated_cache(second).sparsity_report()[model.config.sparse_layer]
    assert counts["output_text_seen"] == [NEW_TOKENS - 1 + 3] * 2


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_eager_attention_matches_sdpa(base, converted):
    """The per-layer physical masks are right for the eager backend too (it always materialises them)."""
    results = {}
    for implementation in ("eager", "sdpa"):
        model = load_dynamic(converted(base), attn_implementation=implementation)
        assert model.config.text_config._attn_implementation == implementation
        spread_predictor_scores(model)
        force_output_decisions(model)
        inputs = inputs_for(base)
        with torch.no_grad():
            logits = model(**inputs).logits
        cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist()
        results[implementation] = (logits, cached)
    valid = inputs["attention_mask"].bool()
    assert (results["eager"][0] - results["sdpa"][0])[valid].abs().max() <= 1e-4
    assert results["eager"][1].tolist() == results["sdpa"][1].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_teacher_forcing_equals_token_by_token_decoding(converted, use_cache):
    """Feeding prompt + answer in one forward gives, at every answer position, the logits of step-by-step decoding."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    prompt_width = inputs["input_ids"].shape[1]
    steps = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    step_logits = torch.stack(steps.logits, dim=1)  # [batch, NEW_TOKENS, vocab]: logits that chose each token
    assert generated_cache(steps).sparsity_report()[2]["output_text_kept"] != [NEW_TOKENS - 1] * 2
    sequence = steps.sequences[:, :-1]
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW_TOKENS - 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        forced = model(
            input_ids=sequence,
            attention_mask=attention_mask,
            pixel_values=inputs["pixel_values"],
            output_token_start=prompt_width,
            use_cache=use_cache,
        ).logits
    assert (forced[:, prompt_width - 1 :] - step_logits).abs().max() <= 1e-4
