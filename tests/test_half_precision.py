"""
bfloat16 and float16: each method's keep decisions, tokens and logits against its own float32 run, with dense LLaVA
(transformers' own class, loaded in the same dtype) as the yardstick of what half precision costs on these inputs.

Every model is saved and loaded back with `from_pretrained(..., dtype=...)`, the way users load a checkpoint in half
precision, so that the decision modules keep their float32 weights (`_keep_in_fp32_modules_strict`).
"""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import generated_cache, load_dynamic
from test_dynamic_llava_decode import force_output_decisions
from test_dynamic_llava_prefill import spread_predictor_scores
from test_pmod import pmod_from
from test_yopo import ALL_KNOBS, yopo_from
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from sparse_llava import (
    DynamicLlavaForConditionalGeneration,
    PMoDLlavaForConditionalGeneration,
    YopoLlavaForConditionalGeneration,
)
from sparse_llava.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, tiny_inputs

HALF_DTYPES = [torch.bfloat16, torch.float16]
METHOD_CLASSES = {
    "dynamic-llava": DynamicLlavaForConditionalGeneration,
    "p-mod": PMoDLlavaForConditionalGeneration,
    "yopo": YopoLlavaForConditionalGeneration,
}
DENSE_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
CACHE_MODES = {"cache": {}, "no cache": {"use_cache": False}, "static": {"cache_implementation": "static"}}
NEW_TOKENS = 6

# A method's half-precision logits may differ from its float32 logits by at most this many times dense LLaVA's own
# half-vs-float32 difference on the same rows and steps. With the same tokens kept, the methods run the same layers
# on fewer tokens: their error is 0.2-2.4x dense's on these tiny models. One decision that differs (another vision
# token kept or skipped) moves the logits by 8-50x dense's error.
LOGIT_ERROR_FACTOR = 4


def inputs_for(base, dtype):
    """Four padded rows (LLaVA-NeXT: square, wide and tall images), floats in `dtype`."""
    sizes = [[2 * IMAGE_SIZE, 2 * IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]] * 2
    inputs = tiny_inputs(
        base, batch_size=4, left_padding=[0, 7, 3, 0], seed=1, image_sizes=sizes[:4] if base == "llava_next" else None
    )
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def method_model(method, base, base_checkpoints, converted):
    """Each method deciding something: spread predictor scores, random routers, every YOPO knob."""
    base_model = base_checkpoints[(base, "hub")][1]
    if method == "dynamic-llava":
        model = load_dynamic(converted(base))
        spread_predictor_scores(model)
        force_output_decisions(model)
    elif method == "p-mod":
        model = pmod_from(base_model)
    else:
        model = yopo_from(base_model, **ALL_KNOBS)
    model.generation_config = copy.deepcopy(base_model.generation_config)  # never generates the image placeholder
    return model


@pytest.fixture(scope="module")
def runs(base_checkpoints, converted, tmp_path_factory):
    """
    `runs(name, base, dtype)` -> `(model, results)`: model `name` ("dense" or a method) loaded in `dtype` from a
    saved float32 folder, and per cache mode its greedy `(new tokens, logits [batch, steps, vocab], cache, layer
    calls)`, where `layer calls` are the `(layer_idx, stream in, stream out, cache)` of each `before_layer`.
    """
    root = tmp_path_factory.mktemp("half_precision")
    made = {}

    def run(name, base, dtype):
        if (name, base, dtype) in made:
            return made[(name, base, dtype)]
        if name == "dense":
            model = DENSE_CLASSES[base].from_pretrained(base_checkpoints[(base, "hub")][0], dtype=dtype)
        else:
            folder = root / f"{name}-{base}"
            if not folder.exists():
                method_model(name, base, base_checkpoints, converted).save_pretrained(folder)
            model = METHOD_CLASSES[name].from_pretrained(folder, dtype=dtype)
        calls = record_layer_decisions(model.eval())
        results = {}
        for mode, settings in CACHE_MODES.items():
            calls.clear()
            output = model.generate(
                **inputs_for(base, dtype),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                **settings,
            )
            cache = generated_cache(output) if settings.get("use_cache", True) else None
            logits = torch.stack(output.logits, dim=1).float()
            results[mode] = (output.sequences[:, -NEW_TOKENS:], logits, cache, list(calls))
        made[(name, base, dtype)] = model, results
        return made[(name, base, dtype)]

    return run


