"""accelerate's offloading (`device_map` / `max_memory` with `offload_folder`, `cpu_offload`): every method computes
the logits and greedy tokens it computes with its weights in place.

An offloaded module holds placeholders on the meta device and gets its weights only around its own forward, so this
catches any weight a method reads outside a module's forward (YOPO's sliced projections for vision tokens).
"""

import accelerate
import pytest
import torch
from conftest import SMALL_PREDICTOR

from sparse_llava import (
    DynamicLlavaForConditionalGeneration,
    PMoDLlavaForConditionalGeneration,
    YopoLlavaForConditionalGeneration,
)
from sparse_llava.configuration_yopo import preset_settings
from sparse_llava.tiny import tiny_base_config, tiny_inputs

NUM_LAYERS = tiny_base_config().text_config.num_hidden_layers
# The 12% preset (window attention, narrowed FFN) with heads pruned in layers 1 and 2 and the cutoff after them, so that
# the offloaded layers run every sliced projection (query/key/value rows, output-projection and FFN columns).
YOPO_SETTINGS = {
    **preset_settings("12%", NUM_LAYERS),
    "vision_head_mask": [[True] * 4, [True, True, False, False], [False, False, True, True], [False] * 4],
    "vision_layer_cutoff": 3,
}
METHODS = {
    "dynamic-llava": (DynamicLlavaForConditionalGeneration, "converted", SMALL_PREDICTOR),
    "p-mod": (PMoDLlavaForConditionalGeneration, "converted_pmod", {}),
    "yopo": (YopoLlavaForConditionalGeneration, "converted_yopo", YOPO_SETTINGS),
}


@pytest.fixture(params=list(METHODS))
def method_folder(request, tmp_path):
    """`(model class, folder)`: a tiny LLaVA-1.5 conversion whose new modules (predictors, routers) have random,
    well-spread weights (fresh ones are near-uniform or zero, which would hide placeholders left in them)."""
    model_class, fixture, settings = METHODS[request.param]
    model = model_class.from_pretrained(request.getfixturevalue(fixture)("llava", **settings))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in model.new_module_names:
            for parameter in getattr(model, name).parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / "model")
    return model_class, tmp_path / "model"


def cpu_and_disk_layers(model_class) -> dict:
    """Decoder layers alternately kept on "cpu" and offloaded to "disk"; everything else on "cpu"."""
    placement = {
        name: "cpu"
        for name in (
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model.embed_tokens",
            "model.language_model.norm",
            "model.language_model.rotary_emb",
            "lm_head",
            *model_class.new_module_names,
        )
    }
    placement.update({f"model.language_model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(NUM_LAYERS)})
    return placement


def load_offloaded(model_class, folder, how: str, offload_folder):
    if how == "device_map":
        return model_class.from_pretrained(
            folder, device_map=cpu_and_disk_layers(model_class), offload_folder=str(offload_folder)
        )
    if how == "max_memory":
        # Less CPU memory than the model needs: accelerate's automatic map spills the language model to disk.
        model = model_class.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=str(offload_folder)
        )
        assert "disk" in model.hf_device_map.values(), model.hf_device_map
        return model
    # Weights in CPU memory, loaded onto the execution device around each forward: what a GPU `device_map="auto"`
    # does with the layers it places on "cpu" (here the execution device is the CPU itself).
    return accelerate.cpu_offload(model_class.from_pretrained(folder), execution_device=torch.device("cpu"))


@pytest.mark.parametrize("how", ["device_map", "max_memory", "cpu_offload"])
def test_offloaded_model_gives_the_same_logits_and_tokens(method_folder, how, tmp_path):
    model_class, folder = method_folder
    reference = model_class.from_pretrained(folder).eval()
    offloaded = load_offloaded(model_class, folder, how, tmp_path / "offload").eval()
    offloaded_projection = offloaded.language_model.layers[1].self_attn.q_proj
    assert hasattr(offloaded_projection, "_hf_hook") and offloaded_projection.weight.is_meta

    inputs = tiny_inputs("llava", left_padding=[0, 3])
    with torch.no_grad():
        expected, actual = reference(**inputs).logits, offloaded(**inputs).logits
    torch.testing.assert_close(actual, expected)

    expected = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
    actual = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert actual.tolist() == expected.tolist()
