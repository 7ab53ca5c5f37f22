"""The sparse-llava main job on a built-in example, end to end.

1. build a tiny random LLaVA-1.5 checkpoint in the llava-hf layout (transformers' own classes);
2. convert it to Dynamic-LLaVA with `conversion/convert_llava.py`;
3. load the result the way users do, `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)`;
4. generate, and print how many tokens each decoder layer kept in its KV cache.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_llava.tiny import IMAGE_TOKEN_ID, build_tiny_llava  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sparse-llava-demo-"))

    base, converted = workdir / "tiny-llava-1.5", workdir / "tiny-dynamic-llava"
    print(f"1. building a tiny random LLaVA-1.5 checkpoint in {base}")
    build_tiny_llava(base, base="llava", num_layers=4)

    print(f"2. converting it to Dynamic-LLaVA in {converted}")
    small_predictor = [
        "--set",
        "predictor_hidden_size=32",
        "--set",
        "predictor_num_heads=4",
        "--set",
        "predictor_intermediate_size=64",
    ]
    subprocess.run(
        [
            sys.executable,
            str(REPO / "conversion" / "convert_llava.py"),
            "--base",
            str(base),
            "--method",
            "dynamic-llava",
            "--output",
            str(converted),
            "--overwrite",
            *small_predictor,
        ],
        check=True,
    )

    print("3. loading it with AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)")
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True).eval()
    print(f"   -> {type(model).__module__}.{type(model).__name__}")

    print("4. generating for a batch of two prompts with one image each (the shorter prompt is left-padded)")
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts = ["USER: <image> What is in the image ? ASSISTANT:", "USER: <image> a cat ? ASSISTANT:"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    cache = model.new_cache()  # generate() would make one; passing it keeps it at hand afterwards
    output = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, cache=cache, return_dict_in_generate=True
    )
    prompt_length = inputs["input_ids"].shape[1]
    for prompt, tokens in zip(prompts, output.sequences[:, prompt_length:]):
        print(f"   {prompt!r} -> {processor.decode(tokens, skip_special_tokens=True)!r} (random weights)")

    image_tokens = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist()
    print(
        f"\nKV cache after generation (prompt: {inputs['attention_mask'].sum(-1).tolist()} tokens per row, "
        f"of which {image_tokens} image tokens; keep ratio {model.config.vision_keep_ratio} from layer "
        f"{model.config.sparse_layer} on):"
    )
    print(f"{'layer':>5}  {'tokens held per row':>20}")
    for layer_idx in range(model.config.text_config.num_hidden_layers):
        print(f"{layer_idx:>5}  {str(cache.stored_tokens(layer_idx).tolist()):>20}")
    print(f"KV cache memory: {cache.memory_bytes()} bytes held by the stored tokens")


if __name__ == "__main__":
    main()
