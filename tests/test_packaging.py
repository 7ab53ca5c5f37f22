"""The Hub code runs unchanged in three places: the repository, the installed package, a converted folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sparse_llava

REPO = Path(__file__).resolve().parents[1]
HUB_CODE = sorted((REPO / "configuration").glob("*.py")) + sorted((REPO / "modeling").glob("*.py"))


@pytest.mark.parametrize("path", HUB_CODE, ids=lambda path: path.name)
def test_hub_code_is_flat_and_imports_siblings_only_relatively(path):
    source = path.read_text()
    assert "sparse_llava" not in re.findall(r"^\s*(?:from|import)\s+(\S+)", source, re.MULTILINE)
    for module in re.findall(r"^\s*from\s+(\.+[\w.]*)\s+import", source, re.MULTILINE):
        assert re.fullmatch(r"\.\w+", module), f"{path.name}: {module} is not a single-dot sibling import"
        assert any((folder / f"{module[1:]}.py").is_file() for folder in (REPO / "configuration", REPO / "modeling"))


def test_repository_files_are_the_package_modules():
    import sparse_llava.configuration_dynamic_llava as configuration
    import sparse_llava.modeling_dynamic_llava as modeling

    assert Path(modeling.__file__).resolve() == REPO / "modeling" / "modeling_dynamic_llava.py"
    assert Path(configuration.__file__).resolve() == REPO / "configuration" / "configuration_dynamic_llava.py"
    assert sparse_llava.DynamicLlavaForConditionalGeneration is modeling.DynamicLlavaForConditionalGeneration


def test_installed_wheel_works_on_its_own(tmp_path):
    """Build the wheel, install it into an empty folder and use it from there, away from the checkout."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("sparse_llava-*.whl"))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import torch, sparse_llava\n"
        "from sparse_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration\n"
        "from sparse_llava.tiny import tiny_base_config, tiny_inputs\n"
        "import sparse_llava.modeling_dynamic_llava as m, sparse_llava.convert_llava as c\n"
        "print(m.__file__); print(c.__file__)\n"
        "config = DynamicLlavaConfig.from_base_config(tiny_base_config('llava'), predictor_hidden_size=32,"
        " predictor_num_heads=4, predictor_intermediate_size=64)\n"
        "model = DynamicLlavaForConditionalGeneration(config).eval()\n"
        "print(model(**tiny_inputs('llava')).logits.shape)\n"
        "print(c.hub_code_files('modeling_dynamic_llava')[0])\n"
        "print(sparse_llava.resource_folder('hub_cards') / 'dynamic_llava.md')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), PYTHONNOUSERSITE="1")
    # Run from an empty folder with the editable install hidden, so only the wheel's copy can be imported.
    result = subprocess.run(
        [sys.executable, "-S", "-c", _without_editable(probe)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    site = str(tmp_path / "site")
    lines = result.stdout.strip().splitlines()
    assert all(line.startswith(site) for line in (lines[0], lines[1], lines[3], lines[4])), lines
    assert lines[2] == "torch.Size([2, 24, 99])"


def _without_editable(probe: str) -> str:
    """Prefix `probe` with a sys.path set-up that keeps site-packages but not the editable install's hooks."""
    import site

    paths = [p for p in site.getsitepackages()]
    return (
        "import sys\n"
        f"sys.path.extend({paths!r})\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n" + probe
    )


def test_the_supported_transformers_range_is_stated_alike_everywhere():
    """pyproject.toml's requirement admits exactly the releases the flat code's gate accepts; README and cards agree."""
    import tomllib
    from packaging.requirements import Requirement

    from sparse_llava.compat_transformers import SUPPORTED_TRANSFORMERS, check_transformers_version

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(entry) for entry in dependencies if entry.startswith("transformers")]
    for minor in range(50, 58):  # the 4.x line ended with 4.57
        for version in (f"4.{minor}.0", f"4.{minor}.3"):
            assert_agree(requirement, check_transformers_version, version)
    for minor in range(0, 40):
        assert_agree(requirement, check_transformers_version, f"5.{minor}.1")
    for version in ("6.0.0", "3.9.0"):
        assert_agree(requirement, check_transformers_version, version)
    assert "4.57.x, or 5.15 and later 5.x" in (REPO / "README.md").read_text()
    assert SUPPORTED_TRANSFORMERS == "4.57.x or 5.15 and later 5.x"
    for card in (REPO / "hub_cards").glob("*.md"):
        assert "Requires transformers 4.57.x or 5.15 and later 5.x" in card.read_text(), card.name


def assert_agree(requirement, check, version):
    try:
        check(version)
        accepted = True
    except ImportError:
        accepted = False
    assert requirement.specifier.contains(version) == accepted, version
