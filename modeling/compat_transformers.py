"""What differs between the transformers releases sparse-llava runs on, and every private transformers API it uses.

Supported: 4.57.x, and 5.15 up to the newest 5.x (CI tests 4.57, 5.15, a release in the middle and the newest). The
flat files check the installed release when they are imported (`check_transformers_version`): outside that range
they refuse with one line; newer than the newest tested release, they warn once and carry on.

The other files are written against 5.x; where releases differ, they go through this module:

* weight names: both lines rename llava-hf checkpoint keys (`language_model.model.*`, `vision_tower.*`, ...) on load,
  5.x through its conversion-mapping registry, 4.57 through the class attribute `_checkpoint_conversion_mapping`;
* configs: 5.x configs are dataclasses (annotated class attributes are fields, `__post_init__` validates), 4.57
  configs are plain classes, so ours get that behaviour from `SparseLlavaConfigBase`;
* image features: 5.x returns an output object, 4.57 the list of per-image features;
* masks: 4.57's `create_causal_mask` sizes the mask from layer 0 and places queries by `cache_position`;
* generation: 4.57's `generate` passes `cache_position` and the images on every step;
* `from_pretrained`: 5.x names the dtype `dtype`, 4.57 `torch_dtype`;
* training arguments: 5.x takes the warm-up fraction as `warmup_steps` (4.57: `warmup_ratio`) and renamed
  `gradient_checkpointing` to `activation_checkpointing`;
* the cache's name: 5.24 renamed `past_key_values` to `cache` in model forwards, outputs, decoder layers, mask
  utilities and `generate` (the old name is deprecated until 5.40); `CACHE_NAME` is the installed release's.

Private transformers APIs sparse-llava relies on (no public equivalent exists); `tests/test_transformers_hooks.py`
checks each one and fails with a message naming it when a release changes it:

1. `transformers.conversion_mapping.register_checkpoint_conversion_mapping` / `get_checkpoint_conversion_mapping`
   (5.x): key renaming on load for custom classes (`register_checkpoint_keys`);
2. `PreTrainedModel._checkpoint_conversion_mapping` (4.57): the same on 4.57;
3. `config._attn_implementation`: the attention backend a config is set to (`attention_backend`);
4. `create_causal_mask(..., layer_idx=, and_mask_function=, allow_is_causal_skip=)` and the cache's
   `get_query_offset(layer_idx)` / layer `get_mask_sizes(query_length)` it calls (5.15+): masks sized per layer, in
   the layer's physical slots (`create_layer_causal_mask`); on 4.57 `ALL_MASK_ATTENTION_FUNCTIONS`, `and_masks` and
   `causal_mask_function` of `transformers.masking_utils`; and the masks the sdpa and eager backends take for a
   single query (`[batch, 1, 1, slots]`, bool True-where-attended / additive float), which decode steps build directly
   (`single_query_mask`), and which those backends also take per head (`[batch, heads, 1, slots]`: YOPO's pruned
   heads); the flash backends' mask, the 2-D key mask (`masking_utils.flash_attention_mask`), whose unpadding
   (`modeling_flash_attention_utils._upad_input`) takes the queries as the mask's last columns and aligns causality
   bottom right; and the flex backend's, a `torch.nn.attention.flex_attention.BlockMask` that
   `integrations.flex_attention.flex_attention_forward` passes to `flex_attention` as it is (sparse-llava builds it
   with torch's public `create_block_mask`, see `flex_block_mask`);
5. the decoder layer's call, `LlamaDecoderLayer(hidden_states, attention_mask, <CACHE_NAME>=, use_cache=,
   position_embeddings=)`, and its attention's, `LlamaAttention(hidden_states, position_embeddings, attention_mask,
   <CACHE_NAME>=) -> (output, weights)`, which call `cache.update(keys, values, layer_idx, ...)`;
6. `transformers.cache_utils.DynamicLayer` as the base of `SparseCacheLayer` (its `keys`, `values`,
   `is_initialized`, `dtype`, `device` and `lazy_initialization`), and `Cache(layers=[...])`;
7. `decoder_layer._gradient_checkpointing_func`, set by `gradient_checkpointing_enable()` (`checkpointed_call`);
8. the structure of transformers' Llama layers, which YOPO and p-MoD run piece by piece: `LlamaDecoderLayer`'s
   `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp` and `gradient_checkpointing`; `LlamaAttention`'s
   `q_proj`, `k_proj`, `v_proj`, `o_proj`, `head_dim`, `num_key_value_groups`, `scaling`, `config`; `LlamaMLP`'s
   `gate_proj`, `up_proj`, `down_proj`, `act_fn`, `intermediate_size`;
9. functions of transformers' model files: `apply_rotary_pos_emb`, `repeat_kv`, `rotate_half`
   (`models.llama.modeling_llama`), `image_size_to_num_patches`, `get_anyres_image_grid_shape`, `unpad_image`
   (`models.llava_next.modeling_llava_next`), and `LlavaModel.get_placeholder_mask`;
9. `generate()`'s handling of a compileable cache (`Cache.is_compileable`, true for the fixed-capacity `SparseCache`):
   it compiles the decode steps (on GPUs, or anywhere with `CompileConfig._compile_all_devices`, which the benchmark
   sets on CPU), and asks the model's `create_masks_for_generate` for each step's attention mask, which sparse-llava
   models override to keep the 2-D mask (its last columns: the same shape at every step).

Overridden, as transformers documents for custom models: `PreTrainedModel._init_weights` and the class attributes
`_tied_weights_keys`, `_no_split_modules`, `_skip_keys_device_placement`, `_supports_*`;
`GenerationMixin.prepare_inputs_for_generation` and `generate`; `create_masks_for_generate` (see 9).
"""

