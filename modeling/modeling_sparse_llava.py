"""The shared base of sparse-llava: a LLaVA / LLaVA-NeXT whose language model may drop tokens.

It owns what the three methods share:

* the vision tower, projector and merge of image features into the sequence, reused from transformers'
  `LlavaModel` / `LlavaNextModel` (so checkpoints keep their llava-hf layout);
* the bookkeeping of which positions are image tokens, and of which image;
* a decoder loop over transformers' own Llama layers that lets a method shorten the token stream between layers
  (kept tokens keep their original position ids, so RoPE sees original positions);
* per-layer attention masks built from the [`SparseCache`]'s per-row validity, so ragged rows and padding are exact.

A method subclasses [`SparseLlavaForConditionalGeneration`] and overrides `before_layer` (and, where it changes
what a layer computes, `run_layer`).
"""

import copy
import warnings
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from transformers import GenerationMixin, LlavaModel, LlavaNextModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.utils import logging

from .cache_sparse_llava import IncomingChunk, SparseCache, check_token_count
from .compat_transformers import (
    CACHE_NAME,
    attention_backend,
    create_layer_causal_mask,
    generation_step_inputs,
    is_flash_backend,
    per_image_features,
    register_checkpoint_keys,
    single_query_mask,
)
from .configuration_sparse_llava import SparseLlavaConfig

logger = logging.get_logger(__name__)

# Weight left to a key its keep policy hides (training-time masked attention), as the reference's MaskedSoftmax eps.
POLICY_EPS = 1e-6

# generate() options that verify draft tokens and roll the cache back to the last accepted one.
CACHE_ROLLBACK_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


