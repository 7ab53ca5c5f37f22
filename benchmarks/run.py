"""Cost of sparse-llava models against transformers' dense LLaVA, measured in one run.

    python benchmarks/run.py [--quick] [--json results.json] [--plot figure.png] [--device cpu|cuda]
                             [--new-tokens 256 1024 4096]

All models of a shape share the same random weights. Two mid-size shapes (hidden 1024; the vision tower is kept small
so that the language model, which the methods act on, dominates):

* LLaVA-1.5-shaped: 16 decoder layers, one 336 px image = 576 image tokens, 24 text tokens;
* LLaVA-NeXT-shaped: 8 decoder layers, one 672 x 672 image = 2,928 image tokens (base tile, 2 x 2 tiles, newlines).

For each method it measures, on the LLaVA-1.5 shape,

* prefill FLOPs (`torch.utils.flop_counter`, attention included on CPU too) and prefill wall time (median of repeats
  after a warm-up);
* the KV-cache bytes after prefill (all, and the image tokens' part) and after N new tokens (`--new-tokens`), and
  decode tokens/s with the cache;
* peak memory, each model in a fresh process (so that no other model counts): built, one prefill, then a generation
  of the longest N (`--quick`: 32) tokens; on CPU the peak resident set, on CUDA the allocator's peak; also the part
  above what the process held once the model was built (`peak_memory_above_model`);

and prefill FLOPs, prefill time, KV after prefill and peak memory on the LLaVA-NeXT shape (`next_*`). `--plot` draws
KV-cache bytes and cumulative decode FLOPs against output tokens for every method (needs matplotlib:
`pip install sparse-llava[plot]`).

Untrained predictors would make arbitrary decisions, so the decisions are forced to the paper's keep rates:
* Dynamic-LLaVA's image predictor keeps its top `floor(0.2 n)` image tokens whatever its weights (a fixed count);
  its output-text predictor is given a bias on the keep logit, calibrated on untimed generations of the measured
  length so that it keeps about half of the generated tokens (the paper's r^OT = 0.5); the measured keep rate is
  reported (`output_keep_rate_N`);
* p-MoD layers keep `trunc(n R_l)` vision tokens whatever the routers' weights (the progressive schedule);
* YOPO runs its 12% preset (5 x 5 window, vision tokens in the first quarter of the layers, half the FFN neurons);
  from layer 2 on (the reference never prunes layers 0 and 1) only the first half of the heads keep working on
  vision tokens, a stand-in for a calibrated mask.

Ratios are against dense LLaVA in the same run (dense = 1.00). Nothing here is asserted: timings are for reading.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (
    DynamicCache,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
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
from sparse_llava.compat_transformers import CACHE_NAME  # noqa: E402
from sparse_llava.configuration_yopo import preset_settings  # noqa: E402
from sparse_llava.flops import flop_counter  # noqa: E402

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


def make_inputs(config, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    # A short LLaVA-1.5-style prompt: system text, the image, the question.
    before, after = torch.randint(100, 30000, (1, 12), generator=generator), torch.randint(100, 30000, (1, 12))
    input_ids = torch.cat([before, torch.full((1, image_tokens(config)), IMAGE_TOKEN_ID), after], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if config.model_type == "llava":
        inputs["pixel_values"] = torch.randn(1, 3, 336, 336, generator=generator)
    else:
        inputs["pixel_values"] = torch.randn(1, 5, 3, 336, 336, generator=generator)
        inputs["image_sizes"] = torch.tensor([NEXT_IMAGE_SIZE])
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


def build_models(shape, device) -> dict:
    """Dense LLaVA and each method, all with the dense model's weights (the methods' new modules freshly made)."""
    torch.manual_seed(0)
    config = base_config(shape)
    models = {name: build_model(name, config) for name in METHODS}
    dense = models["dense"]
    for name, model in models.items():
        if model is not dense:
            missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
            assert not unexpected and all(key.startswith(model.new_module_names) for key in missing), name
        model.eval().to(device)
        model.generation_config.pad_token_id = 0
    return models


def force_output_keep_rate(model, inputs, tokens: int, rate: float = 0.5, rounds: int = 2) -> None:
    """
    Bias the keep logit so that about `rate` of `tokens` generated tokens are kept (see module docstring). The
    decisions change the hidden states of later tokens, and a random model's hidden states drift over long outputs,
    so the bias is refined over a few generations of the length that is then measured.
    """
    margins = []
    handle = model.output_text_score_predictor.register_forward_hook(
        lambda module, args, logits: margins.append((logits[..., 0] - logits[..., 1]).flatten())
    )
    for _ in range(rounds):
        margins.clear()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        threshold = torch.quantile(torch.cat(margins).float(), 1 - rate)
        with torch.no_grad():
            model.output_text_score_predictor.output_mlp[-1].bias[0] -= threshold
    handle.remove()


def kv_bytes(cache, stored_only: bool = False) -> int:
    """Bytes of the KV cache as allocated (`stored_only`: of the tokens it holds, leaving out unused capacity)."""
    if isinstance(cache, DynamicCache):
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return cache.memory_bytes() if stored_only else cache.allocated_bytes()


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
        with flop_counter() as counter:
            model(**inputs, use_cache=True, logits_to_keep=1)
        result["prefill_flops"] = counter.get_total_flops()
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            synchronize(device)
            times.append(time.perf_counter() - start)
        result["prefill_time"] = statistics.median(times[1:])
        cache = getattr(model(**inputs, use_cache=True, logits_to_keep=1), CACHE_NAME)
        result["kv_bytes_prefill"] = kv_bytes(cache)
        result["kv_vision_bytes_prefill"] = vision_kv_bytes(cache, inputs)
    return result


def vision_kv_bytes(cache, inputs) -> int:
    """Bytes of the image tokens' keys and values in the cache (dense LLaVA keeps every image token in every layer)."""
    if isinstance(cache, DynamicCache):
        image_tokens = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
        return sum(image_tokens * layer.keys[0, :, 0].numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return sum(
        int(cache.stored_image_tokens(layer_idx).sum()) * layer.slot_bytes()
        for layer_idx, layer in enumerate(cache.layers)
    )


def measure_decode(name, model, inputs, new_tokens, device) -> dict:
    result = {}
    for count in new_tokens:
        if hasattr(model, "output_text_score_predictor"):
            force_output_keep_rate(model, inputs, tokens=count)
        prefill_end = []

        def mark_prefill_end(module, args, output, prefill_end=prefill_end):
            if not prefill_end:
                synchronize(device)
                prefill_end.append(time.perf_counter())

        handle = model.register_forward_hook(mark_prefill_end)
        try:
            start = time.perf_counter()
            output = model.generate(
                **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, return_dict_in_generate=True
            )
            synchronize(device)
            elapsed = time.perf_counter() - start
        finally:
            handle.remove()
        result[f"kv_bytes_{count}"] = kv_bytes(getattr(output, CACHE_NAME))
        # Tokens after the first (which the prefill produces) over the time after the prefill.
        result[f"decode_tps_{count}"] = (count - 1) / (start + elapsed - prefill_end[0])
        if hasattr(getattr(output, CACHE_NAME), "sparsity_report"):
            last = getattr(output, CACHE_NAME).sparsity_report()[-1]
            result[f"output_keep_rate_{count}"] = last["output_text_kept"][0] / max(last["output_text_seen"][0], 1)
            result[f"image_keep_rate_{count}"] = last["image_kept"][0] / max(last["image_seen"][0], 1)
        print(f"  {name}: {count} new tokens in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: 256 new tokens, 1 timed repeat, peak memory over 32 tokens"
    )
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--plot", default=None, help="draw KV bytes and decode FLOPs against output tokens here")
    parser.add_argument("--peak-memory-of", nargs=3, metavar=("SHAPE", "MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_of:  # the child process of `peak_memory`
        shape, name, tokens = args.peak_memory_of
        peak_memory_child(shape, name, int(tokens), args.device)
        return
    new_tokens = args.new_tokens or ([256] if args.quick else [256, 1024, 4096])
    repeats = args.repeats or (1 if args.quick else 5)
    longest = max(new_tokens)
    peak_tokens = min(32, longest) if args.quick else longest

    absolute, traces = {}, {}
    for shape in ("llava-1.5", "llava-next"):
        models = build_models(shape, args.device)
        inputs = make_inputs(base_config(shape), args.device)
        prefix = "" if shape == "llava-1.5" else "next_"
        for name, model in models.items():
            print(f"measuring {name} ({shape})", file=sys.stderr, flush=True)
            values = absolute.setdefault(name, {})
            values.update(
                {prefix + key: value for key, value in measure_prefill(model, inputs, repeats, args.device).items()}
            )
            if shape == "llava-1.5":
                values.update(measure_decode(name, model, inputs, new_tokens, args.device))
                values["decode_tps"] = values[f"decode_tps_{longest}"]
                if args.plot:
                    traces[name] = decode_trace(model, inputs, longest)
        del models
        for name in METHODS:
            tokens = peak_tokens if shape == "llava-1.5" else 0
            memory = peak_memory(shape, name, tokens, args.device)
            absolute[name].update({prefix + key: value for key, value in memory.items()})

    dense = absolute["dense"]
    ratio_keys = [
        "prefill_flops",
        "prefill_time",
        "kv_bytes_prefill",
        "kv_vision_bytes_prefill",
        *[f"kv_bytes_{n}" for n in new_tokens],
        "decode_tps",
        "peak_memory",
        "peak_memory_above_model",
        "next_prefill_flops",
        "next_prefill_time",
        "next_kv_bytes_prefill",
        "next_kv_vision_bytes_prefill",
        "next_peak_memory",
        "next_peak_memory_above_model",
    ]
    ratios = {
        name: {
            **{key: values[key] / dense[key] if dense[key] else None for key in ratio_keys},
            "kv_bytes_long": values[f"kv_bytes_{longest}"] / dense[f"kv_bytes_{longest}"],
        }
        for name, values in absolute.items()
    }

    print(
        f"\nratios against dense LLaVA (dense = 1.00); decode_tps at {longest} new tokens, peak memory over a prefill and"
        f" {peak_tokens} new tokens (LLaVA-NeXT shape: prefill only)"
    )
    widths = [max(10, len(key)) + 2 for key in ratio_keys]
    print(f"{'method':<16}" + "".join(f"{key:>{width}}" for key, width in zip(ratio_keys, widths)))
    for name, values in ratios.items():
        cells = ["-" if values[key] is None else f"{values[key]:.2f}" for key in ratio_keys]
        print(f"{name:<16}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))
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
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"methods": ratios, "absolute": absolute, "machine": machine}, indent=2))
    if args.plot:
        plot(traces, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
