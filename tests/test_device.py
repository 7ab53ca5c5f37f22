"""Each method on both tiny bases, moved to the device `$SPARSE_LLAVA_TEST_DEVICE` names (the `device` fixture: cpu
unless set; `make gpu-check` runs this file on cuda): the same greedy tokens with every cache, a padded batch equal to
its rows alone; and `make gpu-check`'s own run on a machine without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dynamic_llava_decode import text_sparse_model
from test_dynamic_llava_prefill import inputs_for, row_alone
from test_pmod import pmod_from
from test_yopo import ALL_KNOBS, yopo_from

METHODS = ("dynamic-llava", "p-mod", "yopo")
BASES = ("llava", "llava_next")
NEW_TOKENS = 6
REPO = Path(__file__).resolve().parents[1]


def method_model(method: str, base: str, base_checkpoints, converted):
    """`method` on the tiny `base`, deciding something at prefill and (Dynamic-LLaVA) while decoding, built as
    tests/test_static_decode.py builds its models."""
    base_model = base_checkpoints[(base, "hub")][1]
    if method == "dynamic-llava":
        return text_sparse_model(converted, base)
    if method == "p-mod":
        return pmod_from(base_model)
    return yopo_from(base_model, **ALL_KNOBS)


def moved(inputs: dict, device, dtype=None) -> dict:
    """`inputs` on `device`; floating-point tensors (pixel values) also in `dtype` if given."""
    return {
        name: value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
        for name, value in inputs.items()
    }


def greedy(model, inputs, **settings):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **settings)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", METHODS)
def test_growing_fixed_and_no_cache_give_the_same_tokens(device, method, base, base_checkpoints, converted):
    model = method_model(method, base, base_checkpoints, converted).to(device)
    inputs = moved(inputs_for(base), device)
    growing = greedy(model, inputs)
    assert growing.device.type == device.type
    assert torch.equal(greedy(model, inputs, cache_implementation="static"), growing)
    assert torch.equal(greedy(model, inputs, use_cache=False), growing)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_equals_its_rows_alone(device, method, base, base_checkpoints, converted):
    model = method_model(method, base, base_checkpoints, converted).to(device)
    inputs = inputs_for(base)  # row 1 has 7 pad tokens on the left
    batched = greedy(model, moved(inputs, device))
    for row in range(2):
        alone = greedy(model, moved(row_alone(inputs, row), device))
        assert torch.equal(alone[0, -NEW_TOKENS:], batched[row, -NEW_TOKENS:]), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA, which this machine has")
def test_a_device_this_torch_cannot_use_fails_in_one_line():
    test = "tests/test_device.py::test_growing_fixed_and_no_cache_give_the_same_tokens[p-mod-llava]"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO,
        env={**os.environ, "SPARSE_LLAVA_TEST_DEVICE": "cuda"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    line = "SPARSE_LLAVA_TEST_DEVICE='cuda': Torch not compiled with CUDA enabled; unset it to run on the CPU"
    assert line in result.stdout and "Traceback" not in result.stdout, result.stdout


def test_gpu_check_without_cuda_skips_each_cuda_phase_and_exits_0(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for phase in gpu_check.PHASES:
        assert sum(line.startswith(f"gpu-check: {phase}: SKIPPED (") for line in lines) == 1, (phase, lines)
    assert len(lines) == len(gpu_check.PHASES) + 1, lines  # a line per phase, then the verdict
    assert lines[-1].startswith("gpu-check: PASS (nothing failed; skipped:"), lines[-1]
