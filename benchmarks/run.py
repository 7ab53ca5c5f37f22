"""Cost of sparse-llava models against transformers' dense LLaVA, measured in one run.

    python benchmarks/run.py [--quick] [--json results.json] [--device cpu|cuda] [--new-tokens 256 1024 4096]

All models share the same random weights: a mid-size LLaVA-1.5-shaped model (hidden 1024, 16 decoder layers, one
336 px image = 576 image tokens; the vision tower is kept small so that the language model, which the methods act
on, dominates). For each method it measures

* prefill FLOPs (`torch.utils.flop_counter`) and prefill wall time (median of repeats after a warm-up);
* the KV-cache bytes after prefill and after N new tokens (`--new-tokens`), and decode tokens/s with the cache.

Untrained predictors would make arbitrary decisions, so the decisions are forced to the paper's keep rates:
* Dynamic-LLaVA's image predictor keeps its top `floor(0.2 n)` image tokens whatever its weights (a fixed count);
  its output-text predictor is given a bias on the keep logit, calibrated on untimed generations of the measured
  length so that it keeps about half of the generated tokens (the paper's r^OT = 0.5); the measured keep rate is
  reported (`output_keep_rate_N`);
* p-MoD layers keep `floor(n R_l)` vision tokens whatever the routers' weights (the progressive schedule);
* YOPO runs its 12% preset (5 x 5 window, vision tokens in the first quarter of the layers, half the FFN neurons)
  with half the heads (the first half, a stand-in for a calibrated mask) pruned for vision tokens from layer 2 on,
  the layers the reference never prunes being 0 and 1.

Ratios are against dense LLaVA in the same run (dense = 1.00). Nothing here is asserted: timings are for reading.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration

from sparse_llava.flops import flop_counter

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
from sparse_llava.configuration_yopo import preset_settings  # noqa: E402

IMAGE_TOKEN_ID = 32000


def base_config(num_layers: int = 16) -> LlavaConfig:
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=num_layers,
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
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1
    )


def make_inputs(device) -> dict:
    generator = torch.Generator().manual_seed(0)
    # A short LLaVA-1.5-style prompt: system text, the image, the question.
    before, after = torch.randint(100, 30000, (1, 12), generator=generator), torch.randint(100, 30000, (1, 12))
    input_ids = torch.cat([before, torch.full((1, 576), IMAGE_TOKEN_ID), after], dim=1)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=generator).to(device),
    }


def build_models(device) -> dict:
    """Dense LLaVA and each method, all with the dense model's weights (the methods' new modules freshly made)."""
    torch.manual_seed(0)
    config = base_config()
    dense = LlavaForConditionalGeneration(config).eval()
    # The paper's predictors (width 512) sit on a 4096-wide LLM; scale them with the model (1024 / 8 = 128) so that
    # their share of the cost is the paper's, not four times it.
    dynamic_config = DynamicLlavaConfig.from_base_config(
        config, predictor_hidden_size=128, predictor_intermediate_size=512, predictor_num_heads=8
    )
    models = {
        "dense": dense,
        # The training-free baseline the papers compare against (benchmarks/fastv.py): layer 2, 50% of image tokens.
        "fastv": FastVLlava(SparseLlavaConfig.from_base_config(config)),
        "dynamic-llava": DynamicLlavaForConditionalGeneration(dynamic_config),
        # Zero-initialised routers: every layer keeps exactly floor(n * R_l) vision tokens whatever the weights.
        "p-mod": PMoDLlavaForConditionalGeneration(PMoDConfig.from_base_config(config)),
        "yopo": YopoLlavaForConditionalGeneration(yopo_config(config, "12%")),
    }
    for name, model in models.items():
        if model is not dense:
            missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
            assert not unexpected and all(key.startswith(model.new_module_names) for key in missing), name
        model.eval().to(device)
        model.generation_config.pad_token_id = 0
    return models


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


def kv_bytes(cache) -> int:
    if isinstance(cache, DynamicCache):
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return cache.allocated_bytes()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(name, model, inputs, new_tokens, repeats, device) -> dict:
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
        result["kv_bytes_prefill"] = kv_bytes(model(**inputs, use_cache=True, logits_to_keep=1).past_key_values)
    for count in new_tokens:
        if hasattr(model, "output_text_score_predictor"):
            force_output_keep_rate(model, inputs, tokens=count)
        synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, return_dict_in_generate=True
        )
        synchronize(device)
        elapsed = time.perf_counter() - start
        result[f"kv_bytes_{count}"] = kv_bytes(output.past_key_values)
        result[f"decode_tps_{count}"] = (count - 1) / max(elapsed - result["prefill_time"], 1e-9)
        if hasattr(output.past_key_values, "sparsity_report"):
            last = output.past_key_values.sparsity_report()[-1]
            result[f"output_keep_rate_{count}"] = last["output_text_kept"][0] / max(last["output_text_seen"][0], 1)
            result[f"image_keep_rate_{count}"] = last["image_kept"][0] / max(last["image_seen"][0], 1)
        print(f"  {name}: {count} new tokens in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: 256 new tokens, 3 repeats")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    new_tokens = args.new_tokens or ([256] if args.quick else [256, 1024, 4096])
    repeats = args.repeats or (3 if args.quick else 5)

    inputs = make_inputs(args.device)
    models = build_models(args.device)

    absolute = {}
    for name, model in models.items():
        print(f"measuring {name}", file=sys.stderr, flush=True)
        absolute[name] = measure(name, model, inputs, new_tokens, repeats, args.device)

    longest = max(new_tokens)
    dense = absolute["dense"]
    ratios = {}
    for name, values in absolute.items():
        ratios[name] = {
            "prefill_flops": values["prefill_flops"] / dense["prefill_flops"],
            "prefill_time": values["prefill_time"] / dense["prefill_time"],
            "kv_bytes_prefill": values["kv_bytes_prefill"] / dense["kv_bytes_prefill"],
            "kv_bytes_long": values[f"kv_bytes_{longest}"] / dense[f"kv_bytes_{longest}"],
            "decode_tps": values[f"decode_tps_{longest}"] / dense[f"decode_tps_{longest}"],
            **{f"kv_bytes_{n}": values[f"kv_bytes_{n}"] / dense[f"kv_bytes_{n}"] for n in new_tokens},
        }

    columns = [
        "prefill_flops",
        "prefill_time",
        "kv_bytes_prefill",
        *[f"kv_bytes_{n}" for n in new_tokens],
        "decode_tps",
    ]
    print(f"\nratios against dense LLaVA (dense = 1.00); decode_tps and kv_bytes_long at {longest} new tokens")
    print(f"{'method':<16}" + "".join(f"{column:>18}" for column in columns))
    for name, values in ratios.items():
        print(f"{name:<16}" + "".join(f"{values[column]:>18.2f}" for column in columns))
    print("\nabsolute values")
    for name, values in absolute.items():
        shown = ", ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()
        )
        print(f"{name:<16}{shown}")

    machine = {
        "device": args.device,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"methods": ratios, "absolute": absolute, "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
