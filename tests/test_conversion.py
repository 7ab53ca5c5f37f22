"""The conversion CLI / API: what lands in the output folder, how it loads, and how bad input fails."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PREDICTOR, fill_hub_cache
from safetensors.torch import load_file

import sparse_llava
from sparse_llava.convert_llava import ConversionError, convert, hub_code_files, main
from sparse_llava.tiny import read_weight_names, tiny_inputs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conversion" / "convert_llava.py"
SMALL = [f"--set={key}={value}" for key, value in SMALL_PREDICTOR.items()]


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_output_folder_is_hub_ready(converted):
    output = converted("llava")
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "dynamic_llava"
    assert config["architectures"] == ["DynamicLlavaForConditionalGeneration"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dynamic_llava.DynamicLlavaConfig",
        "AutoModelForImageTextToText": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
        "AutoModelForVision2Seq": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
    }
    code_files = hub_code_files("modeling_dynamic_llava")
    assert {path.name for path in code_files} == {
        "cache_sparse_llava.py",
        "compat_transformers.py",
        "configuration_dynamic_llava.py",
        "configuration_sparse_llava.py",
        "modeling_dynamic_llava.py",
        "modeling_sparse_llava.py",
    }
    for path in code_files:  # the very files of the repository, flat
        assert (output / path.name).read_text() == path.read_text()
    assert (output / "generation_config.json").is_file()
    assert "base_model:" in (output / "README.md").read_text()


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_base_weights_land_unchanged(layout, base_checkpoints, converted):
    base_folder, base_model = base_checkpoints[("llava", layout)]
    output = converted("llava", layout=layout)
    model, info = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, tensor in base_model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # Written in the llava-hf key layout.
    names = read_weight_names(output)
    assert "language_model.lm_head.weight" in names
    assert any(name.startswith("language_model.model.layers.0.") for name in names)
    assert any(name.startswith("image_score_predictor.") for name in names)


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_llava_hf_checkpoint_loads_into_the_class(layout, base_checkpoints):
    """Every base parameter is loaded; only the predictors (absent from a base checkpoint) are missing."""
    folder, base_model = base_checkpoints[("llava_next", layout)]
    config = sparse_llava.DynamicLlavaConfig.from_base_config(base_model.config, **SMALL_PREDICTOR)
    model, info = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(
        folder, config=config, output_loading_info=True, new_modules_from_scratch=True
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert info["missing_keys"] and all("score_predictor." in key for key in info["missing_keys"])
    for name, tensor in base_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_new_weights_come_from_the_seed(base_checkpoints, tmp_path):
    base = str(base_checkpoints[("llava", "hub")][0])
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert(base, "dynamic-llava", tmp_path / name, SMALL_PREDICTOR, seed=seed, progress=False)
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in "abc"}
    key = "image_score_predictor.down_mlp.1.weight"
    assert torch.equal(weights["a"][key], weights["b"][key])
    assert not torch.equal(weights["a"][key], weights["c"][key])


def test_processor_files_are_copied(base_checkpoints, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_checkpoints[("llava", "hub")][0], base)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    output = convert(str(base), "dynamic-llava", tmp_path / "out", SMALL_PREDICTOR, progress=False)
    assert (output / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (output / "preprocessor_config.json").is_file()


def test_cli_converts_and_fresh_process_loads_through_auto_class(base_checkpoints, tmp_path):
    base = str(base_checkpoints[("llava", "hub")][0])
    output = tmp_path / "out"
    result = run_cli(
        "--base",
        base,
        "--method",
        "dynamic-llava",
        "--output",
        str(output),
        *SMALL,
        "--set",
        "vision_keep_ratio=1.0",
        "--set",
        "text_sparsification=false",
    )
    assert result.returncode == 0, result.stderr
    assert "[convert] done" in result.stderr

    inputs_file = tmp_path / "inputs.pt"
    torch.save(tiny_inputs("llava"), inputs_file)
    # A fresh interpreter that never imports sparse_llava: the class must come from the folder's code.
    probe = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(output)!r}, trust_remote_code=True).eval()\n"
        "assert 'sparse_llava' not in sys.modules\n"
        "print(type(model).__module__)\n"
        f"inputs = torch.load({str(inputs_file)!r})\n"
        "with torch.no_grad(): logits = model(**inputs).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().startswith("transformers_modules.")
    assert loaded.stdout.strip().endswith(".modeling_dynamic_llava")

    base_model = base_checkpoints[("llava", "hub")][1]
    with torch.no_grad():
        expected = base_model(**tiny_inputs("llava")).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "fastv"], "unknown method 'fastv'"),
        (["--set", "keep_everything=1"], "unknown setting(s) for dynamic-llava: keep_everything"),
        (["--set", "vision_keep_ratio=2"], "vision_keep_ratio must be a number in (0, 1]"),
        (["--set", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_cli_bad_input_fails_in_one_line(extra, message, base_checkpoints, tmp_path):
    base = str(base_checkpoints[("llava", "hub")][0])
    args = ["--base", base, "--method", "dynamic-llava", "--output", str(tmp_path / "out"), *extra]
    result = run_cli(*args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_base_that_is_not_llava(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(
        tmp_path / "llama"
    )
    assert main(["--base", str(tmp_path / "llama"), "--method", "dynamic-llava", "--output", str(tmp_path / "o")]) == 2
    assert "must be a LLaVA-1.5 or LLaVA-NeXT checkpoint" in capsys.readouterr().err
    assert (
        main(["--base", str(tmp_path / "nothing"), "--method", "dynamic-llava", "--output", str(tmp_path / "o")]) == 2
    )
    assert "cannot read a LLaVA config" in capsys.readouterr().err


def test_refuses_non_empty_output_unless_overwrite(base_checkpoints, tmp_path):
    base = str(base_checkpoints[("llava", "hub")][0])
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty; pass --overwrite"):
        convert(base, "dynamic-llava", output, SMALL_PREDICTOR, progress=False)
    assert (output / "keep.txt").read_text() == "mine"
    convert(base, "dynamic-llava", output, SMALL_PREDICTOR, overwrite=True, progress=False)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


def test_failure_leaves_nothing_half_written(base_checkpoints, tmp_path, monkeypatch):
    base = str(base_checkpoints[("llava", "hub")][0])
    output = tmp_path / "out"

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sparse_llava.convert_llava._copy_processor_files", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        convert(base, "dynamic-llava", output, SMALL_PREDICTOR, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_hub_id_from_a_prefilled_offline_cache(base_checkpoints, tmp_path):
    """`--base org/name` goes through huggingface_hub's cache, as a download would, with the network off."""
    snapshot = fill_hub_cache(tmp_path / "hub", "llava-hf/tiny-llava-1.5-hf", base_checkpoints[("llava", "hub")][0])
    (snapshot / "chat_template.jinja").write_text("{{ messages }}")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    output = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--base",
            "llava-hf/tiny-llava-1.5-hf",
            "--method",
            "dynamic-llava",
            "--output",
            str(output),
            *SMALL,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (output / "chat_template.jinja").read_text() == "{{ messages }}"
    assert "base_model: llava-hf/tiny-llava-1.5-hf" in (output / "README.md").read_text()
    missing = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--base",
            "llava-hf/not-in-the-cache",
            "--method",
            "dynamic-llava",
            "--output",
            str(tmp_path / "out2"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 2
    assert "cannot read a LLaVA config from 'llava-hf/not-in-the-cache'" in missing.stderr
