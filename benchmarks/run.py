"""Cost of sparse-llava models against transformers' dense LLaVA, measured in one run.

    python benchmarks/run.py [--quick] [--json results.json] [--plot figure.png] [--device cpu|cuda]
                             [--new-tokens 256 1024] [--decode-tokens 1024] [--batch-decode-tokens 256]
                             [--decode-only] [--batches 1 8] [--models ...] [--decode-repeats 2] [--no-compile]
                             [--no-kv-budget] [--threads N]

All models of a shape share the same random weights. Two mid-size shapes (hidden 1024; the vision tower is kept small
so that the language model, which the methods act on, dominates):

* LLaVA-1.5-shaped: 16 decoder layers, one 336 px image = 576 image tokens, 24 text tokens;
* LLaVA-NeXT-shaped: 8 decoder layers, one 672 x 672 image = 2,928 image tokens (base tile, 2 x 2 tiles, newlines).

For each method it measures, on the LLaVA-1.5 shape,

* prefill FLOPs (`torch.utils.flop_counter`, attention included on CPU too) and prefill wall time (median of repeats
  after a warm-up, the FLOP-counted prefill);
* the KV-cache bytes after prefill (all, and the image tokens' part) and after N new tokens (`--new-tokens`; for
  N = the batch-1 decode length, read off that decode-speed run's default cache);
* decode tokens/s at batch 1 (over `--decode-tokens` new tokens, 1024) and at batch 8 (rows of different prompts,
  over `--batch-decode-tokens`, 256), against dense LLaVA's strongest set-ups: its `StaticCache` eagerly (the
  baseline of the ratios) and compiled, next to its `DynamicCache` (for reference). Each method runs its default
  growing `SparseCache`, the fixed-capacity one (`cache_implementation="static"`) eagerly, and that compiled, by
  `generate()` itself (`compile_config`, inductor; on CPU with transformers' private `_compile_all_devices` switch),
  after an untimed compiling generation. The repeats (`--decode-repeats`, 2) go round all set-ups in turn, and a
  step's time is its fastest over them, which keeps the numbers readable on a machine whose speed drifts;
* throughput within a KV-cache budget, what dense LLaVA's `StaticCache` holds for 4 rows over the batch-8 length
  (`--quick`: batch 1 and its length): the largest batch each method's default cache fits (bytes per row measured at
  that batch, checked at the batch found) and its tokens/s there;
  for the fixed-capacity cache, whose size is known after the prefill, the largest batch;
* the FLOPs of one decode step without a cache (the whole sequence after the decode-speed run's tokens, last
  position's logits only, as `generate(use_cache=False)` runs it);
* the share of a decode step spent in attention (`attention_share_b{1,8}`, profiled), the part a smaller cache makes
  cheaper: about `1 / (1 - share)` of dense is the most any method that keeps text tokens in every layer can reach;
* the KV slots a decode step's attention reads and attends to (`slots_read_b{1,8}_<setup>`, `slots_attended_...`;
  see `slots_per_decode_step`), counted from the masks the steps hand to attention, summed over layers and rows and
  averaged over the steps of an eager generation of the batch's new tokens: with each method's growing cache and its
  fixed-capacity cache, against dense LLaVA's StaticCache;
* peak memory, each model in a fresh process (so that no other model counts): built, one prefill, then a generation
  of the longest N (`--quick`: 32) tokens; on CPU the peak resident set, on CUDA the allocator's peak; also the part
  above what the process held once the model was built (`peak_memory_above_model`);

and prefill FLOPs, prefill time, KV after prefill and peak memory on the LLaVA-NeXT shape (`next_*`; `--quick`: no
peak memory there). `--plot` draws KV-cache bytes and cumulative decode FLOPs against output tokens for every method
(needs matplotlib: `pip install sparse-llava[plot]`).

Untrained predictors would make arbitrary decisions, so the decisions are forced to the paper's keep rates:
* Dynamic-LLaVA's image predictor keeps its top `floor(0.2 n)` image tokens whatever its weights (a fixed count);
  its output-text predictor gets a per-row offset on the keep logit so that each row keeps about half of its
  generated tokens (the paper's r^OT = 0.5, which its regulariser trains per sample): started from an untimed
  calibration generation of the measured rows and length, and following the row's decisions while decoding
  (`OutputKeepRate`); the measured keep rate is reported (`output_keep_rate_N`);
* p-MoD layers keep `trunc(n R_l)` vision tokens whatever the routers' weights (the progressive schedule);
* YOPO runs its 12% preset (5 x 5 window, vision tokens in the first quarter of the layers, half the FFN neurons);
  from layer 2 on (the reference never prunes layers 0 and 1) only the first half of the heads keep working on
  vision tokens, a stand-in for a calibrated mask.

Ratios are against dense LLaVA in the same run (dense = 1.00). Nothing here is asserted: timings are for reading.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    StaticCache,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastv import FastVLlava  # noqa: E402

from sparse_llava import (  # noqa: E402
    DynamicLlavaConfig,
    DynamicLlavaForConditionalGeneration,
    PMoDConfig,
    PMoDLlavaForConditionalGeneration,
    SparseLlavaConfig,
    YopoConfig,
    YopoLlavaForConditionalGeneration,
)
from sparse_llava.cache_sparse_llava import SparseCache  # noqa: E402
from sparse_llava.compat_transformers import CACHE_NAME  # noqa: E402
from sparse_llava.configuration_yopo import preset_settings  # noqa: E402
from sparse_llava.flops import flop_counter  # noqa: E402
from sparse_llava.modeling_sparse_llava import SparseLlavaForConditionalGeneration  # noqa: E402

IMAGE_TOKEN_ID = 32000
NEXT_IMAGE_SIZE = (672, 672)  # a 2 x 2 tile grid: 576 base + 48 x (48 + 1) high-resolution tokens = 2,928


def base_config(shape: str = "llava-1.5"):
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16 if shape == "llava-1.5" else 8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=8192,
    )
    vision = dict(
        model_type="clip_vision_model",
        image_size=336,
        patch_size=14,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=256,
    )
    common = dict(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1)
    if shape == "llava-1.5":
        return LlavaConfig(**common)
    return LlavaNextConfig(**common, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]])


def image_tokens(config) -> int:
    """Number of image tokens LLaVA / LLaVA-NeXT produce for the benchmark's image."""
    side = 336 // 14
    if config.model_type == "llava":
        return side * side
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    rows, columns = get_anyres_image_grid_shape(NEXT_IMAGE_SIZE, config.image_grid_pinpoints, 336)
    height, width = unpad_image(torch.zeros(1, rows * side, columns * side), torch.tensor(NEXT_IMAGE_SIZE)).shape[1:]
    return side * side + height * (width + 1)


