"""The installed transformers release, against what sparse-llava needs of it.

One test per private transformers API listed in `modeling/compat_transformers.py`'s docstring: each fails with a
message naming the hook when a release changes it. Then the version gate, the cache's name, and the refusal of
weights that did not load.
"""

import inspect
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_attention_backends import reference_flash_kernels, run_flex_uncompiled  # noqa: F401  (a fixture)
from transformers import AutoModelForImageTextToText

import sparse_llava
from sparse_llava import compat_transformers
from sparse_llava.compat_transformers import CACHE_NAME, IS_TRANSFORMERS_V5, check_transformers_version
from sparse_llava.tiny import tiny_inputs

RELEASE = f"transformers {transformers.__version__}"
# A Python whose transformers is outside the supported range (CI: a venv with 5.2.0).
UNSUPPORTED_PYTHON = os.environ.get("SPARSE_LLAVA_UNSUPPORTED_PYTHON")


def parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_hook_checkpoint_conversion_mapping(converted):
    if IS_TRANSFORMERS_V5:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        renames = get_checkpoint_conversion_mapping("DynamicLlavaForConditionalGeneration")
        assert renames, f"{RELEASE}: get_checkpoint_conversion_mapping no longer holds our registered key renames"
    else:
        mapping = sparse_llava.DynamicLlavaForConditionalGeneration._checkpoint_conversion_mapping
        assert mapping == compat_transformers.CHECKPOINT_KEY_MAPPING_V4, f"{RELEASE}: _checkpoint_conversion_mapping"
    # The renames in action: a llava-hf layout folder loads with every weight found (raises otherwise).
    sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava"))


def test_hook_attention_backend():
    config = sparse_llava.DynamicLlavaConfig(text_config={"model_type": "llama"}, vision_config={})
    assert hasattr(config.get_text_config(), "_attn_implementation"), f"{RELEASE}: config._attn_implementation is gone"


def test_hook_causal_mask_per_layer():
    from transformers.masking_utils import create_causal_mask

    if IS_TRANSFORMERS_V5:
        needed = {CACHE_NAME, "layer_idx", "and_mask_function", "allow_is_causal_skip"}
        missing = needed - parameters(create_causal_mask)
        assert not missing, f"{RELEASE}: create_causal_mask lost the parameters {sorted(missing)}"
        source = inspect.getsource(transformers.masking_utils)
        assert "get_query_offset(layer_idx)" in source, f"{RELEASE}: masks no longer ask the cache for query offsets"
        assert "get_mask_sizes(" in source, f"{RELEASE}: masks no longer ask the cache for their sizes"
    else:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function

        assert callable(and_masks) and callable(causal_mask_function)
        assert {"sdpa", "eager"} <= set(ALL_MASK_ATTENTION_FUNCTIONS), f"{RELEASE}: ALL_MASK_ATTENTION_FUNCTIONS"


def test_hook_decoder_layer_and_attention_calls():
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    layer_needs = {"hidden_states", "attention_mask", CACHE_NAME, "use_cache", "position_embeddings"}
    missing = layer_needs - parameters(LlamaDecoderLayer.forward)
    assert not missing, f"{RELEASE}: LlamaDecoderLayer.forward lost {sorted(missing)}"
    attention_needs = {"hidden_states", "position_embeddings", "attention_mask", CACHE_NAME}
    missing = attention_needs - parameters(LlamaAttention.forward)
    assert not missing, f"{RELEASE}: LlamaAttention.forward lost {sorted(missing)}"
    assert ".update(key_states, value_states, self.layer_idx" in inspect.getsource(LlamaAttention.forward), (
        f"{RELEASE}: LlamaAttention no longer calls cache.update(keys, values, layer_idx)"
    )


def test_hook_llama_layer_structure():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, layer_idx=0)
    expected = {
        layer: ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "gradient_checkpointing"),
        layer.self_attn: ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling"),
        layer.mlp: ("gate_proj", "up_proj", "down_proj", "act_fn", "intermediate_size"),
    }
    for module, names in expected.items():
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, f"{RELEASE}: {type(module).__name__} has no {missing}"
    assert layer.self_attn.head_dim == 4 and layer.self_attn.num_key_value_groups == 2
    assert layer.self_attn.scaling == pytest.approx(4**-0.5)


def test_hook_cache_layer_base():
    from transformers.cache_utils import Cache, DynamicLayer

    layer = DynamicLayer()
    keys = torch.zeros(1, 2, 3, 4)
    layer.lazy_initialization(keys, keys) if IS_TRANSFORMERS_V5 else layer.lazy_initialization(keys)
    for attribute in ("keys", "values", "is_initialized", "device"):
        assert hasattr(layer, attribute), f"{RELEASE}: DynamicLayer has no {attribute!r} after lazy_initialization"
    assert "layers" in parameters(Cache.__init__), f"{RELEASE}: Cache(layers=...) is gone"
    if IS_TRANSFORMERS_V5:  # 4.57's masks never ask the layers (create_layer_causal_mask does, with our signature)
        assert "query_length" in parameters(DynamicLayer.get_mask_sizes), f"{RELEASE}: layer get_mask_sizes changed"