@dataclass
class SparseLlavaOutput(ModelOutput):
    """
    Output of sparse-llava models.

    Args:
        loss: language-modelling loss, when `labels` are given.
        logits: `[batch, sequence, vocab]` for the positions of the input (those a method dropped get zeros).
        cache: the [`SparseCache`], when `use_cache` (named `past_key_values` on transformers < 5.24, where `cache`
            reads it too).
        image_hidden_states: projected image features, one row per image token (all images concatenated).
        token_counts: per decoder layer, per row, the image and output-text tokens this forward kept versus saw
            (kept = run through the layer and, with a cache, stored in it); see `sparsity_report()`.
        loss_terms: when `labels` are given, the parts `loss` is the sum of, by name, for logging: `lm_loss` and a
            method's training regularisers (already weighted).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    # The field carries the installed transformers' name for it, the one `generate()` reads back.
    if CACHE_NAME == "cache":
        cache: SparseCache | None = None
    else:
        past_key_values: SparseCache | None = None
        cache = property(lambda self: self.past_key_values)
    image_hidden_states: torch.FloatTensor | None = None
    token_counts: list[dict[str, torch.Tensor]] | None = None
    loss_terms: dict[str, torch.Tensor] | None = None

    def sparsity_report(self) -> list[dict[str, list[int]]]:
        """`token_counts` as plain lists: one dict per layer (`image_kept`, `image_seen`, `output_text_kept`, ...)."""
        return [{name: counts.tolist() for name, counts in layer.items()} for layer in self.token_counts or []]


@dataclass
class TokenStream:
    """
    The tokens of the current chunk as a decoder layer sees them: `[batch, slots, ...]`, rows right-aligned.

    After a method drops tokens, rows may keep different numbers of them; the shorter rows are left-filled with
    invalid slots (`valid` False), which attention never reads.
    """

    hidden_states: torch.Tensor  # [batch, slots, hidden]
    position_ids: torch.Tensor  # [batch, slots] original positions
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # RoPE (cos, sin) at those positions
    valid: torch.Tensor  # [batch, slots] bool: slot holds a real token
    source_index: torch.Tensor  # [batch, slots] column of the model input the slot came from
    image_index: torch.Tensor  # [batch, slots] which image (global index, in input order) or -1 for text
    image_offset: torch.Tensor  # [batch, slots] position of the token within its image, or -1 for text
    image_lengths: tuple[int, ...]  # number of tokens of each image, in input order
    image_sizes: torch.Tensor | None  # LLaVA-NeXT: [images, 2] original (height, width) of each image
    is_output: torch.Tensor  # [batch, slots] bool: a generated token (a candidate for output-text dropping)
    has_output_tokens: bool  # whether any slot is a generated token (known on the host)
    logical_length: int  # number of input tokens this chunk stands for
    last_logits_only: bool = False  # only the last position's logits are wanted (as in generate())
    # [batch, slots] bool: which slots this layer keeps, or None for every valid one. A slot not admitted is not
    # stored in the layer's cache and no later token of the chunk attends to it (it still attends to itself).
    # Methods that skip tokens in a layer (p-MoD) also leave them out of its computation.
    admit: torch.Tensor | None = None
    shortened: bool = False  # whether a method dropped tokens from the chunk
    labels: torch.Tensor | None = None  # [batch, slots] the language-modelling labels, when given
    # Training: [batch, slots] float keep policy of each slot as an attention key. Layers multiply it into their
    # attention instead of dropping tokens (see `policy_attention_mask`), so its gradient reaches the decisions.
    key_policy: torch.Tensor | None = None
    # Training: a method's regularisation losses by name (already weighted); forward adds them to the LM loss.
    auxiliary_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def extend(cls, stream: "TokenStream", **changes) -> "TokenStream":
        """`stream` as an instance of `cls` (a method's subclass with fields of its own), with `changes`."""
        return cls(**{**{field.name: getattr(stream, field.name) for field in fields(stream)}, **changes})

    @property
    def has_images(self) -> bool:
        return len(self.image_lengths) > 0

    @property
    def is_image(self) -> torch.Tensor:
        return self.image_index >= 0

    def token_counts(self, seen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per row: image and output-text tokens kept in this stream, next to `seen` (counted before any drop)."""
        kept = self.valid if self.admit is None else self.valid & self.admit
        return {
            "image_kept": (kept & self.is_image).sum(-1),
            "image_seen": seen["image"],
            "output_text_kept": (kept & self.is_output).sum(-1),
            "output_text_seen": seen["output_text"],
        }

    def select(self, keep: torch.Tensor) -> "TokenStream":
        """
        Keep the slots where `keep[batch, slots]` is True (invalid slots are always dropped), right-aligned.

        The new width is the largest kept count, which is read on the host: call this at prefill, not per decode step.
        """
        keep = keep & self.valid
        kept_per_row = keep.sum(-1)
        width = int(kept_per_row.max())
        if width == keep.shape[1] and bool(keep.all()):
            return self
        # A stable sort puts the dropped slots first and the kept ones last, each in their original order.
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - width :]
        cos, sin = self.position_embeddings
        return replace(
            self,
            hidden_states=gather_slots(self.hidden_states, order),
            position_ids=self.position_ids.gather(1, order),
            position_embeddings=(gather_slots(cos, order), gather_slots(sin, order)),
            valid=keep.gather(1, order),
            source_index=self.source_index.gather(1, order),
            image_index=self.image_index.gather(1, order),
            image_offset=self.image_offset.gather(1, order),
            is_output=self.is_output.gather(1, order),
            admit=None if self.admit is None else self.admit.gather(1, order),
            labels=None if self.labels is None else self.labels.gather(1, order),
            key_policy=None if self.key_policy is None else self.key_policy.gather(1, order),
            shortened=True,
        )


def gather_slots(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, index[b, i]]` for `[batch, slots, ...]` tensors."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def scatter_slots(
    target: torch.Tensor, values: torch.Tensor, index: torch.Tensor, present: torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """
    A copy of `target` with `values` written at slots `index[b, i]` along `dim` (the batch dimension is 0) where
    `present[b, i]`; absent entries go to a spare slot that is cut off.
    """
    length = target.shape[dim]
    index = torch.where(present, index, length)
    index = index.view(index.shape[0], *([1] * (dim - 1)), index.shape[1], *([1] * (values.dim() - dim - 1)))
    spare = list(target.shape)
    spare[dim] = 1
    padded = torch.cat([target, target.new_zeros(spare)], dim=dim)
    return padded.scatter(dim, index.expand(values.shape), values).narrow(dim, 0, length)


def position_limit_message(position: int, max_positions: int) -> str:
    return (
        f"the input reaches position {position} (cache included), beyond the model's max_position_embeddings "
        f"({max_positions}); outputs past that length are unreliable"
    )


def take_cache_argument(kwargs: dict):
    """Pop the cache from keyword arguments, passed as `cache` or as `past_key_values` (its name before 5.24)."""
    caches = [cache for cache in (kwargs.pop("cache", None), kwargs.pop("past_key_values", None)) if cache is not None]
    if len(caches) > 1:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return caches[0] if caches else None


def locate_image_tokens(special_image_mask: torch.Tensor, image_lengths: list[int]):
    """
    For each position, `[batch, seq]` the index of the image it belongs to and its offset within that image (both -1
    for text).

    transformers merges image features with `masked_scatter`, which fills the image positions in row-major order,
    image after image; the n-th image position therefore belongs to the image whose token range contains n.
    """
    flat = special_image_mask.flatten()
    rank = flat.cumsum(0) - 1
    lengths = torch.tensor(image_lengths, device=flat.device)
    ends = lengths.cumsum(0)
    index = torch.searchsorted(ends, rank, right=True).clamp(max=len(image_lengths) - 1)
    offset = rank - (ends - lengths)[index]
    no_image = torch.full_like(rank, -1)
    shape = special_image_mask.shape
    return torch.where(flat, index, no_image).view(shape), torch.where(flat, offset, no_image).view(shape)


class SparseLlavaPreTrainedModel(PreTrainedModel):
    config: SparseLlavaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    # Every backend is exact or refused with one line naming the backend to use instead (see `layer_attention_mask`).
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # The loss may include per-batch regularisers, so it is a mean over the batch, not a sum to be divided by the
    # Trainer's token count: the Trainer must average it over gradient-accumulation steps and processes itself.
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, *args, new_modules_from_scratch: bool = False, **kwargs):
        r"""
        transformers' `from_pretrained`, except that a model whose weights did not all load is never returned: a weight
        missing from the checkpoint, unexpected in it, or of another shape raises a `ValueError` naming the first few.

        new_modules_from_scratch (`bool`, *optional*, defaults to `False`):
            Allow the weights of the method's new modules (`new_module_names`, e.g. Dynamic-LLaVA's predictors) to be
            missing, as they are from a base LLaVA checkpoint; they keep their initialisation. The conversion uses it.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        allowed_missing = tuple(f"{name}." for name in model.new_module_names) if new_modules_from_scratch else ()
        problems = {
            "missing": sorted(key for key in loading_info["missing_keys"] if not key.startswith(allowed_missing)),
            "unexpected": sorted(loading_info["unexpected_keys"]),
            # 5.x reports (key, checkpoint shape, model shape), 4.57 the key alone.
            "mismatched": sorted(
                entry if isinstance(entry, str) else entry[0] for entry in loading_info.get("mismatched_keys", [])
            ),
        }
        if any(problems.values()):
            found = "; ".join(f"{kind}: {', '.join(keys[:5])}" for kind, keys in problems.items() if keys)
            raise ValueError(
                f"the checkpoint does not fit {cls.__name__} ({found}); refusing to run with weights that did not load"
            )
        return (model, loading_info) if wants_loading_info else model

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Checkpoints of llava-hf repos (and ours, which keep that layout) name weights `language_model.model.*`,
        # `vision_tower.*`, ...; transformers renames them on load only for classes it knows, so teach it ours.
        register_checkpoint_keys(cls)

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, LlavaNextModel):
            module.image_newline.normal_(mean=0.0, std=self.config.text_config.hidden_size**-0.5)
        else:
            super()._init_weights(module)