import dataclasses
import inspect

import torch
import transformers
from packaging.version import Version
from transformers.utils import logging

# Checked before anything else here touches transformers: a converted folder runs these files in the user's
# environment, on whatever release is installed there.
SUPPORTED_TRANSFORMERS = "4.57.x or 5.15 and later 5.x"
NEWEST_TESTED_TRANSFORMERS = (5, 25)


def check_transformers_version(version: str) -> None:
    """Refuse a transformers release outside the supported range; warn once about one newer than the newest tested."""
    release = Version(version).release[:2]
    if not (release == (4, 57) or (5, 15) <= release < (6, 0)):
        raise ImportError(
            f"sparse-llava supports transformers {SUPPORTED_TRANSFORMERS}, but transformers {version} is installed: "
            f"pip install 'transformers>=5.15,<6'"
        )
    if release > NEWEST_TESTED_TRANSFORMERS:
        newest = ".".join(map(str, NEWEST_TESTED_TRANSFORMERS))
        logging.get_logger("sparse_llava").warning_once(
            f"sparse-llava was tested up to transformers {newest}.x; transformers {version} is newer, carrying on"
        )


check_transformers_version(transformers.__version__)

from transformers import LlavaNextConfig  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

IS_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5

# The keyword transformers passes the KV cache under (to decoder layers, attention, masks, model forwards and
# outputs). Read off the decoder layer's signature rather than the version number, so a back-port or a renamed
# release is seen as it is.
CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"

if IS_TRANSFORMERS_V5:
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
else:
    from transformers import PretrainedConfig
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function

# 4.57's renames, tried in order, first match wins (`LlavaNextForConditionalGeneration`'s, plus the flat tower).
# 4.57's `save_pretrained` inverts the dict; of the two tower entries (same target) the later one wins there, so
# models save the tower in the Hub layout (`vision_tower.vision_model.*`) that both lines load.
CHECKPOINT_KEY_MAPPING_V4 = {
    "^language_model.model": "model.language_model",
    "^language_model.lm_head": "lm_head",
    # transformers 5.x saves the CLIP tower flattened (`vision_tower.embeddings.*`); 4.57's tower nests it.
    r"^vision_tower(?!\.vision_model)": "model.vision_tower.vision_model",
    "^vision_tower.vision_model": "model.vision_tower.vision_model",
    "^multi_modal_projector": "model.multi_modal_projector",
    "^image_newline": "model.image_newline",
}


def register_checkpoint_keys(model_class) -> None:
    """Make `from_pretrained` of `model_class` rename llava-hf checkpoint keys to the model's parameter names."""
    if IS_TRANSFORMERS_V5:
        # 5.x renames on load only for classes it knows (by class name); ours are custom code.
        register_checkpoint_conversion_mapping(
            model_class.__name__, get_checkpoint_conversion_mapping("llava_next"), overwrite=True
        )
    else:
        model_class._checkpoint_conversion_mapping = CHECKPOINT_KEY_MAPPING_V4
        # As 4.57's LLaVA classes: with the prefix "model", 4.57 takes a checkpoint none of whose keys starts with
        # it for a base-model checkpoint, and rejects the task-model keys in it (`language_model.lm_head`).
        model_class.base_model_prefix = ""


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

if IS_TRANSFORMERS_V5:
    SparseLlavaConfigBase = LlavaNextConfig
else:

    class SparseLlavaConfigBase(LlavaNextConfig):
        """
        `LlavaNextConfig` with 5.x's dataclass behaviour for subclasses: each annotated class attribute is a field
        (taken from the keyword arguments, else the class default), and `__post_init__` runs after `__init__`.
        """

        def __init__(self, **kwargs):
            fields = {name: kwargs.pop(name, getattr(type(self), name)) for name in declared_fields(type(self))}
            super().__init__(**kwargs)
            for name, value in fields.items():
                setattr(self, name, value)
            self.__post_init__()

        def __post_init__(self, **kwargs):
            pass