def test_hook_gradient_checkpointing_function(converted):
    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava")).train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    layer = model.language_model.layers[0]
    assert callable(getattr(layer, "_gradient_checkpointing_func", None)), (
        f"{RELEASE}: gradient_checkpointing_enable() no longer sets layers' _gradient_checkpointing_func"
    )
    weight = torch.ones(3, requires_grad=True)
    compat_transformers.checkpointed_call(layer, lambda x: (x * 2).sum(), weight).backward()
    assert torch.equal(weight.grad, torch.full((3,), 2.0))


def test_hook_model_file_functions():
    from transformers.models.llama import modeling_llama
    from transformers.models.llava_next import modeling_llava_next

    for module, names in (
        (modeling_llama, ("apply_rotary_pos_emb", "repeat_kv", "rotate_half")),
        (modeling_llava_next, ("image_size_to_num_patches", "get_anyres_image_grid_shape", "unpad_image")),
    ):
        for name in names:
            assert callable(getattr(module, name, None)), f"{RELEASE}: {module.__name__}.{name} is gone"
    assert callable(getattr(transformers.LlavaModel, "get_placeholder_mask", None)), f"{RELEASE}: get_placeholder_mask"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("max_cache_len", [None, 16], ids=["growing", "fixed"])
def test_hook_single_query_mask_is_the_backends_mask(backend, max_cache_len):
    """A decode step's mask, built directly, is what transformers' mask utilities build for the backend."""
    from transformers import LlamaConfig

    from sparse_llava.cache_sparse_llava import IncomingChunk, SparseCache

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    config._attn_implementation = backend
    cache = SparseCache(num_layers=1, max_cache_len=max_cache_len)
    states = torch.zeros(2, 2, 5, 4)
    prompt = torch.tensor([[False, False, True, True, True], [True] * 5])  # a padded row
    cache.begin_chunk(0, IncomingChunk(valid=prompt, admit=None, logical_length=5))
    cache.update(states, states, 0)
    for admit in ([True, False], [False, True], [True, True]):  # decode steps leaving holes
        step = IncomingChunk(
            valid=torch.ones(2, 1, dtype=torch.bool), admit=torch.tensor(admit)[:, None], logical_length=1
        )
        visible = cache.begin_chunk(0, step)
        expected = compat_transformers.create_layer_causal_mask(
            config, torch.zeros(2, 1, 8), visible, cache, 0, None, skip_allowed=False
        )
        actual = compat_transformers.single_query_mask(config, visible, torch.float32)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"{RELEASE}: {backend} masks changed"
        cache.update(states[:, :, :1], states[:, :, :1], 0)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_hook_backends_take_a_per_head_single_query_mask(backend, monkeypatch):
    """
    YOPO's decode steps hand transformers' attention a per-head mask (`[batch, heads, 1, slots]`, from
    `single_query_mask`; for flex_attention a `BlockMask`, which `flex_attention_forward` passes on as it is): each
    head must attend to exactly the slots its row of the mask allows.
    """
    if backend == "flex_attention":
        run_flex_uncompiled(monkeypatch)  # inductor's CPU kernel is not under test
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
        repeat_kv,
    )

    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    config._attn_implementation = backend
    torch.manual_seed(0)
    attention = LlamaAttention(config, layer_idx=0).eval()
    hidden = torch.randn(2, 6, 16)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, torch.arange(6).expand(2, -1))
    visible = torch.rand(2, 4, 6) > 0.5
    visible[..., -1] = True  # every head sees the query itself
    cache = DynamicCache()
    with torch.no_grad():
        attention(hidden[:, :5], (cos[:, :5], sin[:, :5]), None, **{CACHE_NAME: cache})  # the past slots
        mask = compat_transformers.single_query_mask(config, visible, torch.float32)
        actual, _ = attention(hidden[:, 5:], (cos[:, 5:], sin[:, 5:]), mask, **{CACHE_NAME: cache})
        keys, values = (repeat_kv(states, 2) for states in (cache.layers[0].keys, cache.layers[0].values))
        query = attention.q_proj(hidden[:, 5:]).view(2, 1, 4, 4).transpose(1, 2)
        query, _ = apply_rotary_pos_emb(query, query, cos[:, 5:], sin[:, 5:])
        scores = (query @ keys.transpose(-1, -2) * attention.scaling).masked_fill(~visible[:, :, None], -torch.inf)
        expected = attention.o_proj((scores.softmax(-1) @ values).transpose(1, 2).flatten(2))
    assert (actual - expected).abs().max() <= 1e-5, f"{RELEASE}: {backend} attention no longer takes per-head masks"