def make_inputs(config, device, batch: int = 1) -> dict:
    """`batch` different prompts of the same shape (each row its own text and image; row 0 the same for any batch)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        # A short LLaVA-1.5-style prompt: system text, the image, the question.
        before, after = (torch.randint(100, 30000, (1, 12), generator=generator) for _ in range(2))
        input_ids = torch.cat([before, torch.full((1, image_tokens(config)), IMAGE_TOKEN_ID), after], dim=1)
        if config.model_type == "llava":
            pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
        else:
            pixel_values = torch.randn(1, 5, 3, 336, 336, generator=generator)
        rows.append((input_ids, pixel_values))
    input_ids = torch.cat([row[0] for row in rows])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    inputs["pixel_values"] = torch.cat([row[1] for row in rows])
    if config.model_type != "llava":
        inputs["image_sizes"] = torch.tensor([NEXT_IMAGE_SIZE] * batch)
    return {key: value.to(device) for key, value in inputs.items()}


def yopo_config(config, preset: str) -> YopoConfig:
    """A YOPO preset with half the heads pruned for vision tokens from layer 2 on (see module docstring)."""
    text = config.text_config
    num_heads = text.num_attention_heads
    head_mask = [
        [layer < 2 or head < num_heads // 2 for head in range(num_heads)] for layer in range(text.num_hidden_layers)
    ]
    return YopoConfig.from_base_config(
        config, **preset_settings(preset, text.num_hidden_layers), vision_head_mask=head_mask
    )


def build_model(name: str, config):
    """One of the benchmark's models (random weights) for a base config."""
    if name == "dense":
        dense_class = (
            LlavaForConditionalGeneration if config.model_type == "llava" else LlavaNextForConditionalGeneration
        )
        return dense_class(config)
    if name == "fastv":
        # The training-free baseline the papers compare against (benchmarks/fastv.py): layer 2, 50% of image tokens.
        return FastVLlava(SparseLlavaConfig.from_base_config(config))
    if name == "dynamic-llava":
        # The paper's predictors (width 512) sit on a 4096-wide LLM; scale them with the model (1024 / 8 = 128) so
        # that their share of the cost is the paper's, not four times it.
        return DynamicLlavaForConditionalGeneration(
            DynamicLlavaConfig.from_base_config(
                config, predictor_hidden_size=128, predictor_intermediate_size=512, predictor_num_heads=8
            )
        )
    if name == "p-mod":
        # Zero-initialised routers: every layer keeps exactly trunc(n * R_l) vision tokens whatever the weights.
        return PMoDLlavaForConditionalGeneration(PMoDConfig.from_base_config(config))
    if name == "yopo":
        return YopoLlavaForConditionalGeneration(yopo_config(config, "12%"))
    raise ValueError(f"unknown model {name!r}")


METHODS = ("dense", "fastv", "dynamic-llava", "p-mod", "yopo")


def build_models(shape, device, names=METHODS) -> dict:
    """Dense LLaVA and each method, all with the dense model's weights (the methods' new modules freshly made)."""
    torch.manual_seed(0)
    config = base_config(shape)
    models = {name: build_model(name, config) for name in names}
    dense = models["dense"]
    for name, model in models.items():
        if model is not dense:
            missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
            assert not unexpected and all(key.startswith(model.new_module_names) for key in missing), name
        model.eval().to(device)
        model.generation_config.pad_token_id = 0
    return models


