"""Attention backends: flex_attention and the flash backends give SDPA's tokens for every method, base and case
(prefill, decoding with a cache, a padded batch, a second turn on the cache), or refuse with one line naming the
backend to use instead.

Both run on the CPU here, through the code paths transformers takes on a GPU:

* flex_attention through transformers' `flex_attention_forward`, with `flex_attention` itself uncompiled
  (`uncompiled_flex`): transformers compiles it on first use, and inductor's CPU kernel is not what is under test;
* flash through transformers' `flash_attention_forward` (its unpadding, its mask: the 2-D key mask of
  `flash_attention_mask`), with reference kernels of flash-attn's semantics (`reference_flash`,
  `reference_flash_varlen`: causality aligned bottom right) in place of the CUDA ones, registered through
  `AttentionInterface` / `AttentionMaskInterface` under a flash name, as the `kernels` hub backends are.
"""

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import load_dynamic
from test_dynamic_llava_decode import force_output_decisions
from test_dynamic_llava_prefill import inputs_for, spread_predictor_scores
from test_pmod import pmod_from
from test_static_decode import decode
from test_yopo import ALL_KNOBS, yopo_from
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface
from transformers.integrations import flex_attention as transformers_flex
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from sparse_llava import compat_transformers
from sparse_llava.compat_transformers import IS_TRANSFORMERS_V5

RELEASE = f"transformers {transformers.__version__}"
METHODS = ("dynamic-llava", "p-mod", "yopo")
BASES = ("llava", "llava_next")
NEW_TOKENS = 4
STEPS = 5  # decode steps of the compiled test
COMPILE_BACKEND = "inductor"
# A flash backend as the `kernels` hub ones are: registered under a name with "flash" in it (how transformers and
# sparse-llava tell a flash backend), with transformers' flash attention function and mask.
FLASH_REFERENCE = "flash_reference"
FLASH_NAMES = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2")


# ---------------------------------------------------------------------------------------------------------------
# The backends on the CPU.
# ---------------------------------------------------------------------------------------------------------------


def run_flex_uncompiled(monkeypatch):
    """Let transformers' flex_attention_forward call flex_attention uncompiled (its `compile_friendly_...` compiles)."""
    assert hasattr(transformers_flex, "compile_friendly_flex_attention"), (
        f"{RELEASE}: integrations.flex_attention.compile_friendly_flex_attention is gone; make the tests run "
        "flex_attention uncompiled another way"
    )

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", uncompiled)