def declared_fields(config_class) -> list[str]:
    """The fields sparse-llava's config classes declare on top of `LlavaNextConfig`, base classes first."""
    own_classes = config_class.__mro__[: config_class.__mro__.index(SparseLlavaConfigBase)]
    return [name for klass in reversed(own_classes) for name in klass.__dict__.get("__annotations__", {})]


def config_fields(config_class) -> list[str]:
    """Every field a config class takes (its own and `LlavaNextConfig`'s), in declaration order."""
    if IS_TRANSFORMERS_V5:
        return [field.name for field in dataclasses.fields(config_class)]
    base_fields = [
        name
        for klass in (PretrainedConfig, LlavaNextConfig)
        for name in inspect.signature(klass.__init__).parameters
        if name not in ("self", "kwargs")
    ]
    return list(dict.fromkeys(base_fields + declared_fields(config_class)))


# ---------------------------------------------------------------------------------------------------------------
# Modeling
# ---------------------------------------------------------------------------------------------------------------


def attention_backend(config) -> str:
    """The attention implementation a (text) config is set to ("eager", "sdpa", "flash_attention_2", ...)."""
    return config._attn_implementation


def is_flash_backend(backend: str) -> bool:
    """
    Whether `backend` is a flash-attention backend (`flash_attention_2/3/4`, or a `kernels` hub kernel such as
    "kernels-community/flash-attn2"): by name, as transformers 5.x's `is_flash_attention_requested` decides. Their mask
    is the 2-D key mask alone; anything else a layer's mask holds cannot reach them.
    """
    return backend is not None and "flash" in backend


def flex_block_mask(mask_function, batch_size: int, num_heads: int | None, query_length: int, key_length: int, device):
    """
    The flex_attention `BlockMask` of `mask_function(batch_idx, head_idx, q_idx, kv_idx)` (indices in the layer's
    physical slots; `num_heads=None`: the same for every head), built on the device without host synchronisation.
    transformers' own `flex_attention_mask` is not used: it compiles the mask construction for every new shape (each
    layer and decode step of a growing cache has its own), and 5.x checks the padding mask on the host.
    """
    from torch.nn.attention.flex_attention import create_block_mask  # torch >= 2.5, asked for by flex_attention only

    return create_block_mask(mask_function, batch_size, num_heads, query_length, key_length, device=device)


def checkpointed_call(decoder_layer, function, *args):
    """
    `function(*args)` under the activation checkpointing `gradient_checkpointing_enable()` set up for
    `decoder_layer` (with its arguments, e.g. `use_reentrant`), for methods that call a layer's sub-modules
    themselves and so bypass the checkpointing wrapper of the layer's `__call__`.
    """
    return decoder_layer._gradient_checkpointing_func(function, *args)


def per_image_features(llava_model, **kwargs) -> tuple[torch.Tensor, ...]:
    """`LlavaModel` / `LlavaNextModel.get_image_features(**kwargs)` as one `[tokens, hidden]` tensor per image."""
    if IS_TRANSFORMERS_V5:
        return tuple(llava_model.get_image_features(**kwargs, return_dict=True).pooler_output)
    return tuple(llava_model.get_image_features(**kwargs))


def create_layer_causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx, and_mask_function, skip_allowed):
    """
    transformers' causal mask for decoder layer `layer_idx` of a cache whose layers differ in length, in the layer's
    physical index space: queries start at `cache.get_query_offset(layer_idx)`, keys are sized by the layer's
    `get_mask_sizes`. `skip_allowed`: whether the mask may be replaced by `is_causal` when it allows that (checking
    reads the mask on the host). `and_mask_function` gets the physical query index, as transformers passes it.
    The flash backends' mask is the 2-D key mask alone: they cannot take an `and_mask_function` (the caller refuses).
    For flex_attention, a `BlockMask` (see `flex_block_mask`).
    """
    if attention_backend(config) == "flex_attention":
        query_length = inputs_embeds.shape[1]
        # The layer's slots are its past ones, then the chunk's: a chunk's queries sit at its last columns.
        past_slots = attention_mask.shape[1] - query_length
        slots_valid = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)

        def causal_valid(batch_idx, head_idx, q_idx, kv_idx):
            query_slot = q_idx + past_slots
            visible = slots_valid[batch_idx, kv_idx] & (kv_idx <= query_slot)
            if and_mask_function is not None:
                visible = visible & and_mask_function(batch_idx, head_idx, query_slot, kv_idx)
            return visible

        return flex_block_mask(
            causal_valid, inputs_embeds.shape[0], None, query_length, attention_mask.shape[1], inputs_embeds.device
        )
    if IS_TRANSFORMERS_V5:
        return create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            layer_idx=layer_idx,
            and_mask_function=and_mask_function,
            allow_is_causal_skip=skip_allowed,
        )
    # 4.57's `create_causal_mask` asks the cache for layer 0's sizes only and always allows the skip, so call the
    # mask function of the attention backend, as it does, with this layer's sizes.
    if attention_backend(config) not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None  # a backend without masks (as `create_causal_mask` does)
    query_length = inputs_embeds.shape[1]
    query_offset = 0 if cache is None else cache.get_query_offset(layer_idx)
    kv_length, kv_offset = (query_length, 0) if cache is None else cache.layers[layer_idx].get_mask_sizes(query_length)
    mask_function = causal_mask_function
    if and_mask_function is not None:
        mask_function = and_masks(causal_mask_function, and_mask_function)
    return ALL_MASK_ATTENTION_FUNCTIONS[attention_backend(config)](
        batch_size=inputs_embeds.shape[0],
        cache_position=torch.arange(query_offset, query_offset + query_length, device=inputs_embeds.device),
        kv_length=kv_length,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask.to(device=inputs_embeds.device, dtype=torch.bool),
        allow_is_causal_skip=skip_allowed and and_mask_function is None,
        dtype=inputs_embeds.dtype,
        config=config,
    )


