"""Answers and their cost, the same way for sparse-llava models and for the dense llava-hf base they came from.

Shared by the lmms-eval plugin (`sparse_llava.lmms_eval_plugin`) and the accuracy-against-cost command
(`benchmarks/accuracy.py`):

* `load_for_evaluation` loads a sparse-llava folder or Hub repo, or a dense llava-hf checkpoint, with its processor;
* `user_turn_prompt` writes one user turn with images through the processor's chat template;
* `generate_with_cost` generates for a batch (left-padded) and measures, per sample, what it cost: the image tokens
  each decoder layer kept, the generated tokens and how many of them each layer kept, the KV-cache bytes held at
  the end of the sample's generation, and the prefill FLOPs.

Per-sample costs are exact in a batch. A row that finishes early keeps receiving padding until the whole batch is
done; those steps are not counted for it (its counts are read after its own last step, from per-step snapshots of
the `SparseCache`'s running counts). Prefill FLOPs come from one extra forward of the sample's prompt alone (batch of
one, no padding), counted with `sparse_llava.flops`; `measure_flops=False` skips it.
"""

from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .compat_transformers import CACHE_NAME, dtype_argument
from .flops import flop_counter


@dataclass
class SampleCost:
    """What answering one sample cost (see the module docstring)."""

    prompt_tokens: int  # tokens of the prompt, image tokens included, padding not
    image_tokens: int  # image tokens of the prompt (what a dense model keeps in every layer)
    image_tokens_kept: list[int]  # per decoder layer: image tokens the layer kept (ran through it, and cached)
    output_tokens: int  # generated tokens (the end-of-sequence token included)
    output_text_tokens_kept: list[int]  # per decoder layer: generated tokens later tokens could see in that layer
    kv_cache_bytes: int  # keys and values held for the sample once its generation ended
    prefill_flops: int | None = None  # FLOPs of the prompt's forward pass (None: not measured)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    cost: SampleCost


@dataclass
class CostSummary:
    """Means of `SampleCost`s over samples, with the keep rates the tables show."""

    samples: int
    prefill_flops: float | None
    kv_cache_bytes: float
    image_tokens: float
    image_tokens_kept: list[float] = field(default_factory=list)  # per layer
    output_tokens: float = 0.0
    output_text_tokens_kept: list[float] = field(default_factory=list)  # per layer

    @property
    def image_keep_rate(self) -> float | None:
        """Image tokens kept over image tokens seen, averaged over layers (1.0 for a dense model)."""
        if not self.image_tokens or not self.image_tokens_kept:
            return None
        return sum(self.image_tokens_kept) / len(self.image_tokens_kept) / self.image_tokens

    @property
    def output_keep_rate(self) -> float | None:
        """Generated tokens kept over generated tokens run through the model, averaged over layers."""
        # The last generated token is never run through the model, so it is neither kept nor dropped.
        seen = self.output_tokens - 1
        if seen <= 0 or not self.output_text_tokens_kept:
            return None
        return sum(self.output_text_tokens_kept) / len(self.output_text_tokens_kept) / seen