@pytest.fixture
def uncompiled_flex(monkeypatch):
    run_flex_uncompiled(monkeypatch)


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func: `[batch, tokens, heads, head_dim]`, fewer key/value heads shared by groups, causality aligned
    bottom right (the last query sees every key)."""
    q, k, v = (states.transpose(1, 2) for states in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    query_length, key_length = q.shape[2], k.shape[2]
    mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale).transpose(1, 2)


def reference_flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """flash_attn_varlen_func: sequences packed along the first dimension, bounded by the cumulative lengths."""
    bounds = zip(itertools.pairwise(cu_seqlens_q.tolist()), itertools.pairwise(cu_seqlens_k.tolist()))
    sequences = [
        reference_flash(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale=softmax_scale, causal=causal)
        for (qs, qe), (ks, ke) in bounds
    ]
    return torch.cat([sequence[0] for sequence in sequences])


@pytest.fixture
def reference_flash_kernels(monkeypatch):
    """
    transformers' flash path, on the reference kernels: its kernel loader (`_lazy_imports`, private) hands them out for
    every flash backend name, and `FLASH_REFERENCE` and the kernel names of `FLASH_NAMES` are registered as the hub
    kernels register themselves (transformers' flash attention function and mask), until the test ends.
    """
    from transformers import modeling_flash_attention_utils as flash_utils

    loaded = ["_loaded_implementation"] if IS_TRANSFORMERS_V5 else ["_flash_fn", "_flash_varlen_fn", "_pad_fn"]
    for name in ("_lazy_imports", "_pad_input", "_unpad_input", *loaded):
        assert hasattr(flash_utils, name), f"{RELEASE}: modeling_flash_attention_utils.{name} is gone"
    no_kvcache = (None,) if IS_TRANSFORMERS_V5 else ()
    kernels = (reference_flash, reference_flash_varlen, *no_kvcache, flash_utils._pad_input, flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    for name in loaded:  # forget kernels loaded before
        monkeypatch.setattr(flash_utils, name, None)
    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.setattr(interface, "_global_mapping", dict(interface._global_mapping))
    for name in (FLASH_REFERENCE, *FLASH_NAMES):
        AttentionInterface.register(name, flash_attention_forward)
        AttentionMaskInterface.register(name, flash_attention_mask)


@pytest.fixture
def backends(uncompiled_flex, reference_flash_kernels):
    """Both backends runnable on the CPU."""


def use_backend(model, backend: str):
    """Point every sub-config of `model` at `backend`, without transformers' checks for CUDA and installed kernels."""
    for config in (model.config, model.config.get_text_config(), model.config.vision_config):
        config._attn_implementation = backend
    return model


def sparse_model(method, base, base_checkpoints, converted, attn_implementation):
    """Each method on a tiny base, deciding something at prefill and (Dynamic-LLaVA) while decoding."""
    base_model = base_checkpoints[(base, "hub")][1]
    if method == "dynamic-llava":
        model = load_dynamic(converted(base), attn_implementation=attn_implementation)
        spread_predictor_scores(model)
        force_output_decisions(model)
        return model
    model = pmod_from(base_model) if method == "p-mod" else yopo_from(base_model, **ALL_KNOBS)
    model.set_attn_implementation(attn_implementation)
    return model


def greedy(model, inputs, cache, new_tokens=NEW_TOKENS):
    return model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def conversation(model, inputs):
    """
    Prefill logits of a padded batch, then greedy decoding with a cache, then a second user turn (a multi-token chunk
    on that cache) decoded on: `(prefill logits, [logits of each generated token], all tokens)`.
    """
    cache = model.new_cache()
    with torch.no_grad():
        prefill = model(**inputs).logits
    first = greedy(model, inputs, cache)
    turn = torch.arange(4, 9).repeat(first.sequences.shape[0], 1)
    tokens = torch.cat([first.sequences, turn], dim=1)
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones_like(tokens[:, inputs["input_ids"].shape[1] :])], 1
    )
    second = greedy(model, {"input_ids": tokens, "attention_mask": attention_mask}, cache)  # the images are cached
    return prefill, list(first.logits) + list(second.logits), second.sequences


# ---------------------------------------------------------------------------------------------------------------
# Every case the backends can express: SDPA's tokens.
# ---------------------------------------------------------------------------------------------------------------


def test_every_method_loads_with_flex_and_flash_backends(backends, converted, converted_pmod, converted_yopo):
    from sparse_llava import (
        DynamicLlavaForConditionalGeneration,
        PMoDLlavaForConditionalGeneration,
        YopoLlavaForConditionalGeneration,
    )

    for model_class, folder in (
        (DynamicLlavaForConditionalGeneration, converted("llava")),
        (PMoDLlavaForConditionalGeneration, converted_pmod("llava")),
        (YopoLlavaForConditionalGeneration, converted_yopo("llava")),
    ):
        for backend in ("flex_attention", FLASH_REFERENCE):
            model = model_class.from_pretrained(folder, attn_implementation=backend)
            assert model.config.get_text_config()._attn_implementation == backend