class OutputKeepRate:
    """
    Forces Dynamic-LLaVA's output-text decisions to keep about `rate` of each row's generated tokens (see module
    docstring): a per-row offset is taken off the keep logit (a forward hook on the output-text predictor). Per row,
    because the paper's regulariser pulls each sample's kept fraction to its target, and because a batch's cache is as
    wide as the row that keeps most. A random model's margins drift over a long output, so during eager decoding each
    row's offset follows its decisions (up after a keep, down after a drop: a running quantile, whose step doubles
    while the decisions go one way), starting, at every prompt, from the rows' median margin in an untimed calibration
    generation. In a compiled step the offsets stay as they are.
    """

    def __init__(self, model, rate: float = 0.5, step: float = 0.1):
        self.model, self.rate, self.step = model, rate, step
        self.start = self.start_steps = self.offsets = None
        self.base_steps = self.step_sizes = self.directions = None
        self.margins: list[torch.Tensor] | None = None  # recorded during calibration
        model.output_text_score_predictor.register_forward_hook(self.decide)
        model.register_forward_pre_hook(self.new_prompt, with_kwargs=True)

    def new_prompt(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if self.start is None or input_ids is None or input_ids.shape[1] == 1:
            return
        # Rows past the calibrated ones (a larger batch of the same prompts and more) start from their median.
        extra = max(input_ids.shape[0] - len(self.start), 0)
        self.offsets = torch.cat([self.start, self.start.median().expand(extra)])
        self.base_steps = torch.cat([self.start_steps, self.start_steps.median().expand(extra)])
        self.step_sizes = self.base_steps.clone()
        self.directions = torch.zeros_like(self.offsets)

    def decide(self, module, args, logits):
        if self.offsets is None:
            margin = logits[..., 0] - logits[..., 1]
        else:
            offsets = self.offsets[: logits.shape[0]].view(-1, *([1] * (logits.dim() - 2)))
            logits = torch.stack([logits[..., 0] - offsets, logits[..., 1]], dim=-1)
            margin = logits[..., 0] - logits[..., 1]
            if not torch.compiler.is_compiling():
                rows = logits.shape[0]
                direction = torch.sign((margin > 0).float().flatten(1).mean(1) - self.rate)
                # A row that keeps deciding the same way is far from its quantile: double its step until it turns.
                same = direction == self.directions[:rows]
                self.step_sizes[:rows] = torch.where(
                    same, self.step_sizes[:rows] * 2, torch.maximum(self.step_sizes[:rows] / 2, self.base_steps[:rows])
                )
                self.offsets[:rows] += self.step_sizes[:rows] * direction
                self.directions[:rows] = direction
        if self.margins is not None:
            self.margins.append(margin.flatten(1).float())
        return logits

    def calibrate(self, inputs, tokens: int) -> None:
        """One untimed generation of the measured rows and length, without offsets: each row's median margin and its
        spread set the starting offsets and the step."""
        self.start = self.offsets = None
        self.margins = []
        self.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        margins, self.margins = torch.cat(self.margins, dim=1), None
        self.start = torch.quantile(margins, 1 - self.rate, dim=1)
        spread = torch.quantile(margins, 0.75, dim=1) - torch.quantile(margins, 0.25, dim=1)
        self.start_steps = self.step * spread.clamp(min=1e-6)


def force_output_keep_rate(model, inputs, tokens: int, rate: float = 0.5) -> None:
    """Keep about `rate` of each row's generated tokens from now on (`OutputKeepRate`), calibrated for these rows and
    this length."""
    forcing = getattr(model, "forced_output_keep_rate", None)
    if forcing is None:
        forcing = model.forced_output_keep_rate = OutputKeepRate(model, rate)
    forcing.calibrate(inputs, tokens)


def kv_bytes(cache, stored_only: bool = False) -> int:
    """
    Bytes of the KV cache as allocated (`stored_only`: of the tokens it holds, leaving out unused capacity). A dense
    `DynamicCache` holds exactly its tokens; a `StaticCache` is counted as allocated, as a `SparseCache`.
    """
    if isinstance(cache, SparseCache):
        return cache.memory_bytes() if stored_only else cache.allocated_bytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(shape: str, name: str, tokens: int, device) -> dict:
    """
    Peak memory of one model in a fresh process (so that no other model's memory counts): built, one prefill, then a
    generation of `tokens` tokens. On CPU the process's peak resident set (`VmHWM`), on CUDA the allocator's peak;
    `peak_memory_above_model` leaves out what the process held once the model was built.
    """
    import subprocess

    command = [sys.executable, __file__, "--peak-memory-of", shape, name, str(tokens), "--device", str(device)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def process_memory(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, in bytes (Linux). Unlike `ru_maxrss`, which
    a child inherits from its parent across fork and exec, `VmHWM` starts afresh with the new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(shape: str, name: str, tokens: int, device) -> None:
    cuda = torch.device(device).type == "cuda"

    def peak_now():
        return torch.cuda.max_memory_allocated() if cuda else process_memory("VmHWM")

    torch.manual_seed(0)
    model = build_model(name, base_config(shape)).eval().to(device)
    model.generation_config.pad_token_id = 0
    inputs = make_inputs(base_config(shape), device)
    built = torch.cuda.memory_allocated() if cuda else process_memory("VmRSS")
    if hasattr(model, "output_text_score_predictor") and tokens > 1:
        force_output_keep_rate(model, inputs, tokens=tokens)
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
        if tokens:
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    peak = peak_now()
    print(json.dumps({"peak_memory": peak, "peak_memory_above_model": peak - built}))


def measure_prefill(model, inputs, repeats, device) -> dict:
    result = {}
    with torch.no_grad():
        # As in generate(): only the last position's logits are computed at prefill.
        with flop_counter() as counter:  # also the warm-up of the timed prefills
            model(**inputs, use_cache=True, logits_to_keep=1)
        result["prefill_flops"] = counter.get_total_flops()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            output = model(**inputs, use_cache=True, logits_to_keep=1)
            synchronize(device)
            times.append(time.perf_counter() - start)
        result["prefill_time"] = statistics.median(times)
        cache = getattr(output, CACHE_NAME)
        result["kv_bytes_prefill"] = kv_bytes(cache)
        result["kv_vision_bytes_prefill"] = vision_kv_bytes(cache, inputs)
    return result


def vision_kv_bytes(cache, inputs) -> int:
    """Bytes of the image tokens' keys and values in the cache (dense LLaVA keeps every image token in every layer)."""
    if not isinstance(cache, SparseCache):
        image_tokens = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
        return sum(image_tokens * layer.keys[0, :, 0].numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return sum(
        int(cache.stored_image_tokens(layer_idx).sum()) * layer.slot_bytes()
        for layer_idx, layer in enumerate(cache.layers)
    )


def keep_rates(cache, suffix: str) -> dict:
    """The last layer's kept fractions of image and output-text tokens, over all rows (sparse caches only)."""
    if not hasattr(cache, "sparsity_report"):
        return {}
    last = cache.sparsity_report()[-1]
    return {
        f"output_keep_rate_{suffix}": sum(last["output_text_kept"]) / max(sum(last["output_text_seen"]), 1),
        f"image_keep_rate_{suffix}": sum(last["image_kept"]) / max(sum(last["image_seen"]), 1),
    }


def measure_decode(name, model, inputs, new_tokens, device) -> dict:
    """KV-cache bytes (and what the methods kept) after N new tokens, with each model's default cache, batch 1."""
    result = {}
    for count in new_tokens:
        if hasattr(model, "output_text_score_predictor"):
            force_output_keep_rate(model, inputs, tokens=count)
        start = time.perf_counter()
        output, _ = timed_generate(model, inputs, count, device)
        cache = getattr(output, CACHE_NAME)
        result[f"kv_bytes_{count}"] = kv_bytes(cache)
        result.update(keep_rates(cache, str(count)))
        print(f"  {name}: {count} new tokens in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Decode speed: set-ups, batches, a KV-cache budget, and decoding without a cache.
# ---------------------------------------------------------------------------------------------------------------

# Dense LLaVA: transformers' DynamicCache (for reference), its StaticCache (the baseline), and that compiled. The
# methods: their default growing SparseCache, the fixed-capacity one, and that compiled.
SETUPS = {"dense": ("dynamic", "static", "compiled"), "sparse": ("eager", "static", "compiled")}
BUDGET_BATCH = 4  # the KV-cache budget: what dense LLaVA's StaticCache takes for this many rows


def setups_of(name: str) -> tuple[str, ...]:
    return SETUPS["dense" if name == "dense" else "sparse"]


def timed_generate(model, inputs, tokens: int, device, profiler=None, **settings):
    """
    Greedy `generate()` of `tokens` new tokens; returns its output and the time of each decode step. Steps are marked
    where `generate()` prepares each forward's inputs, outside any compiled region (a forward hook would be compiled
    into the graph), so the first step starts when the prefill has ended. A `torch.profiler.profile` given as
    `profiler` records the decode steps only.
    """
    marks = []
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)  # generate() reads its signature
    def marked(*args, **kwargs):
        synchronize(device)
        marks.append(time.perf_counter())
        if profiler is not None and len(marks) == 2:  # the first decode step
            profiler.start()
        return original(*args, **kwargs)

    model.prepare_inputs_for_generation = marked
    try:
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                return_dict_in_generate=True,
                **settings,
            )
        synchronize(device)
        marks.append(time.perf_counter())
    finally:
        del model.prepare_inputs_for_generation
        if profiler is not None and len(marks) > 2:
            profiler.stop()
    # marks[0]: before the prefill; marks[1]: before the first decode step; the last: after the last step.
    return output, [end - start for start, end in zip(marks[1:], marks[2:])]


def decode_settings(model, setup: str, max_cache_len: int, device) -> dict:
    """`generate()` arguments of a set-up ("dynamic" / "eager": the model's default cache)."""
    if setup in ("dynamic", "eager"):
        return {}
    if isinstance(model, SparseLlavaForConditionalGeneration):
        settings = {"cache_implementation": "static", "max_cache_len": max_cache_len}
    else:
        # Dense LLaVA gets a StaticCache of this run's size: from `cache_implementation="static"`, generate() would
        # size it to the largest `max_cache_len` of any earlier call on the model (to spare a recompile), so that the
        # batch-8 runs would attend over the batch-1 runs' 1,600 slots.
        text_config = model.config.get_text_config(decoder=True)
        settings = {CACHE_NAME: StaticCache(config=text_config, max_cache_len=max_cache_len)}
    if setup == "compiled":
        cuda = torch.device(device).type == "cuda"
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
        # generate() compiles on its own only on GPUs; transformers' switch for other devices (a private attribute).
        compile_config._compile_all_devices = True
        settings["compile_config"] = compile_config
    return settings


def decode_rate(step_times: list[list[float]], batch: int) -> float:
    """Decode tokens/s: rows times steps over the steps' time, each step timed by its fastest repeat (robust to the
    load of a shared machine)."""
    fastest = [min(times) for times in zip(*step_times)]
    return batch * len(fastest) / sum(fastest)


PROFILED_STEPS = 8


def attention_share(model, inputs, tokens: int, device) -> float:
    """
    The fraction of a decode step's time spent in the attention kernels (`scaled_dot_product_attention`), the only
    part of a text token's step that shrinks with the cache: over the first `PROFILED_STEPS` steps (fewer if `tokens`
    is smaller) with the fixed-capacity cache (dense: its StaticCache), eagerly, sized for `tokens` new tokens as in the
    timed runs, under `torch.profiler`. A method that stored nothing at all would run at most `1 / (1 - share)` times
    as fast as dense.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    profiler = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    settings = decode_settings(model, "static", inputs["input_ids"].shape[1] + tokens - 1, device)
    _, steps = timed_generate(model, inputs, min(PROFILED_STEPS, tokens), device, profiler=profiler, **settings)
    attention_us = sum(
        event.self_device_time_total if cuda else event.self_cpu_time_total
        for event in profiler.key_averages()
        if "scaled_dot_product" in event.key
    )
    return attention_us / 1e6 / sum(steps)


def slots_in_mask(mask) -> tuple[int, float]:
    """
    `(read, attended)` KV slots of one decode step's attention mask, summed over rows: read, the key slots the kernel
    is given for each row (an SDPA or eager mask's width: those kernels read every slot, masked or not; a FlexAttention
    block mask: the slots of the key blocks it visits); attended, the slots the mask lets the row's query see (the mean
    over heads for a per-head mask).
    """
    if hasattr(mask, "kv_num_blocks"):  # a FlexAttention BlockMask
        from torch.nn.attention.flex_attention import create_mask

        batch, heads = mask.kv_num_blocks.shape[:2]
        query_length, key_length = mask.seq_lengths
        blocks = mask.kv_num_blocks[:, :, 0] + (
            0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks[:, :, 0]
        )
        read = (blocks * mask.BLOCK_SIZE[1]).clamp(max=key_length).float().mean(1).sum()
        dense = create_mask(mask.mask_mod, batch, heads, query_length, key_length, device=blocks.device)
        return int(read), float(dense[:, :, -1].float().sum(-1).mean(1).sum())
    rows, key_length = mask.shape[0], mask.shape[-1]
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    visible = visible.reshape(rows, -1, key_length)  # [rows, heads or 1, keys], a single query
    return rows * key_length, float(visible.float().sum(-1).mean(1).sum())


def slots_per_decode_step(model, inputs, tokens: int, setup: str, device) -> tuple[float, float]:
    """
    KV slots a decode step's attention reads and attends to, summed over layers and rows (`slots_in_mask`), averaged
    over the steps of an eager greedy generation of `tokens` new tokens with the set-up's cache (`decode_settings`;
    a fixed one sized for this generation). Counted from the masks the decoder layers hand their attention modules;
    a compiled step takes the same masks.
    """
    per_step = []

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if kwargs.get("hidden_states", args[0] if args else None).shape[1] == 1:  # a decode step
            if mask is None:
                raise ValueError(f"{type(model).__name__} gave a decode step no attention mask: nothing to count")
            per_step[-1].append(slots_in_mask(mask))

    def new_step(module, args, kwargs):
        per_step.append([])

    attentions = [layer.self_attn for layer in model.model.language_model.layers]
    handles = [attention.register_forward_pre_hook(count, with_kwargs=True) for attention in attentions]
    handles.append(model.register_forward_pre_hook(new_step, with_kwargs=True))
    settings = decode_settings(
        model, "eager" if setup == "dynamic" else setup, inputs["input_ids"].shape[1] + tokens - 1, device
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **settings)
    finally:
        for handle in handles:
            handle.remove()
    steps = [step for step in per_step if step]
    return (
        sum(read for step in steps for read, _ in step) / len(steps),
        sum(attended for step in steps for _, attended in step) / len(steps),
    )


def compile_setup(name, model, inputs, tokens: int, device) -> None:
    """Compile a model's decode step by an untimed short generation (with the timed runs' cache size, so that they
    reuse the graph)."""
    batch, width = inputs["input_ids"].shape
    start = time.perf_counter()
    settings = decode_settings(model, "compiled", width + tokens - 1, device)
    timed_generate(model, inputs, min(3, tokens), device, **settings)  # no more tokens than the cache holds
    print(f"  {name}: compiled for batch {batch} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def measure_setups(models, runs: list[tuple[str, str]], inputs, tokens: int, repeats: int, device) -> dict:
    """
    Decode tokens/s of each (model, set-up) in `runs`, and its last output. The repeats go round all the runs in
    turn, so that a machine whose speed drifts (a shared one) slows every run alike; compiled set-ups are compiled
    before any is timed.
    """
    batch, width = inputs["input_ids"].shape
    for name, setup in runs:
        if setup == "compiled":
            compile_setup(name, models[name], inputs, tokens, device)
    graphs = counters["stats"]["unique_graphs"]
    step_times, outputs = {run: [] for run in runs}, {}
    for _ in range(repeats):
        for name, setup in runs:
            settings = decode_settings(models[name], setup, width + tokens - 1, device)
            outputs[name, setup], steps = timed_generate(models[name], inputs, tokens, device, **settings)
            step_times[name, setup].append(steps)
    if counters["stats"]["unique_graphs"] != graphs:
        print(f"  warning: a compiled model recompiled while decoding (batch {batch})", file=sys.stderr)
    measured = {}
    for name, setup in runs:
        rate = decode_rate(step_times[name, setup], batch)
        print(f"  {name}: batch {batch}, {setup}: {rate:.1f} tokens/s", file=sys.stderr, flush=True)
        measured[name, setup] = rate, outputs[name, setup]
    return measured


def measure_decode_speed(models, config, device, plan: dict) -> dict:
    """
    Decode tokens/s of every model in its set-ups (`plan["compiled"]`: the models compiled at each batch) at each
    batch, the KV-cache bytes per row they took (for the budget), and the sequences generated at batch 1.
    """
    results = {name: {} for name in models}
    for batch in plan["batches"]:
        inputs, tokens = make_inputs(config, device, batch), plan["tokens"][batch]
        runs = []
        for name, model in models.items():
            if hasattr(model, "output_text_score_predictor"):
                # Calibrated on these rows and this length, so that every batch keeps about half of its output.
                force_output_keep_rate(model, inputs, tokens=tokens)
            compiled = name in plan["compiled"].get(batch, ())
            for setup in setups_of(name):
                if setup == "compiled" and not compiled:
                    continue
                if setup == "dynamic" and batch not in plan["dynamic_cache_batches"]:
                    continue
                # The fixed-capacity cache eagerly: what its compiled step is compared with.
                if setup == "static" and name != "dense" and not (plan["fixed_eager"] or compiled):
                    continue
                runs.append((name, setup))
        measured = measure_setups(models, runs, inputs, tokens, plan["decode_repeats"], device)
        for (name, setup), (rate, output) in measured.items():
            cache = getattr(output, CACHE_NAME)
            results[name][f"decode_tps_b{batch}_{setup}"] = rate
            results[name][f"kv_bytes_per_row_b{batch}_{setup}"] = kv_bytes(cache) / batch
            results[name].update(keep_rates(cache, f"b{batch}_{setup}"))
            if batch == 1 and setup in ("dynamic", "eager"):
                # The default cache at batch 1 is what the KV bytes after N new tokens are measured on, too.
                results[name]["sequence"] = output.sequences
                results[name][f"kv_bytes_{tokens}"] = kv_bytes(cache)
                results[name].update(keep_rates(cache, str(tokens)))
        if batch in plan["attention_share_batches"]:
            for name, model in models.items():
                results[name][f"attention_share_b{batch}"] = attention_share(model, inputs, tokens, device)
        if batch in plan["slot_count_batches"]:
            for name, model in models.items():
                for setup in ("static",) if name == "dense" else ("eager", "static"):
                    read, attended = slots_per_decode_step(model, inputs, tokens, setup, device)
                    results[name][f"slots_read_b{batch}_{setup}"] = read
                    results[name][f"slots_attended_b{batch}_{setup}"] = attended
    return results


def measure_kv_budget(models, config, device, plan: dict, speeds: dict) -> dict:
    """
    Throughput within a KV-cache budget, dense LLaVA's StaticCache of `BUDGET_BATCH` rows: the largest batch each
    model fits (its bytes per row as measured at the largest batch above, rows of different prompts; a method's
    default growing cache, counted as allocated) and its decode tokens/s there, over that batch's number of new tokens.
    For the fixed-capacity cache, whose size is known before decoding, the largest batch only.
    """
    widest = max(plan["batches"])
    tokens, repeats = plan["tokens"][widest], plan["kv_budget_repeats"]
    budget = BUDGET_BATCH * speeds["dense"][f"kv_bytes_per_row_b{widest}_static"]
    results = {}
    for name, model in models.items():
        setup = "static" if name == "dense" else "eager"
        batch = int(budget // speeds[name][f"kv_bytes_per_row_b{widest}_{setup}"])
        while batch >= 1:
            inputs = make_inputs(config, device, batch)
            rate, output = measure_setups(models, [(name, setup)], inputs, tokens, repeats, device)[name, setup]
            used = kv_bytes(getattr(output, CACHE_NAME))
            if used <= budget:
                break
            print(f"  {name}: {used} bytes at batch {batch} exceed the budget of {budget:.0f}", file=sys.stderr)
            batch -= 1
        results[name] = {"kv_budget_batch": batch, "kv_budget_tps": rate, "kv_budget_bytes": used}
        if name != "dense":
            # A fixed-capacity cache's size is known after the prefill: one row of it.
            single = make_inputs(config, device)
            cache = model.new_cache(max_cache_len=single["input_ids"].shape[1] + tokens - 1)
            with torch.no_grad():
                model(**single, cache=cache, use_cache=True, logits_to_keep=1)
            results[name]["kv_budget_batch_fixed"] = int(budget // kv_bytes(cache))
    return results


def no_cache_step_flops(model, inputs, sequence) -> int:
    """FLOPs of one decode step without a cache, as `generate(use_cache=False)` runs it: the whole sequence so far
    (prompt and generated tokens), only the last position's logits."""
    step = {
        "input_ids": sequence[:, :-1],
        "attention_mask": torch.ones_like(sequence[:, :-1]),
        "pixel_values": inputs["pixel_values"],
        "use_cache": False,
        "logits_to_keep": 1,
    }
    if isinstance(model, SparseLlavaForConditionalGeneration):
        step["output_token_start"] = inputs["input_ids"].shape[1]
    with torch.no_grad(), flop_counter() as counter:
        model(**step)
    return counter.get_total_flops()