def summarize_costs(costs: list[SampleCost]) -> CostSummary:
    if not costs:
        raise ValueError("no samples to summarise")

    def mean(values):
        return sum(values) / len(values)

    flops = [cost.prefill_flops for cost in costs]
    return CostSummary(
        samples=len(costs),
        prefill_flops=None if None in flops else mean(flops),
        kv_cache_bytes=mean([cost.kv_cache_bytes for cost in costs]),
        image_tokens=mean([cost.image_tokens for cost in costs]),
        image_tokens_kept=[mean(layer) for layer in zip(*(cost.image_tokens_kept for cost in costs))],
        output_tokens=mean([cost.output_tokens for cost in costs]),
        output_text_tokens_kept=[mean(layer) for layer in zip(*(cost.output_text_tokens_kept for cost in costs))],
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading and prompting
# ---------------------------------------------------------------------------------------------------------------


def load_for_evaluation(
    pretrained: str,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """
    `(model, processor)` for a sparse-llava folder or Hub repo, or a dense llava-hf checkpoint (the baseline).

    Without `trust_remote_code`, sparse-llava checkpoints run this installed package's code (its classes are
    registered with the Auto classes first); with it, the code the checkpoint carries. Dense checkpoints load
    transformers' own LLaVA classes either way. The processor pads on the left, as batched generation needs.
    """
    import sparse_llava

    model_dtype = torch_dtype(dtype)
    if not trust_remote_code:
        sparse_llava.register_auto_classes()
    model = AutoModelForImageTextToText.from_pretrained(
        pretrained,
        revision=revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        **dtype_argument(model_dtype),
    )
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return model, processor


def torch_dtype(dtype: str) -> str | torch.dtype:
    """`dtype` as `from_pretrained` takes it: `"auto"`, or the torch dtype of that name (`"bfloat16"`)."""
    if dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or a torch dtype name such as 'float32', 'bfloat16'")
    return resolved


def user_turn_prompt(processor, text: str, num_images: int) -> str:
    """
    One user turn through the processor's chat template, ready for the answer. If `text` already holds the images'
    placeholders (`<image>`), they stay where they are; otherwise the images come first, as LLaVA was trained.
    """
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            "the processor has no chat template, so the prompt format of the model is unknown; give the checkpoint "
            "its base's chat template (converted folders carry it) or set processor.chat_template"
        )
    placeholders = text.count(processor.image_token)
    if placeholders not in (0, num_images):
        raise ValueError(f"the prompt has {placeholders} {processor.image_token} placeholders for {num_images} images")
    images = [] if placeholders else [{"type": "image"}] * num_images
    messages = [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# Generation with costs
# ---------------------------------------------------------------------------------------------------------------


def _image_token_id(model) -> int:
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    return config.image_token_index if token_id is None else token_id


def _eos_token_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


class _SparseCacheSnapshots:
    """
    After every forward of a sparse-llava model inside `generate()`: the `SparseCache`'s running per-layer, per-row
    token counts and the tokens each layer stores, so that a row's costs can be read after its own last step.
    """

    def __init__(self, model):
        self.counts: list[torch.Tensor] = []  # per step: [layers, len(COUNT_NAMES), batch] running sums
        self.stored: list[torch.Tensor] = []  # per step: [layers, batch]
        self.slot_bytes: list[int] = []
        self._handle = model.register_forward_hook(self._after_forward)

    def _after_forward(self, module, args, output):
        cache = getattr(output, CACHE_NAME, None)
        if cache is None or getattr(cache, "token_stats", None) is None:
            return
        self.counts.append(cache.token_stats.clone())
        self.stored.append(torch.stack([layer.stored_tokens() for layer in cache.layers]))
        self.slot_bytes = [layer.slot_bytes() for layer in cache.layers]

    def remove(self):
        self._handle.remove()


@torch.no_grad()
def generate_with_cost(
    model,
    processor,
    prompts: list[str],
    images: list[list] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    measure_flops: bool = True,
) -> list[Generation]:
    """
    Generate for `prompts` (each with its list of `images`, in order) as one left-padded batch; per sample, the
    answer (special tokens removed), its token ids and its `SampleCost`. Generation stops at the end-of-sequence
    token or after `max_new_tokens`.
    """
    images = images if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    inputs = _processor_inputs(model, processor, prompts, images)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = processor.tokenizer.pad_token_id

    snapshots = _SparseCacheSnapshots(model)
    try:
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            return_dict_in_generate=True,
            **sampling,
        )
    finally:
        snapshots.remove()

    prompt_width = inputs["input_ids"].shape[1]
    new_tokens = output.sequences[:, prompt_width:].tolist()
    eos_ids = _eos_token_ids(model)
    prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
    image_tokens = (inputs["input_ids"] == _image_token_id(model)).sum(-1).tolist()
    generations = []
    for row, tokens in enumerate(new_tokens):
        # A row is done at its first end-of-sequence token; generate() pads it after that.
        length = next((index + 1 for index, token in enumerate(tokens) if token in eos_ids), len(tokens))
        tokens = tokens[:length]
        if snapshots.counts:
            cost = _sparse_cost(snapshots, row, length, prompt_tokens[row], image_tokens[row])
        else:
            cost = _dense_cost(model, getattr(output, CACHE_NAME), length, prompt_tokens[row], image_tokens[row])
        generations.append(Generation(processor.decode(tokens, skip_special_tokens=True), tokens, cost))
    if measure_flops:
        for generation, prompt, sample_images in zip(generations, prompts, images):
            generation.cost.prefill_flops = prefill_flops(model, processor, prompt, sample_images)
    return generations


def _processor_inputs(model, processor, prompts, images) -> dict:
    flat_images = [image for sample in images for image in sample]
    inputs = processor(images=flat_images or None, text=list(prompts), padding=True, return_tensors="pt").to(
        model.device
    )
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def _sparse_cost(snapshots, row, length, prompt_tokens, image_tokens) -> SampleCost:
    # Step 0 is the prompt, step k feeds generated token k; a row of `length` tokens took steps 0..length-1.
    counts = snapshots.counts[length - 1][:, :, row].tolist()  # [layer][image_kept, image_seen, output_kept, seen]
    stored = snapshots.stored[length - 1][:, row].tolist()
    return SampleCost(
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        image_tokens_kept=[layer[0] for layer in counts],
        output_tokens=length,
        output_text_tokens_kept=[layer[2] for layer in counts],
        kv_cache_bytes=sum(tokens * size for tokens, size in zip(stored, snapshots.slot_bytes)),
    )


def _dense_cost(model, cache, length, prompt_tokens, image_tokens) -> SampleCost:
    # A dense LLaVA runs and caches every token in every layer: the prompt and the generated tokens fed back.
    layers = _num_layers(model)
    bytes_per_token = sum(2 * layer.keys[0, :, 0].numel() * layer.keys.element_size() for layer in cache.layers)
    return SampleCost(
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        image_tokens_kept=[image_tokens] * layers,
        output_tokens=length,
        output_text_tokens_kept=[length - 1] * layers,
        kv_cache_bytes=(prompt_tokens + length - 1) * bytes_per_token,
    )


@torch.no_grad()
def prefill_flops(model, processor, prompt: str, images: list) -> int:
    """FLOPs of the forward pass over one prompt (batch of one), as `generate()` runs it: last position's logits."""
    inputs = _processor_inputs(model, processor, [prompt], [images])
    with flop_counter() as counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    return counter.get_total_flops()
