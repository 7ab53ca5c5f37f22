"""Calibrate YOPO's `vision_head_mask` from a few samples, with the reference's rule, and write it into a model folder.

    python conversion/calibrate_yopo.py --model out/yopo --images a.jpg b.jpg ... --prompts "What is shown?" ... \
        [--keep-fraction 0.5 | --alpha 0.08] [--vote 0.4] [--trust-remote-code]

For each sample, layer and head, the ratio of the attention mass on vision keys to the mass on all other keys is
measured in the dense model (transformers' LLaVA with the folder's weights, eager attention) on the query row of the
last prompt token, the row that produces the first answer token (the reference does not publish which rows its LLaVA
masks used; its Qwen2-VL collector reads the first generated token's row, which this is the prefill equivalent of). A head is active for a sample when its ratio exceeds
`alpha`; it keeps working on vision tokens when it is active in more than `vote` of the samples (the reference: more
than 40 of 100). The first two layers keep every head. `--keep-fraction` picks `alpha` so that the mean number of heads
kept per layer is that fraction of the heads (the YOPO presets use 0.5). The mask goes into the folder's
`config.json` (keeping the file's mode), and the heads kept per layer are printed. The folder is read with the installed
sparse-llava and transformers classes; its own code runs only with `--trust-remote-code`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sparse_llava.compat_transformers import dtype_argument  # noqa: E402
from sparse_llava.configuration_yopo import YopoConfig  # noqa: E402

ALWAYS_KEPT_LAYERS = 2  # the reference never prunes heads in layers 0 and 1


class CalibrationError(ValueError):
    """Bad input for a calibration (the message names the problem)."""


def yopo_config(model_dir: str, trust_remote_code: bool = False):
    """
    The folder's YOPO config: read with the installed sparse-llava class, or with `trust_remote_code` through the
    folder's own code (its `auto_map`), which then runs.
    """
    from transformers import AutoConfig

    if trust_remote_code:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        model_type = getattr(config, "model_type", None)
    else:
        model_type = YopoConfig.get_config_dict(model_dir)[0].get("model_type")
        config = YopoConfig.from_pretrained(model_dir) if model_type == "yopo_llava" else None
    if model_type != "yopo_llava":
        raise CalibrationError(f"{model_dir} is not a YOPO model (model_type {model_type!r})")
    return config


def dense_model(model_dir: str, trust_remote_code: bool = False):
    """transformers' own LLaVA / LLaVA-NeXT with the folder's weights, eager attention (to read attention maps)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    config = yopo_config(model_dir, trust_remote_code)
    base_fields = config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "base_model_type", "transformers_version"):
        base_fields.pop(key, None)
    if config.base_model_type == "llava_next":
        base_config, model_class = LlavaNextConfig(**base_fields), LlavaNextForConditionalGeneration
    else:
        base_fields.pop("image_grid_pinpoints", None)
        base_config, model_class = LlavaConfig(**base_fields), LlavaForConditionalGeneration
    # The reference rule reads transformers' own eager attention: no Hub kernels (5.25+ kernelizes by default).
    model = model_class.from_pretrained(
        model_dir, config=base_config, attn_implementation="eager", use_kernels=False, **dtype_argument("auto")
    )
    return model.eval(), config


@torch.no_grad()
def vision_attention_ratios(model, inputs) -> torch.Tensor:
    """`[layers, heads]`: attention mass of the last prompt token on vision keys over its mass on the other keys."""
    last_rows = []

    def keep_last_row(module, args, output):  # eager attention returns (output, weights [1, heads, queries, keys])
        last_rows.append(output[1][0, :, -1, :].float())

    # Only each layer's last row is kept (full maps of every layer would not fit for LLaVA-NeXT-sized inputs).
    hooks = [layer.self_attn.register_forward_hook(keep_last_row) for layer in model.model.language_model.layers]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    is_image = (inputs["input_ids"][0] == model.config.image_token_id).float().to(last_rows[0].device)
    ratios = []
    for last_row in last_rows:
        vision = last_row @ is_image
        ratios.append(vision / (last_row.sum(-1) - vision).clamp(min=1e-12))
    return torch.stack(ratios).cpu()


def head_mask_from_ratios(ratios: torch.Tensor, alpha: float, vote: float) -> torch.Tensor:
    """`[layers, heads]` bool from per-sample ratios `[samples, layers, heads]` (reference rule, see module doc)."""
    active_count = (ratios > alpha).sum(0)
    mask = active_count > vote * ratios.shape[0]
    mask[:ALWAYS_KEPT_LAYERS] = True
    return mask