def record_layer_decisions(model) -> list:
    """Record each `before_layer` call of `model` (where a method decides what a layer keeps) into the list returned."""
    calls = []
    if hasattr(model, "before_layer"):
        original = model.before_layer

        def recording(layer_idx, stream, cache):
            result = original(layer_idx, stream, cache)
            calls.append((layer_idx, stream, result, cache))
            return result

        model.before_layer = recording
    return calls


def kept(stream):
    """What a layer keeps of a stream: its slots, where they came from, and which it admits."""
    admit = stream.valid if stream.admit is None else stream.admit
    return stream.valid, stream.source_index, admit


def rows_deciding_alike(half_calls, full_calls, num_layers):
    """`[batch]` bool: the rows whose prefill (the first forward's layers) kept the same tokens in both runs."""
    same = None
    for (_, _, half, _), (_, _, full, _) in zip(half_calls[:num_layers], full_calls[:num_layers], strict=True):
        for half_part, full_part in zip(kept(half), kept(full), strict=True):
            row_same = (half_part == full_part).flatten(1).all(-1) if half_part.shape == full_part.shape else False
            same = row_same if same is None else same & row_same
    return same


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("method", list(METHOD_CLASSES))
@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_decisions_are_float32_decisions_of_the_same_hidden_states(base, method, dtype, runs):
    """
    Every decision the half-precision model makes (prefill and each decode step, with and without a cache) is the one
    the float32 model makes from the same hidden states: routers and predictors score in float32.
    """
    full_model = runs(method, base, torch.float32)[0]
    half_results = runs(method, base, dtype)[1]
    decisions = 0
    for mode in CACHE_MODES:
        for layer_idx, stream, result, cache in half_results[mode][3]:
            upcast = replace(stream, hidden_states=stream.hidden_states.float())
            with torch.no_grad():
                expected = full_model.before_layer(layer_idx, upcast, cache)
            for part, expected_part in zip(kept(result), kept(expected), strict=True):
                assert torch.equal(part, expected_part), (mode, layer_idx)
            decisions += result is not stream
    assert decisions > 0  # some layer did keep fewer tokens


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("method", list(METHOD_CLASSES))
@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_half_precision_follows_float32_where_dense_llava_does(base, method, dtype, runs):
    """
    In rows where dense LLaVA's half-precision tokens are its float32 tokens, and the method kept the same tokens at
    prefill as in float32: the same tokens (up to the method's own near-ties), logits within the bound, and the same
    tokens stored in each layer's cache.
    """
    dense = {mode: runs("dense", base, dtype)[1][mode] for mode in ("cache", "no cache")}
    dense_full = {mode: runs("dense", base, torch.float32)[1][mode] for mode in ("cache", "no cache")}
    half, full = runs(method, base, dtype)[1], runs(method, base, torch.float32)[1]
    num_layers = runs(method, base, dtype)[0].config.text_config.num_hidden_layers
    compared = steps_compared = 0
    for mode in CACHE_MODES:
        dense_mode = "no cache" if mode == "no cache" else "cache"
        dense_rows = (dense[dense_mode][0] == dense_full[dense_mode][0]).all(-1)
        if not dense_rows.any():
            continue
        dense_error = float((dense[dense_mode][1] - dense_full[dense_mode][1])[dense_rows].abs().max())
        rows = dense_rows & rows_deciding_alike(half[mode][3], full[mode][3], num_layers)
        (tokens, logits, cache, _), (full_tokens, full_logits, full_cache, _) = half[mode], full[mode]
        top_two = full_logits.index_fill(-1, torch.tensor([IMAGE_TOKEN_ID]), -torch.inf).topk(2, dim=-1).values
        margin = top_two[..., 0] - top_two[..., 1]
        step_error = (logits - full_logits).abs().amax(-1)  # [batch, steps]
        for row in rows.nonzero().flatten():
            differs = (tokens[row] != full_tokens[row]).nonzero().flatten()
            first_difference = int(differs[0]) if len(differs) else NEW_TOKENS
            # generate() suppresses the image placeholder (output_logits are before that); up to the first different
            # token the prefixes are the same, so the logits are comparable.
            error = float(step_error[row, : first_difference + 1].max())
            assert error <= LOGIT_ERROR_FACTOR * dense_error, (mode, int(row), error, dense_error)
            if first_difference < NEW_TOKENS:
                # Tokens may swap only at a near-tie of the method's own: float32's top two logits closer than the
                # half-precision error there. A random tiny model has such steps in rows where dense LLaVA has none.
                assert margin[row, first_difference] < 2 * step_error[row, first_difference], (mode, int(row))
            steps_compared += first_difference
            if cache is not None and bool((tokens[row] == full_tokens[row]).all()):
                for layer_idx in range(num_layers):
                    assert cache.stored_tokens(layer_idx)[row] == full_cache.stored_tokens(layer_idx)[row]
                for report, full_report in zip(cache.sparsity_report(), full_cache.sparsity_report(), strict=True):
                    assert {key: counts[row] for key, counts in report.items()} == {
                        key: counts[row] for key, counts in full_report.items()
                    }
        compared += int(rows.sum())
    # Most rows take part, and most of their steps are generated alike.
    assert compared >= 0.5 * len(CACHE_MODES) * len(rows) and steps_compared >= 0.5 * compared * NEW_TOKENS


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_decision_modules_load_in_float32(dtype, runs):
    """Everything else loads in `dtype`; the routers and predictors, whose scores rank tokens, stay float32."""
    for method, decision_modules in (
        ("dynamic-llava", ("image_score_predictor", "output_text_score_predictor")),
        ("p-mod", ("routers",)),
    ):
        model = runs(method, "llava", dtype)[0]
        for name, parameter in model.named_parameters():
            assert parameter.dtype == (torch.float32 if name.startswith(decision_modules) else dtype), name