def single_query_mask(config, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """
    The mask of a single query placed after every slot, which may see the slots `visible[batch, slots]` allows (or,
    per head, `visible[batch, heads, slots]`), as the backend takes it: `[batch, 1 or heads, 1, slots]`, bool, True
    where attended, for sdpa; additive float for eager (what `create_causal_mask` builds there); a `BlockMask` for
    flex_attention, whose empty blocks the kernel skips; the 2-D key mask for the flash backends (`visible` itself:
    their unpadding reads only the visible slots). Built directly, on the device and without host synchronisation,
    because a decode step needs it in every layer, where `create_causal_mask`'s general machinery costs more than the
    layer's attention (and, for flash and flex, reads the mask on the host). None for other backends (use
    `create_layer_causal_mask`); flash refuses per-head visibility, which it cannot take.
    """
    backend = attention_backend(config)
    per_head = visible.dim() == 3
    if backend == "flex_attention":

        def slot_visible(batch_idx, head_idx, q_idx, kv_idx):
            return visible[batch_idx, head_idx, kv_idx] if per_head else visible[batch_idx, kv_idx]

        heads = visible.shape[1] if per_head else None
        return flex_block_mask(slot_visible, visible.shape[0], heads, 1, visible.shape[-1], visible.device)
    if is_flash_backend(backend):
        if per_head:
            raise ValueError(
                f"per-head attention masks cannot be expressed by {backend}; use attn_implementation='sdpa' or "
                "'flex_attention'"
            )
        return visible
    mask = visible[:, :, None, :] if per_head else visible[:, None, None, :]
    if backend == "sdpa":
        return mask
    if backend == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return None


# Inputs only the prefill needs (as 5.x's `MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL`).
IMAGE_INPUTS = ("pixel_values", "image_sizes")


def generation_step_inputs(model_inputs: dict) -> dict:
    """
    Adapt what `GenerationMixin.prepare_inputs_for_generation` returns: on 4.57 it passes `cache_position` (logical
    positions; our layers work in their own physical slots) and the images on every step, even single-token decode
    steps that have no image tokens.
    """
    if IS_TRANSFORMERS_V5:
        return model_inputs
    cache_position = model_inputs.pop("cache_position", None)
    if cache_position is not None and cache_position.shape[0] == 1:
        for name in IMAGE_INPUTS:
            model_inputs.pop(name, None)
    return model_inputs


def auto_model_classes() -> list:
    """The Auto classes a converted folder's `auto_map` serves on this transformers line."""
    classes = [transformers.AutoModelForImageTextToText]
    if not IS_TRANSFORMERS_V5:
        classes.append(transformers.AutoModelForVision2Seq)
    return classes


def training_schedule_arguments(warmup_fraction: float, checkpointing: bool) -> dict:
    """`TrainingArguments` keywords for a warm-up over a fraction of the run and activation checkpointing."""
    if IS_TRANSFORMERS_V5:
        return {"warmup_steps": warmup_fraction, "activation_checkpointing": checkpointing}
    return {"warmup_ratio": warmup_fraction, "gradient_checkpointing": checkpointing}


def dtype_argument(dtype) -> dict:
    """The `from_pretrained` keyword for a dtype (5.x: `dtype`; 4.57: `torch_dtype`)."""
    return {"dtype": dtype} if IS_TRANSFORMERS_V5 else {"torch_dtype": dtype}