def alpha_for_keep_fraction(ratios: torch.Tensor, keep_fraction: float, vote: float) -> float:
    """The threshold whose mask keeps the mean number of heads per layer closest to `keep_fraction` of the heads."""
    candidates = torch.cat([ratios.flatten().unique(), torch.zeros(1)]).sort().values
    target = keep_fraction * ratios.shape[-1]

    def kept(alpha):
        return head_mask_from_ratios(ratios, float(alpha), vote).sum(-1).float().mean().item()

    low, high = 0, len(candidates) - 1  # kept() decreases as alpha grows
    while high - low > 1:
        middle = (low + high) // 2
        if kept(candidates[middle]) >= target:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda index: abs(kept(candidates[index]) - target))
    return float(candidates[best])


def sample_inputs(processor, image_paths: list[str], prompts: list[str]):
    from PIL import Image

    if len(prompts) not in (1, len(image_paths)):
        raise CalibrationError(f"give one prompt, or one per image ({len(image_paths)}); got {len(prompts)}")
    for image_path, prompt in zip(image_paths, prompts * len(image_paths) if len(prompts) == 1 else prompts):
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as error:
            raise CalibrationError(f"cannot read image {image_path!r}: {error}") from None
        if "<image>" in prompt:
            text = prompt
        elif getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:  # LLaVA-1.5's conversation format
            text = f"USER: <image>\n{prompt} ASSISTANT:"
        yield processor(images=image, text=text, return_tensors="pt")


def calibrate(
    model_dir,
    image_paths: list[str],
    prompts: list[str],
    alpha: float | None = None,
    keep_fraction: float | None = None,
    vote: float = 0.4,
    write: bool = True,
    trust_remote_code: bool = False,
) -> list[list[bool]]:
    """
    Compute `vision_head_mask` for the YOPO folder `model_dir` and (with `write`) store it in its config.json. The
    folder's code runs only with `trust_remote_code`; otherwise the installed sparse-llava and transformers classes
    read it.
    """
    from transformers import AutoProcessor

    if (alpha is None) == (keep_fraction is None):
        raise CalibrationError("give exactly one of alpha or keep_fraction")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise CalibrationError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if not image_paths:
        raise CalibrationError("no calibration images given")
    if not 0 <= vote < 1:
        raise CalibrationError(f"vote must be in [0, 1), got {vote}")
    model, config = dense_model(str(model_dir), trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as error:  # e.g. a processor that needs its own code, without --trust-remote-code
        raise CalibrationError(f"cannot load the processor of {model_dir}: {str(error).splitlines()[0]}") from None
    ratios = torch.stack(
        [vision_attention_ratios(model, inputs) for inputs in sample_inputs(processor, image_paths, prompts)]
    )
    if alpha is None:
        alpha = alpha_for_keep_fraction(ratios, keep_fraction, vote)
    mask = head_mask_from_ratios(ratios, alpha, vote).tolist()
    try:  # the folder's config must accept it (e.g. "reference" semantics prune whole key/value groups only)
        config_class = type(config)
        config_class.from_dict({**config.to_dict(), "vision_head_mask": mask})
    except ValueError as error:
        raise CalibrationError(f"the calibrated mask does not fit this model: {error}") from None
    if write:
        config_path = Path(model_dir) / "config.json"
        fields = json.loads(config_path.read_text())
        fields["vision_head_mask"] = mask
        # Written beside the config and renamed over it, so an interruption leaves the old config intact; with the
        # config's own mode (a temporary file is private to its owner).
        with tempfile.NamedTemporaryFile("w", dir=config_path.parent, suffix=".json", delete=False) as handle:
            json.dump(fields, handle, indent=2, sort_keys=True)
            handle.write("\n")
        try:
            shutil.copymode(config_path, handle.name)
            os.replace(handle.name, config_path)
        except BaseException:
            os.unlink(handle.name)
            raise
    return mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Calibrate YOPO's vision head mask and write it into the model folder."
    )
    parser.add_argument("--model", required=True, help="a YOPO model folder (from convert_llava.py --method yopo)")
    parser.add_argument("--images", nargs="+", required=True, help="calibration images")
    parser.add_argument("--prompts", nargs="+", required=True, help="one prompt for all images, or one per image")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--alpha", type=float, help="activity threshold on the vision/other attention ratio")
    threshold.add_argument("--keep-fraction", type=float, help="target mean fraction of heads kept per layer")
    parser.add_argument("--vote", type=float, default=0.4, help="keep a head active in more than this share of samples")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load the folder's config and processor with the code it carries (by default that code never runs: the "
        "installed sparse-llava and transformers classes read the folder)",
    )
    args = parser.parse_args(argv)
    if args.alpha is None and args.keep_fraction is None:
        args.keep_fraction = 0.5  # the budget of the YOPO presets
    try:
        mask = calibrate(
            args.model,
            args.images,
            args.prompts,
            args.alpha,
            args.keep_fraction,
            args.vote,
            trust_remote_code=args.trust_remote_code,
        )
    except (CalibrationError, OSError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    kept = [sum(row) for row in mask]
    print(f"heads kept per layer (of {len(mask[0])}): {kept}; mean {sum(kept) / len(kept):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