def test_router_scores_in_float32_after_a_cast(base_checkpoints):
    """`model.to(torch.bfloat16)` casts the router's weights too; its logits (from exact upcasts) stay float32."""
    model = pmod_from(base_checkpoints[("llava", "hub")][1]).to(torch.bfloat16)
    router = model.routers[str(model.config.mod_layers[0])]
    hidden = torch.randn(2, 5, model.config.text_config.hidden_size).to(torch.bfloat16)
    logits = router(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ router.weight.float().T + router.bias.float())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_router_ranks_thousands_of_tokens_as_float32(dtype, runs):
    """
    Thousands of vision tokens in each MoD layer: rounded to half precision, their router logits would tie by the
    hundreds, also at the boundary of the kept set; the half-precision model keeps the float32 model's tokens for the
    same hidden states.
    """
    half_model, full_model = runs("p-mod", "llava", dtype)[0], runs("p-mod", "llava", torch.float32)[0]
    num_text, num_vision = 4, 9000
    hidden = torch.randn(1, num_text + num_vision, half_model.config.text_config.hidden_size).to(dtype)
    image_index = torch.tensor([-1] * num_text + [0] * num_vision)[None]
    image_offset = torch.tensor([-1] * num_text + list(range(num_vision)))[None]
    stream = half_model.make_stream(hidden, None, None, None, (image_index, image_offset), (num_vision,), None, None)
    for layer_idx in half_model.config.mod_layers:
        with torch.no_grad():
            routed = half_model.before_layer(layer_idx, stream, None)
            expected = full_model.before_layer(layer_idx, replace(stream, hidden_states=hidden.float()), None)
        assert torch.equal(routed.admit, expected.admit), layer_idx
        assert 0 < int((~routed.admit).sum()) < num_vision