def test_hook_generate_compiles_a_fixed_cache_decode(converted):
    """
    generate() compiles the decode steps of a compileable cache (on CPU when `CompileConfig._compile_all_devices`, the
    private switch the benchmark uses), and asks the model's `create_masks_for_generate` for each step's mask: one
    graph for every step, the tokens of eager decoding.
    """
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava")).eval()
    inputs = tiny_inputs("llava")
    settings = {"max_new_tokens": 5, "do_sample": False}
    eager = model.generate(**inputs, **settings)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True
    torch.compiler.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = model.generate(
                **inputs, **settings, cache_implementation="static", compile_config=compile_config
            )
        assert counters["stats"]["unique_graphs"] == 1, f"{RELEASE}: generate() no longer compiles the decode steps"
    finally:
        torch.compiler.reset()
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------------------------
# The version gate and the cache's name
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["4.56.2", "4.58.0", "5.0.0", "5.2.0", "5.14.1", "6.0.0", "6.1.0.dev0"])
def test_releases_outside_the_range_are_refused_in_one_line(version):
    with pytest.raises(ImportError) as refused:
        check_transformers_version(version)
    message = str(refused.value)
    assert "\n" not in message and version in message and compat_transformers.SUPPORTED_TRANSFORMERS in message


@pytest.mark.parametrize("version", ["4.57.0", "4.57.6", "5.15.0", "5.19.1", "5.24.0", "5.24.3", "5.25.0"])
def test_releases_in_the_range_are_accepted_quietly(version, caplog):
    check_transformers_version(version)
    assert "newer" not in caplog.text


def test_a_release_newer_than_the_newest_tested_warns_once(caplog):
    newest_major, newest_minor = compat_transformers.NEWEST_TESTED_TRANSFORMERS
    newer = f"{newest_major}.{newest_minor + 1}.0"
    # Where that release is the one installed, the import already said it once.
    logging.Logger.warning_once.cache_clear()
    for _ in range(3):
        check_transformers_version(newer)
    assert caplog.text.count(f"transformers {newer} is newer") == 1


def test_the_installed_release_is_in_the_range():
    check_transformers_version(transformers.__version__)