@pytest.mark.parametrize("backend", ["flex_attention", FLASH_REFERENCE])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", METHODS)
def test_backend_gives_sdpas_tokens(method, base, backend, backends, base_checkpoints, converted, monkeypatch):
    inputs = inputs_for(base)  # a padded batch
    expected_prefill, expected_steps, expected_tokens = conversation(
        sparse_model(method, base, base_checkpoints, converted, "sdpa"), inputs
    )
    model = sparse_model(method, base, base_checkpoints, converted, backend)
    block_mask_heads = []
    build_block_mask = compat_transformers.flex_block_mask

    def recording_block_mask(mask_function, batch_size, num_heads, *args):
        block_mask_heads.append(num_heads)
        return build_block_mask(mask_function, batch_size, num_heads, *args)

    monkeypatch.setattr(compat_transformers, "flex_block_mask", recording_block_mask)
    prefill, steps, tokens = conversation(model, inputs)

    valid = inputs["attention_mask"].bool()
    assert (prefill - expected_prefill)[valid].abs().max() <= 1e-4
    assert torch.equal(tokens, expected_tokens)
    assert (torch.stack(steps) - torch.stack(expected_steps)).abs().max() <= 1e-4
    if backend == "flex_attention":
        assert block_mask_heads, "the layers' masks were not flex block masks"
        # YOPO's decode steps in layers whose pruned heads hold vision keys: one mask per head, in transformers' layer.
        num_heads = model.config.get_text_config().num_attention_heads
        assert (num_heads in block_mask_heads) == (method == "yopo")


def teacher_forcing_inputs(base):
    """A prompt with an answer after it, fed at once: generated tokens whose admission is decided inside the chunk."""
    inputs = inputs_for(base)
    width = inputs["input_ids"].shape[1]
    answer = torch.arange(10, 10 + NEW_TOKENS).repeat(2, 1)
    return {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], answer], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1),
        "output_token_start": width,
    }


@pytest.mark.parametrize("use_cache", [True, False])
def test_flex_admission_inside_a_chunk_gives_sdpas_logits(use_cache, backends, base_checkpoints, converted):
    inputs = teacher_forcing_inputs("llava")
    logits = {}
    for backend in ("sdpa", "flex_attention"):
        model = sparse_model("dynamic-llava", "llava", base_checkpoints, converted, backend)
        with torch.no_grad():
            output = model(**inputs, use_cache=use_cache)
        logits[backend] = output.logits
        # Admission really decided something inside the chunk: some answer tokens were not admitted.
        counts = output.token_counts[model.config.sparse_layer]
        assert (counts["output_text_kept"] < counts["output_text_seen"]).any()
    valid = inputs["attention_mask"].bool()
    assert (logits["flex_attention"] - logits["sdpa"])[valid].abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# What flash cannot express: one line naming the backend and the one to use instead.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLASH_NAMES)
def test_flash_refuses_admission_inside_a_chunk(backend, backends, base_checkpoints, converted):
    model = use_backend(sparse_model("dynamic-llava", "llava", base_checkpoints, converted, "sdpa"), backend)
    for use_cache in (True, False):
        with pytest.raises(ValueError) as refusal, torch.no_grad():
            model(**teacher_forcing_inputs("llava"), use_cache=use_cache)
        assert str(refusal.value) == (
            "DynamicLlavaForConditionalGeneration: admission inside a multi-token chunk (generated tokens fed back at "
            f"once) cannot be expressed by {backend}; use attn_implementation='sdpa' or 'flex_attention'"
        )


@pytest.mark.parametrize("backend", [*FLASH_NAMES, "flex_attention"])
def test_training_keep_policy_is_refused_outside_sdpa_and_eager(backend, backends, base_checkpoints, converted):
    model = use_backend(sparse_model("dynamic-llava", "llava", base_checkpoints, converted, "sdpa"), backend).train()
    inputs = inputs_for("llava")
    # Without gradients: flex_attention has no backward on the CPU (the layers before the policy's would need it).
    with pytest.raises(ValueError) as refusal, torch.no_grad():
        model(**inputs, labels=inputs["input_ids"], use_cache=False)
    assert str(refusal.value) == (
        "DynamicLlavaForConditionalGeneration: the training keep policy (a float attention mask) cannot be expressed "
        f"by {backend}; use attn_implementation='sdpa' or 'eager'"
    )


