"""Loading converted folders as users do: processor, pipeline, dtypes, accelerate device maps with offload."""

import numpy as np
import pytest
import torch
from conftest import generated_cache
from PIL import Image
from test_offload import cpu_and_disk_layers
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from sparse_llava import DynamicLlavaForConditionalGeneration
from sparse_llava.tiny import tiny_inputs

PROMPT = "USER: <image> What is in the image ? ASSISTANT:"


def picture(height=16, width=24, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_processor_and_pipeline(base, converted):
    output = converted(base)
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    inputs = processor(
        images=[picture(), picture(seed=1)],
        text=[PROMPT, "USER: <image> red ? ASSISTANT:"],
        return_tensors="pt",
        padding=True,
    )
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 5)

    answer = pipeline("image-text-to-text", model=str(output), trust_remote_code=True)(
        images=picture(), text=PROMPT, max_new_tokens=5, do_sample=False
    )
    text = answer[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text.split()) == len(PROMPT.split()) + 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(dtype, converted):
    model = AutoModelForImageTextToText.from_pretrained(converted("llava"), trust_remote_code=True, dtype=dtype)
    assert model.dtype == dtype
    inputs = tiny_inputs("llava")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert generated_cache(output).layers[3].keys.dtype == dtype
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


def test_device_map_with_cpu_and_disk_offload(converted, tmp_path):
    output = converted("llava")
    reference = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True)
    expected = reference.generate(**tiny_inputs("llava"), max_new_tokens=4, do_sample=False)
    placement = cpu_and_disk_layers(DynamicLlavaForConditionalGeneration)
    offloaded = AutoModelForImageTextToText.from_pretrained(
        output, trust_remote_code=True, device_map=placement, offload_folder=str(tmp_path)
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    actual = offloaded.generate(**tiny_inputs("llava"), max_new_tokens=4, do_sample=False)
    assert actual.tolist() == expected.tolist()
    automatic = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, device_map="auto")
    assert automatic.generate(**tiny_inputs("llava"), max_new_tokens=4, do_sample=False).tolist() == expected.tolist()