@pytest.mark.skipif(not UNSUPPORTED_PYTHON, reason="set SPARSE_LLAVA_UNSUPPORTED_PYTHON to a Python with 5.2.0")
def test_an_unsupported_release_refuses_a_converted_folder(converted, tmp_path):
    probe = (
        "import sys\n"
        "from transformers import AutoModelForImageTextToText\n"
        "AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    )
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [UNSUPPORTED_PYTHON, "-c", probe, str(converted("llava"))], capture_output=True, text=True, env=environment
    )
    assert result.returncode != 0
    version = subprocess.run(
        [UNSUPPORTED_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: sparse-llava supports transformers"), result.stderr
    assert f"transformers {version} is installed" in last_line


def test_cache_goes_by_the_installed_releases_name(converted):
    """Forward takes and returns the cache under the name generate() uses; both names work as input."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert CACHE_NAME in parameters(LlamaDecoderLayer.forward)
    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava")).eval()
    inputs = tiny_inputs("llava")
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
        assert CACHE_NAME in output.keys() and output.cache is output[CACHE_NAME]
        step = {
            "input_ids": inputs["input_ids"][:, -1:],
            "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], dim=1),
        }
        by_new_name = model(**step, cache=copy_cache(model, inputs), use_cache=True).logits
        by_old_name = model(**step, past_key_values=copy_cache(model, inputs), use_cache=True).logits
    assert torch.equal(by_new_name, by_old_name)
    with pytest.raises(ValueError, match="not both"):
        model(**step, cache=output.cache, past_key_values=output.cache)


def copy_cache(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True).cache


def test_generate_causes_no_deprecation_warning(converted, recwarn):
    model = AutoModelForImageTextToText.from_pretrained(converted("llava"), trust_remote_code=True).eval()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers says each deprecation once per process
    try:
        cache = model.new_cache()
        model.generate(**tiny_inputs("llava"), max_new_tokens=3, do_sample=False, cache=cache)
        output = model(**tiny_inputs("llava"), use_cache=True)
    finally:
        transformers_logger.removeHandler(handler)
    assert cache.get_seq_length() > 0 and output.cache is not None
    messages = [record.getMessage() for record in records]
    assert not [message for message in messages if "deprecated" in message], messages
    assert not [warning for warning in recwarn if "deprecat" in str(warning.message).lower()]


# ---------------------------------------------------------------------------------------------------------------
# Weights that did not load
# ---------------------------------------------------------------------------------------------------------------


def edited_copy(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    (weights_file,) = copy.glob("*.safetensors")
    weights = load_file(weights_file)
    edit(weights)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize(
    "edit, kind",
    [
        (lambda weights: weights.pop(next(k for k in weights if "layers.1.mlp.up_proj" in k)), "missing"),
        (lambda weights: weights.update({"language_model.model.extra.weight": torch.zeros(2)}), "unexpected"),
    ],
    ids=["missing", "unexpected"],
)
@pytest.mark.parametrize("method", ["dynamic-llava", "p-mod", "yopo"])
def test_a_folder_with_weights_that_do_not_fit_refuses_to_load(
    method, edit, kind, converted, converted_pmod, converted_yopo, tmp_path
):
    folder = {"dynamic-llava": converted, "p-mod": converted_pmod, "yopo": converted_yopo}[method]("llava")
    broken = edited_copy(folder, tmp_path, edit)
    with pytest.raises(ValueError, match=f"does not fit .*{kind}: "):
        AutoModelForImageTextToText.from_pretrained(broken, trust_remote_code=True)


def test_a_weight_of_the_wrong_shape_refuses_to_load(converted, tmp_path):
    def widen(weights):
        name = next(k for k in weights if "layers.0.mlp.up_proj" in k)
        weights[name] = torch.cat([weights[name], weights[name]])

    broken = edited_copy(converted("llava"), tmp_path, widen)
    # transformers itself refuses a shape mismatch unless told to ignore it; then ours does.
    with pytest.raises((ValueError, RuntimeError)):
        sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(broken)
    with pytest.raises(ValueError, match="mismatched: .*up_proj"):
        sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(broken, ignore_mismatched_sizes=True)


def test_missing_new_modules_are_refused_unless_asked_for(base_checkpoints, converted):
    """A base LLaVA checkpoint has no predictors: loading it as Dynamic-LLaVA needs `new_modules_from_scratch`."""
    base_folder = base_checkpoints[("llava", "hub")][0]
    config = sparse_llava.DynamicLlavaConfig.from_pretrained(converted("llava"))
    with pytest.raises(ValueError, match="missing: image_score_predictor"):
        sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(base_folder, config=config)
    model, info = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(
        base_folder, config=config, new_modules_from_scratch=True, output_loading_info=True
    )
    assert info["missing_keys"] and all(key.split(".")[0] in model.new_module_names for key in info["missing_keys"])
    assert json.loads((converted("llava") / "config.json").read_text())["model_type"] == "dynamic_llava"


@pytest.mark.usefixtures("reference_flash_kernels")
def test_hook_flash_backends_honour_the_2d_key_mask():
    """
    The flash backends take a layer's mask as the 2-D key mask (`flash_attention_mask`), and their unpadding places a
    chunk's queries at its last columns with causality aligned bottom right: exact for slots with holes and padding.
    Run through transformers' flash path on reference kernels of flash-attn's semantics.
    """
    from transformers import DynamicCache, LlamaConfig
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, repeat_kv, rotate_half

    assert ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"] is flash_attention_mask, f"{RELEASE}: flash masks"
    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    config._attn_implementation = "flash_attention_2"
    torch.manual_seed(0)
    attention = LlamaAttention(config, layer_idx=0).eval()
    hidden = torch.randn(2, 8, 16)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, torch.arange(8).expand(2, -1))
    valid = torch.tensor([[True, False, True, True, False, False, True, True], [True] * 8])  # holes; a padded query
    cache = DynamicCache()
    with torch.no_grad():
        past = (cos[:, :5], sin[:, :5])
        attention(hidden[:, :5], past, valid[:, :5], **{CACHE_NAME: cache})
        actual, _ = attention(hidden[:, 5:], (cos[:, 5:], sin[:, 5:]), valid, **{CACHE_NAME: cache})
        keys, values = (repeat_kv(states, 2) for states in (cache.layers[0].keys, cache.layers[0].values))
        query = attention.q_proj(hidden[:, 5:]).view(2, 3, 4, 4).transpose(1, 2)
        query = query * cos[:, None, 5:] + rotate_half(query) * sin[:, None, 5:]
        causal = torch.arange(8)[None, :] <= torch.arange(5, 8)[:, None]
        allowed = valid[:, None, None, :] & causal
        scores = (query @ keys.transpose(-1, -2) * attention.scaling).masked_fill(~allowed, -torch.inf)
        expected = attention.o_proj((scores.softmax(-1) @ values).transpose(1, 2).flatten(2))
    queries = valid[:, 5:]
    assert (actual - expected)[queries].abs().max() <= 1e-5, f"{RELEASE}: flash attention's unpadding changed"