def decode_trace(model, inputs, tokens: int) -> dict:
    """Per generated token: KV bytes the cache holds, and cumulative decode FLOPs (for the plot)."""
    steps = {"kv_bytes": [], "decode_flops": []}
    counter = flop_counter()
    prefill_flops = 0

    def after_forward(module, args, kwargs, output):
        nonlocal prefill_flops
        if kwargs["input_ids"].shape[1] > 1:  # the prompt
            prefill_flops = counter.get_total_flops()
            return
        steps["kv_bytes"].append(kv_bytes(getattr(output, CACHE_NAME), stored_only=True))
        steps["decode_flops"].append(counter.get_total_flops() - prefill_flops)

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        with torch.no_grad(), counter:
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    finally:
        handle.remove()
    return steps


def plot(traces: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'sparse-llava[plot]'") from None
    figure, (kv_axis, flops_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, trace in traces.items():
        steps = range(1, len(trace["kv_bytes"]) + 1)
        kv_axis.plot(steps, [value / 2**20 for value in trace["kv_bytes"]], label=name)
        flops_axis.plot(steps, [value / 1e12 for value in trace["decode_flops"]], label=name)
    kv_axis.set(xlabel="output tokens", ylabel="KV cache (MiB)", title="KV-cache memory")
    flops_axis.set(xlabel="output tokens", ylabel="TFLOPs", title="Cumulative decode FLOPs")
    for axis in (kv_axis, flops_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("LLaVA-1.5-shaped model (hidden 1024, 16 layers, 576 image tokens), against dense LLaVA")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def decode_plan(args) -> dict:
    """What the decode-speed part measures: new tokens per batch, which models are compiled at which batch, whether
    the fixed-capacity cache is timed eagerly for every model (it always is for the compiled ones), the batches dense
    LLaVA's DynamicCache is timed at, those the attention share of a step is profiled at, and the timed repeats of the
    decode-speed and KV-budget runs."""
    if args.no_compile:
        compiled = {}
    elif args.quick:
        compiled = {1: ("dense", "dynamic-llava")}  # compiling takes about a minute a model on 2 cores
    else:
        compiled = {1: METHODS, 8: METHODS}
    # Two repeats in turn even with --quick: timed once, one set-up after the other, a drifting machine moved the
    # batch-1 ratios by 5-15%.
    decode_repeats = args.decode_repeats or 2
    return {
        "tokens": {
            1: args.decode_tokens or (32 if args.quick else 1024),
            8: args.batch_decode_tokens or (32 if args.quick else 256),
        },
        # --quick: batch 1 only. Over its 32 new tokens a batch-8 run mostly timed its prefill (about 10 s a model on 2
        # cores), and the KV-budget runs decode 4 to 11 rows anyway.
        "batches": tuple(sorted(args.batches or ([1] if args.quick else [1, 8]))),
        "compiled": compiled,
        "fixed_eager": not args.quick,
        # A batch-8 prefill takes about 10 s a model on 2 cores.
        "attention_share_batches": (1,) if args.quick else (1, 8),
        "dynamic_cache_batches": (1,) if args.quick else (1, 8),
        # One more eager generation per model and cache: the KV slots its steps read and attend to.
        "slot_count_batches": (1,) if args.quick else (1, 8),
        "decode_repeats": decode_repeats,
        # Timed generations of each KV-budget run (4 to 11 rows; with --quick, most of a run is its prefill).
        "kv_budget_repeats": 1 if args.quick else decode_repeats,
    }


def decode_ratios(absolute: dict, plan: dict) -> dict:
    """
    Per model and batch, decode tokens/s against dense LLaVA with a StaticCache in the same run: eager against eager
    (the method's default cache; dense: its DynamicCache), the fixed-capacity cache eagerly, compiled against dense
    compiled, and compiled against the same cache eagerly (dense: its StaticCache; the methods: the fixed-capacity
    cache), next to the share of a step spent in attention (`attention_share`) and the KV slots a step reads and attends
    to (`slots_per_decode_step`) with the default and the fixed-capacity cache, against dense's StaticCache; then the
    KV-budget batch and tokens/s
    against dense's, and the FLOPs of a no-cache decode step against dense's.
    """
    dense = absolute["dense"]
    ratios = {}
    for name, values in absolute.items():
        default = "dynamic" if name == "dense" else "eager"
        row = {}
        for batch in plan["batches"]:

            def tps(setup, values=values, batch=batch):
                return values.get(f"decode_tps_b{batch}_{setup}")

            def over(numerator, denominator):
                return None if numerator is None or denominator is None else numerator / denominator

            baseline = dense[f"decode_tps_b{batch}_static"]
            row[f"b{batch}_eager"] = over(tps(default), baseline)
            row[f"b{batch}_fixed"] = over(tps("static"), baseline)
            row[f"b{batch}_compiled"] = over(tps("compiled"), dense.get(f"decode_tps_b{batch}_compiled"))
            row[f"b{batch}_compiled_vs_eager"] = over(tps("compiled"), tps("static"))
            row[f"b{batch}_attention_share"] = values.get(f"attention_share_b{batch}")
            for kind in ("read", "attended"):
                dense_slots = dense.get(f"slots_{kind}_b{batch}_static")
                row[f"b{batch}_slots_{kind}_eager"] = over(values.get(f"slots_{kind}_b{batch}_eager"), dense_slots)
                row[f"b{batch}_slots_{kind}_fixed"] = over(values.get(f"slots_{kind}_b{batch}_static"), dense_slots)
        if "kv_budget_batch" in values:
            row["kv_budget_batch"] = values["kv_budget_batch"] / dense["kv_budget_batch"]
            row["kv_budget_batch_fixed"] = (
                values["kv_budget_batch_fixed"] / dense["kv_budget_batch"]
                if "kv_budget_batch_fixed" in values
                else None
            )
            row["kv_budget_tps"] = values["kv_budget_tps"] / dense["kv_budget_tps"]
        if "no_cache_step_flops" in values:
            row["no_cache_step_flops"] = values["no_cache_step_flops"] / dense["no_cache_step_flops"]
        ratios[name] = row
    return ratios


def print_table(title: str, rows: dict, keys: list[str]) -> None:
    print(title)
    widths = [max(10, len(key)) + 2 for key in keys]
    print(f"{'method':<16}" + "".join(f"{key:>{width}}" for key, width in zip(keys, widths)))
    for name, values in rows.items():
        cells = ["-" if values.get(key) is None else f"{values[key]:.2f}" for key in keys]
        print(f"{name:<16}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: KV bytes, decode speed (batch 1 only), KV budget and peak memory over 32 new tokens, 1 timed "
        "prefill, dense and Dynamic-LLaVA compiled, the LLaVA-NeXT shape without peak memory",
    )
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None, help="KV bytes after these many tokens")
    parser.add_argument("--decode-tokens", type=int, default=None, help="new tokens of the batch-1 decode-speed runs")
    parser.add_argument(
        "--batch-decode-tokens", type=int, default=None, help="new tokens of the batch-8 and KV-budget decode runs"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed prefills (default 5; --quick: 1)")
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=None,
        help="timed generations of each decode set-up, taken in turn (default 2)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        choices=(1, 8),
        default=None,
        help="the decode-speed batches (default 1 8; --quick: 1)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled set-ups")
    parser.add_argument("--no-kv-budget", action="store_true", help="leave out the throughput within a KV budget")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="only the decode part (speed, KV budget, no-cache FLOPs) on the LLaVA-1.5 shape: no prefill, KV-bytes or "
        "peak-memory measurements, no LLaVA-NeXT shape",
    )
    parser.add_argument(
        "--models", nargs="+", choices=METHODS[1:], default=None, help="the methods to measure (dense always is)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--plot", default=None, help="draw KV bytes and decode FLOPs against output tokens here")
    parser.add_argument("--peak-memory-of", nargs=3, metavar=("SHAPE", "MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:  # the child process of `peak_memory`
        shape, name, tokens = args.peak_memory_of
        peak_memory_child(shape, name, int(tokens), args.device)
        return
    new_tokens = args.new_tokens or ([32] if args.quick else [256, 1024])
    repeats = args.repeats or (1 if args.quick else 5)
    plan = decode_plan(args)
    if min(plan["tokens"].values()) < 2:
        # The first new token comes from the prefill; a decode step is timed from the second on.
        parser.error("--decode-tokens and --batch-decode-tokens must be at least 2")
    # The batch-1 decode-speed run of each model's default cache gives the KV bytes after its own length.
    kv_only_tokens = [count for count in new_tokens if 1 not in plan["batches"] or count != plan["tokens"][1]]
    longest = max(new_tokens)
    peak_tokens = min(32, longest) if args.quick else longest

    names = ("dense", *(args.models or METHODS[1:]))
    absolute, traces = {name: {} for name in names}, {}
    for shape in ("llava-1.5",) if args.decode_only else ("llava-1.5", "llava-next"):
        config = base_config(shape)
        models = build_models(shape, args.device, names)
        inputs = make_inputs(config, args.device)
        prefix = "" if shape == "llava-1.5" else "next_"
        for name, model in models.items():
            if args.decode_only:
                break
            print(f"measuring {name} ({shape})", file=sys.stderr, flush=True)
            values = absolute[name]
            values.update(
                {prefix + key: value for key, value in measure_prefill(model, inputs, repeats, args.device).items()}
            )
            if shape == "llava-1.5":
                values.update(measure_decode(name, model, inputs, kv_only_tokens, args.device))
                if args.plot:
                    traces[name] = decode_trace(model, inputs, longest)
        if shape == "llava-1.5":
            print(f"decode speed (new tokens per batch: {plan['tokens']})", file=sys.stderr, flush=True)
            speeds = measure_decode_speed(models, config, args.device, plan)
            budget = (
                {name: {} for name in models}
                if args.no_kv_budget
                else measure_kv_budget(models, config, args.device, plan, speeds)
            )
            for name, model in models.items():
                sequence = speeds[name].pop("sequence", None)  # generated at batch 1
                absolute[name].update(speeds[name], **budget[name])
                if sequence is not None:
                    absolute[name]["no_cache_step_flops"] = no_cache_step_flops(model, inputs, sequence)
        del models
        if (args.quick and shape != "llava-1.5") or args.decode_only:
            continue
        tokens = peak_tokens if shape == "llava-1.5" else 0
        for name in names:
            memory = peak_memory(shape, name, tokens, args.device)
            absolute[name].update({prefix + key: value for key, value in memory.items()})

    dense = absolute["dense"]
    ratio_keys = [
        "prefill_flops",
        "prefill_time",
        "kv_bytes_prefill",
        "kv_vision_bytes_prefill",
        *[f"kv_bytes_{n}" for n in new_tokens],
        "peak_memory",
        "peak_memory_above_model",
        "next_prefill_flops",
        "next_prefill_time",
        "next_kv_bytes_prefill",
        "next_kv_vision_bytes_prefill",
        "next_peak_memory",
        "next_peak_memory_above_model",
    ]
    ratios = (
        {}
        if args.decode_only
        else {
            name: {
                **{key: values[key] / dense[key] if dense.get(key) else None for key in ratio_keys},
                "kv_bytes_long": values[f"kv_bytes_{longest}"] / dense[f"kv_bytes_{longest}"],
            }
            for name, values in absolute.items()
        }
    )
    decode = decode_ratios(absolute, plan)

    if not args.decode_only:
        print_table(
            f"\nratios against dense LLaVA (dense = 1.00); peak memory over a prefill and {peak_tokens} new tokens "
            "(LLaVA-NeXT shape: prefill only)",
            ratios,
            ratio_keys,
        )
    print_table(
        f"\ndecode (new tokens per batch: {plan['tokens']}) against dense LLaVA with a StaticCache (eager: the method's default "
        "cache, dense's DynamicCache; fixed: the fixed-capacity cache, eager; compiled: against dense compiled; "
        f"compiled_vs_eager: against the same cache eagerly; attention_share: the fraction of a step in attention, not "
        f"a ratio; slots_read / slots_attended: KV slots a step's attention reads / attends to, summed over layers and "
        f"rows, against dense's StaticCache; KV budget: {BUDGET_BATCH} rows of dense's StaticCache)",
        decode,
        list(next(iter(decode.values()))),
    )
    print("\nabsolute values")
    for name, values in absolute.items():
        shown = ", ".join(f"{key}={value:.3g}" for key, value in values.items())
        print(f"{name:<16}{shown}")

    machine = {
        "device": args.device,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    if args.json:
        results = {"methods": ratios, "decode": decode, "plan": plan, "absolute": absolute, "machine": machine}
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(traces, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