def test_flash_refuses_a_per_head_mask(backends):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    config._attn_implementation = "flash_attention_2"
    visible = torch.ones(2, 5, dtype=torch.bool)
    assert compat_transformers.single_query_mask(config, visible, torch.float32) is visible  # the 2-D key mask
    with pytest.raises(ValueError, match=r"^per-head attention masks cannot be expressed by flash_attention_2; use"):
        compat_transformers.single_query_mask(config, visible[:, None].expand(-1, 2, -1), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# flex_attention with the fixed-capacity cache: static shapes, no host synchronisation, one graph.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_flex_decode_step_masks_are_one_graph_reading_only_filled_slots(compiler):
    """
    A decode step's flex mask on a fixed-capacity layer is built on the device from the layer's slot validity: it
    compiles with `fullgraph=True` (no host synchronisation), once for every step (static shapes), and attention under
    it reads exactly the row's filled slots and the new token's.
    """
    from sparse_llava.cache_sparse_llava import IncomingChunk, SparseCache

    config = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    config._attn_implementation = "flex_attention"
    cache = SparseCache(num_layers=1, max_cache_len=5 + STEPS)
    prompt = torch.tensor([[False, False, True, True, True], [True] * 5])  # a padded row
    states = torch.randn(2, 2, 5, 4)
    cache.begin_chunk(0, IncomingChunk(valid=prompt, admit=None, logical_length=5))
    cache.update(states, states, 0)
    compile_counter = CompileCounterWithBackend(COMPILE_BACKEND)
    step_mask = torch.compile(compat_transformers.single_query_mask, backend=compile_counter, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(STEPS):
            admit = torch.tensor([[step % 2 == 0], [step % 3 == 0]])  # rows admit different tokens: holes, lengths
            visible = cache.begin_chunk(0, IncomingChunk(valid=torch.ones_like(admit), admit=admit, logical_length=1))
            block_mask = step_mask(config, visible, torch.float32)
            new = torch.randn(2, 2, 1, 4, generator=generator)
            keys, values = cache.update(new, new, 0)
            assert keys.shape[2] == cache.layers[0].capacity  # the whole fixed buffer: static shapes
            query = torch.randn(2, 4, 1, 4, generator=generator)
            actual = flex_attention(query, keys, values, block_mask=block_mask, enable_gqa=True)
            expected = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=visible[:, None, None, :], enable_gqa=True
            )
            assert (actual - expected).abs().max() <= 1e-5
    assert compile_counter.frame_count == 1


@pytest.mark.xfail(
    importlib.util.find_spec("kernels") is not None,
    strict=True,
    raises=torch._dynamo.exc.RecompileError,
    reason=(
        "torch 2.13's dynamo loses a reset of the `kernels` hub hook's context variable traced after a flex_attention "
        "call (transformers wraps the attention with it when `kernels` is installed), so the second step recompiles"
    ),
)
def test_flex_decode_steps_on_a_fixed_cache_are_one_graph(backends, base_checkpoints, converted, compiler):
    """
    Dynamic-LLaVA decoding (a token admitted or not at each step) under flex_attention on a fixed-capacity cache,
    compiled with `fullgraph=True`: one graph that every later step reuses, with SDPA's tokens.
    """
    inputs = inputs_for("llava")
    width = inputs["input_ids"].shape[1]
    reference = sparse_model("dynamic-llava", "llava", base_checkpoints, converted, "sdpa")
    expected = decode(reference, reference, inputs, reference.new_cache(), steps=STEPS)
    model = sparse_model("dynamic-llava", "llava", base_checkpoints, converted, "flex_attention")
    cache = model.new_cache(max_cache_len=width + STEPS + 1)
    prefill_then_one_step = decode(model, model, inputs, cache, steps=1)  # eager, as generate() runs them
    assert torch.equal(prefill_then_one_step, expected[:, : width + 2])

    compile_counter = CompileCounterWithBackend(COMPILE_BACKEND)
    compiled = torch.compile(model.forward, backend=compile_counter, fullgraph=True)
    tokens = [prefill_then_one_step[:, -1:].clone()]
    position = inputs["attention_mask"].long().sum(-1, keepdim=True) + 1
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(STEPS - 1):
            logits = compiled(
                input_ids=tokens[-1],
                attention_mask=torch.ones_like(tokens[-1]),
                position_ids=position + step,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                output_token_start=width,
            ).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat([prefill_then_one_step, *tokens[1:]], dim=1), expected)
    assert compile_counter.frame_count == 1  # compiled once, at the first step; the other steps reuse it
