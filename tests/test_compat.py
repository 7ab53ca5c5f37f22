"""Converted folders on both supported transformers lines (CI runs the whole suite on 5.x and on 4.57.x).

On each line, a folder loads through that line's Auto class with every weight found, the CLIP tower included (4.57
leaves a tower it cannot find randomly initialised, with only a warning). With `SPARSE_LLAVA_OTHER_PYTHON` naming
the Python of a venv with the other line (CI sets it for the second run), the same folder must give the same logits
and tokens there.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PREDICTOR

import sparse_llava
from sparse_llava.compat_transformers import IS_TRANSFORMERS_V5, auto_model_classes
from sparse_llava.tiny import read_weight_names, tiny_inputs

OTHER_PYTHON = os.environ.get("SPARSE_LLAVA_OTHER_PYTHON")


METHODS = ["dynamic-llava", "p-mod", "yopo"]
YOPO_SETTINGS = {
    "neighbor_window": 3,
    "vision_layer_cutoff": 2,
    "vision_head_mask": [[True] * 4, [True, True, False, False], [False, False, True, True], [False] * 4],
}


def settings_for(method) -> dict:
    return {
        "dynamic-llava": {**SMALL_PREDICTOR, "vision_keep_ratio": 0.5},
        "p-mod": {},
        "yopo": YOPO_SETTINGS,
    }[method]


def convert_for(method, base, layout, converted, converted_pmod, converted_yopo=None):
    if method == "dynamic-llava":
        return converted(base, layout=layout, vision_keep_ratio=0.5)
    if method == "yopo":
        return converted_yopo(base, layout=layout, **YOPO_SETTINGS)
    return converted_pmod(base, layout=layout)


# 4.57 deprecates AutoModelForVision2Seq (gone in 5.x), yet it is the class 4.57 users load such models with.
@pytest.mark.filterwarnings("ignore:The class `AutoModelForVision2Seq` is deprecated:FutureWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("base", ["llava", "llava_next"])
@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_every_weight_loads_through_the_auto_classes(
    method, base, layout, base_checkpoints, converted, converted_pmod, converted_yopo
):
    """From a base in either tower layout, the folder loads with no key missing or unexpected, and base weights equal."""
    output = convert_for(method, base, layout, converted, converted_pmod, converted_yopo)
    base_model = base_checkpoints[(base, layout)][1]
    # The layout both lines load: the llava-hf Hub repos' nested CLIP tower.
    tower = [name for name in read_weight_names(output) if name.startswith("vision_tower.")]
    assert tower and all(name.startswith("vision_tower.vision_model.") for name in tower)
    for auto_class in auto_model_classes():  # 4.57: AutoModelForVision2Seq too
        model, info = auto_class.from_pretrained(output, trust_remote_code=True, output_loading_info=True)
        assert type(model).__module__.startswith("transformers_modules.")
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        state = model.state_dict()
        base_state = base_model.state_dict()
        assert any(".vision_tower." in name for name in base_state)
        for name, tensor in base_state.items():
            assert torch.equal(state[name], tensor), name


# Run by the other line's Python: convert the same base there, and load both folders (that line's and ours).
PROBE = """
import json, sys, torch, transformers, sparse_llava
base, method, settings, ours, theirs, inputs_file, result_file = sys.argv[1:]
sparse_llava.convert(base, method, theirs, json.loads(settings), progress=False)
auto_class = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
inputs = torch.load(inputs_file)
result = {"version": transformers.__version__}
for name, folder in (("ours", ours), ("theirs", theirs)):
    model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        result[name] = (model(**inputs).logits, model.generate(**inputs, max_new_tokens=8, do_sample=False))
torch.save(result, result_file)
"""


@pytest.mark.skipif(OTHER_PYTHON is None, reason="set SPARSE_LLAVA_OTHER_PYTHON to a Python with the other line")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_same_logits_and_tokens_on_the_other_line(method, base, base_checkpoints, tmp_path):
    """A folder converted on either line gives, loaded on either line, the same logits and generated tokens."""
    settings = settings_for(method)
    base_folder = str(base_checkpoints[(base, "hub")][0])
    ours = sparse_llava.convert(base_folder, method, tmp_path / "ours", settings, progress=False)
    inputs = tiny_inputs(base, left_padding=[2, 0])
    torch.save(inputs, tmp_path / "inputs.pt")
    arguments = [base_folder, method, json.dumps(settings), str(ours), str(tmp_path / "theirs")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    probe = subprocess.run(
        [OTHER_PYTHON, "-c", PROBE, *arguments, str(tmp_path / "inputs.pt"), str(tmp_path / "other.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    other = torch.load(tmp_path / "other.pt")
    assert (int(other["version"].split(".")[0]) >= 5) != IS_TRANSFORMERS_V5, other["version"]

    valid = inputs["attention_mask"].bool()
    expected_logits, expected_tokens = other["ours"]
    for folder, (other_logits, other_tokens) in ((ours, other["ours"]), (tmp_path / "theirs", other["theirs"])):
        model = auto_model_classes()[0].from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        for actual in (logits, other_logits):
            assert (actual - expected_logits)[valid].abs().max() <= 1e-5, folder
        assert tokens.tolist() == other_tokens.tolist() == expected_tokens.tolist(), folder


def test_config_round_trips_with_derived_fields(converted_pmod):
    """4.57 configs are not dataclasses: the fields and what `__post_init__` derives must survive save and load."""
    output = convert_for("p-mod", "llava", "hub", None, converted_pmod)
    saved = json.loads((Path(output) / "config.json").read_text())
    model = auto_model_classes()[0].from_pretrained(output, trust_remote_code=True)
    assert model.config.mod_layers == saved["mod_layers"] == sorted(saved["mod_layers"])
    assert model.config.base_model_type == "llava" and model.config.routed_tokens == "vision_all"
    config_class = type(model.config)  # the folder's copy of the code
    derived = config_class(**{**saved, "mod_layers": None})
    assert derived.mod_layers == saved["mod_layers"]
    with pytest.raises(ValueError, match="mod_min_ratio"):
        config_class(**{**saved, "mod_min_ratio": 0.9, "mod_max_ratio": 0.5})