class SparseLlavaForConditionalGeneration(SparseLlavaPreTrainedModel, GenerationMixin):
    """
    A LLaVA-1.5 or LLaVA-NeXT model (chosen by `config.base_model_type`) whose decoder loop lets a method drop
    tokens between layers. With nothing dropped it computes exactly what transformers' LLaVA computes.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Sub-modules a method adds to the base LLaVA (a base checkpoint has no weights for them).
    new_module_names: tuple[str, ...] = ()

    def __init__(self, config: SparseLlavaConfig):
        super().__init__(config)
        base_class = LlavaNextModel if config.base_model_type == "llava_next" else LlavaModel
        self.model = base_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    @property
    def language_model(self):
        return self.model.language_model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self, max_cache_len: int | None = None) -> SparseCache:
        """
        The cache `generate()` creates for this model: growing by default; with `max_cache_len`, of fixed capacity
        for that many tokens of conversation (prompt included), whose decode steps compile to one graph.
        """
        return SparseCache(config=self.config, max_cache_len=max_cache_len)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        r"""
        transformers' `generate`, with the [`SparseCache`] this model needs. `cache_implementation="static"` (in the
        arguments or the generation config) gives the fixed-capacity `SparseCache`, sized as transformers sizes a
        `StaticCache`: the prompt plus `max_new_tokens` (or `generation_config.max_cache_len`, if larger); its decode
        steps have static shapes, so `generate` compiles them where it compiles a `StaticCache` model's (on GPUs, or
        with a `compile_config`). Without it (or with `"dynamic"`), the cache grows as needed. A cache passed as
        `cache` / `past_key_values` is used as it is, after checks made on the host before generation starts: a fixed
        one must have room for the prompt plus `max_new_tokens`, and one that holds a conversation must be given a
        prompt that continues it (the sequences a `generate()` returned, plus the new turn).
        """
        self.check_generation_options(generation_config, kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        # Tell forward where the generated tokens start, so only they are candidates for output-text dropping.
        if kwargs.get("output_token_start") is None and prompt is not None:
            kwargs["output_token_start"] = prompt.shape[1]
        # generate() would create a DynamicCache or StaticCache, which cannot hold ragged layers: hand it ours, under
        # the name the installed transformers uses (a cache the caller passed keeps its place, under either name).
        cache = take_cache_argument(kwargs)
        settings = generation_config if generation_config is not None else self.generation_config
        use_cache = kwargs.get("use_cache", settings.use_cache)
        cache_implementation = kwargs.pop("cache_implementation", settings.cache_implementation)
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"sparse-llava models support cache_implementation 'dynamic' (the default) or 'static', got "
                f"{cache_implementation!r}"
            )
        max_cache_len = max(
            check_token_count("max_cache_len", kwargs.pop("max_cache_len", None)) or 0,
            check_token_count("generation_config.max_cache_len", getattr(settings, "max_cache_len", None)) or 0,
        )
        if settings.cache_implementation is not None or getattr(settings, "max_cache_len", None) is not None:
            # Ours is made here; transformers would otherwise make its own next to it.
            settings = copy.deepcopy(settings)
            settings.cache_implementation = None
            if hasattr(settings, "max_cache_len"):  # 5.x
                settings.max_cache_len = None
            generation_config = settings
        if cache is None and use_cache is not False:
            fixed = cache_implementation == "static"
            cache = self.new_cache(self.fixed_cache_length(prompt, settings, kwargs, max_cache_len) if fixed else None)
        if cache is None:
            return super().generate(inputs, generation_config, **kwargs)
        if prompt is not None:
            self.check_cache_for_generation(cache, prompt, self.conversation_length(prompt, settings, kwargs))
        kwargs[CACHE_NAME] = cache
        output = super().generate(inputs, generation_config, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # What the cache now holds: the prompt and the generated tokens but the last (never fed back). Known only when
        # the sequences start with the prompt's ids, one row per cache row (not after beam search's reordering).
        fed = int(cache.get_seq_length())
        known = prompt is not None and prompt.dim() == 2 and tuple(sequences.shape[:1]) == (cache.batch_size,)
        cache.conversation_ids = sequences[:, :fed] if known and sequences.shape[1] >= fed else None
        return output

    def check_generation_options(self, generation_config, generate_kwargs: dict) -> None:
        """Refuse the generation modes a [`SparseCache`] cannot serve, before generate() fails somewhere inside."""
        settings = generation_config if generation_config is not None else self.generation_config
        for option in CACHE_ROLLBACK_OPTIONS:
            if generate_kwargs.get(option) is not None or getattr(settings, option, None) is not None:
                raise ValueError(
                    f"generate({option}=...): assisted / speculative decoding is not supported by sparse-llava "
                    "models. It rolls the cache back past rejected draft tokens, and a SparseCache cannot be cropped: "
                    "after tokens are dropped or not admitted, the last logical tokens map to no fixed set of slots."
                )

    @classmethod
    def fixed_cache_length(cls, prompt, settings, kwargs, max_cache_len: int) -> int:
        """
        The capacity of a `generate(..., cache_implementation="static")` call's cache, in tokens of conversation: as
        transformers sizes a `StaticCache`, what the call feeds the model, or `max_cache_len` if larger (one size for
        calls of different lengths, so that a compiled step is reused).
        """
        if prompt is None:
            raise ValueError('cache_implementation="static" needs the prompt (input_ids or inputs_embeds)')
        return max(cls.conversation_length(prompt, settings, kwargs), max_cache_len)

    @staticmethod
    def conversation_length(prompt, settings, kwargs) -> int:
        """Tokens a `generate()` call feeds the model at most: the prompt and the new tokens but the last."""
        max_new_tokens = kwargs.get("max_new_tokens", settings.max_new_tokens)
        if max_new_tokens is not None:
            return prompt.shape[1] + max_new_tokens - 1
        return kwargs.get("max_length", settings.max_length) - 1

    def check_cache_for_generation(self, cache: SparseCache, prompt: torch.Tensor, length: int) -> None:
        """
        Before `generate()` starts, on the host (its compiled decode steps cannot check): a fixed cache has room for
        `length` tokens of conversation; a cache that holds a conversation gets a prompt that continues it; and for a
        fixed cache, whose decode steps do not read their position on the host, the warning about positions past
        `max_position_embeddings` is given up front (a growing cache's steps give it when they cross the limit).
        """
        if cache.max_cache_len is not None and length > cache.max_cache_len:
            raise ValueError(
                f"generate() feeds up to {length} tokens of conversation here (the prompt's {prompt.shape[1]} and the "
                f"new tokens but the last), and the SparseCache was made with max_cache_len={cache.max_cache_len}: "
                f"make it with model.new_cache(max_cache_len={length}) or more, or ask for fewer new tokens"
            )
        held = int(cache.get_seq_length())
        if held:
            rows, width = prompt.shape[:2]
            if rows != cache.batch_size:
                problem = f"of {cache.batch_size} rows, and the prompt has {rows}"
            elif width <= held:
                problem = f"of {held} tokens, and the prompt ({width} tokens) does not extend it"
            elif (
                cache.conversation_ids is not None
                and prompt.dim() == 2
                and not torch.equal(prompt[:, :held], cache.conversation_ids.to(prompt.device))
            ):
                problem = f"of {held} tokens, and the prompt's first {held} tokens are not that conversation"
            else:
                problem = None
            if problem is not None:
                raise ValueError(
                    f"this SparseCache already holds a conversation {problem}: pass a new cache (model.new_cache()) "
                    "or empty it with cache.reset() for a new conversation; to continue it, pass the sequences "
                    "generate() returned with the new turn appended"
                )
        max_positions = self.config.get_text_config().max_position_embeddings
        if cache.max_cache_len is not None and length > max_positions and not cache.warned_position_limit:
            cache.warned_position_limit = True
            warnings.warn(position_limit_message(length, max_positions), stacklevel=3)

    @staticmethod
    def create_masks_for_generate(attention_mask=None, **kwargs):
        """
        `generate()` turns the 2-D attention mask into a 4-D one for a compileable cache. sparse-llava layers build
        their own masks from the 2-D one (each layer holds different slots), and forward reads only its last columns:
        hand those on, so that a decode step gets a `[batch, 1]` mask, the same shape at every step.
        """
        embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
        if attention_mask is None or embeds is None:
            return attention_mask
        return attention_mask[:, -embeds.shape[1] :].contiguous()  # the same strides at every step, too

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return generation_step_inputs(super().prepare_inputs_for_generation(*args, **kwargs))

    # ----------------------------------------------------------------------------------------------------------
    # Forward, top to bottom: embed text and images, run the decoder layers, predict.
    # ----------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SparseCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        output_token_start: int | None = None,
        past_key_values: SparseCache | None = None,
        **kwargs,
    ) -> SparseLlavaOutput:
        r"""
        cache (`SparseCache`, *optional*):
            The KV cache to continue from and write to. `past_key_values` is its name on transformers < 5.24 (and
            still accepted).
        output_token_start (`int`, *optional*):
            Input column (logical position in the conversation) where generated output begins; tokens from there on
            are candidates for output-text dropping, tokens before it (system prompt, instructions, earlier turns)
            never are. `generate()` sets it to the prompt's width. When `None`, a single-token step on a non-empty
            cache counts as a generated token, and without a cache no token does.
        """
        self.check_inputs(input_ids, inputs_embeds, pixel_values, image_sizes, attention_mask)
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise NotImplementedError(f"{unsupported}=True is not supported by sparse-llava models")

        if use_cache is None:
            use_cache = self.config.get_text_config().use_cache and not self.training
        checkpointing = any(layer.gradient_checkpointing for layer in self.language_model.layers)
        if use_cache and self.training and checkpointing:
            # The checkpointed layers would not write their K/V, leaving the cache inconsistent across layers.
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        cache = take_cache_argument({"cache": cache, "past_key_values": past_key_values})
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, SparseCache):
            raise TypeError(
                f"sparse-llava models need a SparseCache (layers hold different numbers of tokens), got "
                f"{type(cache).__name__}; pass none and one is created, or pass model.new_cache()"
            )
        if not use_cache:
            cache = None

        inputs_embeds, image_location, image_lengths, image_features = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy
        )
        stream = self.make_stream(
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            image_location,
            image_lengths,
            image_sizes,
            output_token_start,
        )
        if labels is not None:
            stream = replace(stream, labels=labels.to(stream.valid.device))
        elif isinstance(logits_to_keep, int) and logits_to_keep == 1:
            stream = replace(stream, last_logits_only=True)  # as generate() asks: methods may drop more
        stream, token_counts = self.run_decoder(stream, cache, **kwargs)
        hidden_states = self.language_model.norm(stream.hidden_states)
        hidden_states = self.restore_input_positions(hidden_states, stream, inputs_embeds.shape[1])

        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss, loss_terms = None, None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
            loss_terms = {"lm_loss": lm_loss, **stream.auxiliary_losses}
            loss = sum(loss_terms.values())
        return SparseLlavaOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: cache},
            image_hidden_states=image_features,
            token_counts=token_counts,
            loss_terms=loss_terms,
        )

    def check_inputs(self, input_ids, inputs_embeds, pixel_values, image_sizes, attention_mask) -> None:
        """Raise a ValueError naming the problem for inputs the tensor code below would fail on, or get wrong."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if tokens.dim() < 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"{name} is empty or not batched: got shape {tuple(tokens.shape)}, need [batch, tokens]")
        batch_size, seq_len = tokens.shape[:2]
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("sparse-llava models take a 2-D attention_mask [batch, past + sequence]")
            if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, but the input is {batch_size} rows of "
                    f"{seq_len} tokens: it must be [batch, past + sequence], covering at least the input"
                )
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if has_images:
            self.check_pixel_values(pixel_values, image_sizes)
        elif input_ids is not None and seq_len > 1:
            # Reads the ids on the host: only for multi-token chunks (a prompt, a new turn), never in a decode step.
            image_token_id = self.config.image_token_id
            if bool((input_ids == image_token_id).any()):
                raise ValueError(
                    f"input_ids holds image tokens (id {image_token_id}) but no pixel_values were given: pass the "
                    "images the prompt refers to (the processor's pixel_values), or remove their image tokens"
                )

    def check_pixel_values(self, pixel_values: torch.Tensor, image_sizes) -> None:
        """The shapes transformers' processors give: LLaVA-1.5 [images, 3, H, W]; LLaVA-NeXT [images, tiles, 3, H, W]."""
        channels = self.config.vision_config.num_channels
        is_next = self.config.base_model_type == "llava_next"
        # transformers' LLaVA-NeXT also takes the tiles of all images flattened, [tiles, 3, H, W].
        dims = (4, 5) if is_next else (4,)
        if pixel_values.dim() not in dims or pixel_values.shape[-3] != channels:
            expected = "[images, tiles, channels, height, width]" if is_next else "[images, channels, height, width]"
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; a {'LLaVA-NeXT' if is_next else 'LLaVA-1.5'} "
                f"model takes {expected} with {channels} channels, as its processor returns"
            )
        if not is_next:
            return
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT models need image_sizes (the processor's) together with pixel_values")
        tiles = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]
        if pixel_values.dim() == 5 and (len(tiles) != pixel_values.shape[0] or max(tiles) > pixel_values.shape[1]):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} ([images, tiles, ...]), but image_sizes asks for "
                f"{len(tiles)} images of {tiles} tiles"
            )
        if pixel_values.dim() == 4 and sum(tiles) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} tiles ([tiles, ...]), but image_sizes asks for "
                f"{sum(tiles)} ({tiles} per image)"
            )

    def embed_inputs(
        self, input_ids, inputs_embeds, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy
    ):
        """Embed the text and scatter the projected image features into the image-token positions."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        no_image = torch.full((batch_size, seq_len), -1, dtype=torch.long, device=inputs_embeds.device)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return inputs_embeds, (no_image, no_image), (), None

        image_kwargs = {} if image_sizes is None else {"image_sizes": image_sizes}
        per_image = per_image_features(
            self.model,
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **image_kwargs,
        )
        image_lengths = tuple(feature.shape[0] for feature in per_image)
        features = torch.cat(per_image, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        special_image_mask = self.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features
        )
        inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, features)
        image_location = locate_image_tokens(special_image_mask[..., 0], list(image_lengths))
        return inputs_embeds, image_location, image_lengths, features

    def make_stream(
        self,
        inputs_embeds,
        attention_mask,
        position_ids,
        cache,
        image_location,
        image_lengths,
        image_sizes,
        output_token_start,
    ):
        image_index, image_offset = image_location
        batch_size, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_seen = cache.get_seq_length() if cache is not None else 0
        # A fixed-capacity cache counts in a tensor, so that its decode steps never wait for the device; a chunk (a
        # prompt, a new turn) may look on the host.
        if isinstance(past_seen, torch.Tensor) and seq_len > 1:
            past_seen = int(past_seen)
        on_host = not isinstance(past_seen, torch.Tensor)
        max_positions = self.config.get_text_config().max_position_embeddings
        # Warned once per conversation, when it crosses the limit (not checked in fixed-cache decode steps: no host
        # read; generate() warns for those up front).
        already_warned = cache is not None and cache.warned_position_limit
        if on_host and past_seen <= max_positions < past_seen + seq_len and not already_warned:
            if cache is not None:
                cache.warned_position_limit = True
            warnings.warn(position_limit_message(past_seen + seq_len, max_positions), stacklevel=2)
        if position_ids is None:
            # As transformers' LlamaModel: consecutive positions after what the cache has seen.
            position_ids = (torch.arange(seq_len, device=device) + past_seen).unsqueeze(0)
        position_ids = position_ids.expand(batch_size, -1)
        if attention_mask is None:
            valid = torch.ones((batch_size, seq_len), dtype=torch.bool, device=device)
        else:
            valid = attention_mask[:, -seq_len:].to(device=device, dtype=torch.bool)
        columns = (torch.arange(seq_len, device=device) + past_seen).expand(batch_size, -1)
        # `has_output_tokens` is known on the host; where it is not (a fixed cache's decode step), it says "maybe" and
        # `is_output` decides.
        if output_token_start is not None:
            has_output_tokens = past_seen + seq_len > output_token_start if on_host else True
            is_output = (columns >= output_token_start) & valid
        else:
            has_output_tokens = cache is not None and seq_len == 1 and (not on_host or past_seen > 0)
            is_output = valid & (has_output_tokens if on_host else past_seen > 0)
        return TokenStream(
            hidden_states=inputs_embeds,
            position_ids=position_ids,
            position_embeddings=self.language_model.rotary_emb(inputs_embeds, position_ids),
            valid=valid,
            source_index=torch.arange(seq_len, device=device).expand(batch_size, -1),
            image_index=image_index,
            image_offset=image_offset,
            image_lengths=image_lengths,
            image_sizes=image_sizes if image_lengths else None,
            is_output=is_output & (image_index < 0),
            has_output_tokens=has_output_tokens,
            logical_length=seq_len,
        )

    def run_decoder(self, stream: TokenStream, cache: SparseCache | None, **kwargs):
        """Run every decoder layer; returns the final stream and, per layer, the tokens kept versus seen."""
        seen = {
            "image": (stream.valid & stream.is_image).sum(-1),
            "output_text": (stream.valid & stream.is_output).sum(-1),
        }
        token_counts, counts = [], stream.token_counts(seen)
        for layer_idx, decoder_layer in enumerate(self.language_model.layers):
            previous = stream
            stream = self.before_layer(layer_idx, stream, cache)
            if stream.valid is not previous.valid or stream.admit is not previous.admit:
                counts = stream.token_counts(seen)
            token_counts.append(counts)
            stream = replace(stream, hidden_states=self.run_layer(layer_idx, decoder_layer, stream, cache, **kwargs))
        if cache is not None:
            cache.record(token_counts)
        return stream, token_counts

    def before_layer(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None) -> TokenStream:
        """Where a method drops tokens: return the stream layer `layer_idx` runs on. The base drops nothing."""
        return stream

    def run_layer(self, layer_idx, decoder_layer, stream: TokenStream, cache: SparseCache | None, **kwargs):
        """Run one of transformers' decoder layers on the stream; returns its output hidden states."""
        attention_mask = self.layer_attention_mask(layer_idx, stream, cache)
        # RoPE comes in `position_embeddings`. Positions have gaps after dropping, which flash-attention would
        # mistake for packed sequences, so no `position_ids` reach the layer. The mask goes positionally: reentrant
        # gradient checkpointing passes gradients only to positional inputs, and a training keep policy needs them.
        return decoder_layer(
            stream.hidden_states,
            attention_mask,
            **{CACHE_NAME: cache},
            use_cache=cache is not None,
            position_embeddings=stream.position_embeddings,
            **kwargs,
        )

    def layer_attention_mask(self, layer_idx: int, stream: TokenStream, cache: SparseCache | None):
        """
        The attention mask of one layer, in that layer's physical index space: the validity of the slots it holds,
        then of the incoming chunk, made causal by transformers' mask utilities for the configured attention backend.
        Within a multi-token chunk, slots that are not admitted are hidden from the other tokens (each still sees
        itself), as if the chunk had been fed one token at a time. With a cache, this also announces the chunk to the
        cache (which slots it will store).

        Backends: sdpa and eager take every mask as a tensor, flex_attention as a `BlockMask` of a mask function
        (validity, causality, admission, per-head visibility). The flash backends take the 2-D key mask alone, which
        their unpadding honours (slot validity, padding); admission inside a multi-token chunk, which it cannot hold,
        is refused.
        """
        if stream.key_policy is not None:
            return self.policy_attention_mask(stream, cache)
        if cache is None:
            slots_valid, past_slots = stream.valid, 0
        else:
            chunk = IncomingChunk(
                valid=stream.valid,
                admit=stream.admit,
                logical_length=stream.logical_length,
                is_image=stream.is_image if stream.has_images else None,
            )
            slots_valid = cache.begin_chunk(layer_idx, chunk)
            past_slots = slots_valid.shape[1] - stream.valid.shape[1]
        chunk_length = stream.hidden_states.shape[1]
        if chunk_length == 1:  # a decode step
            visible = self.decode_step_visibility(layer_idx, slots_valid, cache)
            mask = single_query_mask(self.config.get_text_config(), visible, stream.hidden_states.dtype)
            if mask is not None:
                return mask
        admission_mask = None
        if stream.admit is not None and chunk_length > 1:
            backend = attention_backend(self.config.get_text_config())
            if is_flash_backend(backend):
                raise ValueError(
                    f"{type(self).__name__}: admission inside a multi-token chunk (generated tokens fed back at once) "
                    f"cannot be expressed by {backend}; use attn_implementation='sdpa' or 'flex_attention'"
                )
            past_admitted = torch.ones_like(slots_valid[:, :past_slots])
            admitted = torch.cat([past_admitted, stream.admit], dim=-1)

            def admission_mask(batch_idx, head_idx, q_idx, kv_idx):
                return admitted[batch_idx, kv_idx] | (kv_idx == q_idx)

        return create_layer_causal_mask(
            self.config.get_text_config(),
            stream.hidden_states,
            slots_valid,
            cache,
            layer_idx,
            admission_mask,
            # Checking whether a mask can be skipped reads it on the host; only worth it for multi-token chunks.
            skip_allowed=chunk_length > 1,
        )

    def decode_step_visibility(self, layer_idx: int, slots_visible: torch.Tensor, cache: SparseCache | None):
        """
        The slots a decode step's token reads in layer `layer_idx`: `[batch, slots]`, or `[batch, heads, slots]` for
        a method whose heads read different slots. The base: every slot the cache shows it.
        """
        return slots_visible

    def policy_attention_mask(self, stream: TokenStream, cache: SparseCache | None) -> torch.Tensor:
        """
        The training-time mask of a stream with a float `key_policy` p (Dynamic-LLaVA's MaskedSoftmax): with
        `G[q, k] = p[k]` off the diagonal and 1 on it, attention is `exp(s) * G / sum_k(exp(s) * G)` over the causal,
        valid keys, so dropped keys are hidden from later tokens, every token still sees itself, and the gradient
        reaches p. It is computed as the additive float mask `log(G + eps)`, which eager and SDPA attention take as is
        (eps plays the role of the reference's, keeping the gradient finite where p = 0).
        """
        backend = attention_backend(self.config.get_text_config())
        if backend not in ("eager", "sdpa"):
            raise ValueError(
                f"{type(self).__name__}: the training keep policy (a float attention mask) cannot be expressed by "
                f"{backend}; use attn_implementation='sdpa' or 'eager'"
            )
        if cache is not None:
            raise ValueError("a keep policy (training forward) runs without a cache: pass use_cache=False")
        policy = stream.key_policy[:, None, :]
        length = policy.shape[-1]
        diagonal = torch.eye(length, dtype=policy.dtype, device=policy.device)
        gate = policy + (1 - policy) * diagonal
        causal = torch.ones(length, length, dtype=torch.bool, device=policy.device).tril()
        visible = causal & stream.valid[:, None, :]
        dtype = stream.hidden_states.dtype
        mask = torch.where(visible, torch.log(gate + POLICY_EPS), torch.finfo(dtype).min)
        return mask.unsqueeze(1).to(dtype)

    @staticmethod
    def restore_input_positions(hidden_states: torch.Tensor, stream: TokenStream, seq_len: int) -> torch.Tensor:
        """Put each slot's output back at its input column; dropped positions get zeros."""
        if not stream.shortened:
            return hidden_states
        base = hidden_states.new_zeros((hidden_states.shape[0], seq_len, hidden_states.shape[-1]))
        return scatter_slots(base, hidden_states, stream.source_index, stream.valid)
