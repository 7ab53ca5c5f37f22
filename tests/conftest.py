"""Shared fixtures: tiny random LLaVA-1.5 / LLaVA-NeXT checkpoints in the llava-hf layout, and their conversions."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sparse_llava  # noqa: E402
from sparse_llava.compat_transformers import CACHE_NAME  # noqa: E402
from sparse_llava.tiny import build_tiny_llava  # noqa: E402

# Small predictors keep the tiny models tiny; the structure is the paper's.
SMALL_PREDICTOR = {"predictor_hidden_size": 32, "predictor_num_heads": 4, "predictor_intermediate_size": 64}
DENSE_EQUIVALENT = {"vision_keep_ratio": 1.0, "text_sparsification": False}


@pytest.fixture(scope="session")
def device() -> torch.device:
    """
    The device the device-parametrised tests (tests/test_device.py) move their models to: `$SPARSE_LLAVA_TEST_DEVICE`,
    cpu unless set (`make gpu-check` sets cuda). Every other test runs on the CPU.
    """
    name = os.environ.get("SPARSE_LLAVA_TEST_DEVICE", "cpu")
    try:
        return torch.empty(0, device=name).device  # no device string, or one this torch cannot use, fails here
    except (RuntimeError, AssertionError) as error:  # a CPU-only torch asserts on CUDA
        reason = str(error).splitlines()[0]
        pytest.fail(f"SPARSE_LLAVA_TEST_DEVICE={name!r}: {reason}; unset it to run on the CPU", pytrace=False)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _auto_class_registrations_end_with_their_test():
    """
    `sparse_llava.register_auto_classes()` (called by some tests, and by `load_for_evaluation`) changes transformers'
    Auto mappings for the whole process: from then on, folders load with the installed classes even when a later
    test asks for the folder's own code. Restore the mappings' registrations after each test (their private
    `_extra_content`, where `register` puts them).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mappings = [CONFIG_MAPPING] + [auto_class._model_mapping for auto_class in sparse_llava.auto_model_classes()]
    registered = [dict(mapping._extra_content) for mapping in mappings]
    yield
    for mapping, content in zip(mappings, registered, strict=True):
        mapping._extra_content.clear()
        mapping._extra_content.update(content)


@pytest.fixture(scope="session")
def base_checkpoints(tmp_path_factory):
    """`{(base, layout): (folder, model)}` for base in llava / llava_next and layout hub / flat."""
    root = tmp_path_factory.mktemp("bases")
    checkpoints = {}
    for base in ("llava", "llava_next"):
        for layout in ("hub", "flat"):
            folder = root / f"{base}-{layout}"
            checkpoints[(base, layout)] = (folder, build_tiny_llava(folder, base=base, layout=layout))
    return checkpoints


def memoised_conversions(base_checkpoints, root: Path, method: str, defaults: dict | None = None):
    """`make(base, layout="hub", **overrides)` -> a conversion of the tiny base to `method` (made once per setting)."""
    made = {}

    def make(base="llava", layout="hub", **overrides):
        settings = {**(defaults or {}), **overrides}
        key = (base, layout, repr(sorted(settings.items())))
        if key not in made:
            output = root / f"out{len(made)}"
            sparse_llava.convert(str(base_checkpoints[(base, layout)][0]), method, output, settings, progress=False)
            made[key] = output
        return made[key]

    return make


@pytest.fixture(scope="session")
def converted(base_checkpoints, tmp_path_factory):
    """Convert to Dynamic-LLaVA on demand: `converted(base, layout="hub", **overrides)` -> output folder."""
    return memoised_conversions(
        base_checkpoints, tmp_path_factory.mktemp("converted"), "dynamic-llava", SMALL_PREDICTOR
    )


def load_dynamic(folder, **config_overrides):
    """Load a converted folder in-process through the package's classes."""
    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(folder, **config_overrides)
    return model.eval()


@pytest.fixture(scope="session")
def converted_pmod(base_checkpoints, tmp_path_factory):
    """`converted_pmod(base, **overrides)` -> a p-MoD conversion of the tiny base (memoised)."""
    return memoised_conversions(base_checkpoints, tmp_path_factory.mktemp("converted_pmod"), "p-mod")


@pytest.fixture(scope="session")
def converted_yopo(base_checkpoints, tmp_path_factory):
    """`converted_yopo(base, **overrides)` -> a YOPO conversion of the tiny base (memoised)."""
    return memoised_conversions(base_checkpoints, tmp_path_factory.mktemp("converted_yopo"), "yopo")


def generated_cache(output):
    """The cache `generate(..., return_dict_in_generate=True)` returned, under the installed transformers' name."""
    return getattr(output, CACHE_NAME)


def fill_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> Path:
    """Put `folder` into a huggingface_hub cache as the `main` revision of `repo_id`; returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def random_images(count: int, seed: int = 0, size=(12, 10)) -> list:
    """`count` random RGB PIL images of `size` (height, width) pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")) for _ in range(count)]
