"""Pushing a converted folder: the checks, the dry run, and the calls made to the Hub API (recorded, no network)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import fill_hub_cache

from sparse_llava.push_to_hub import PushError, files_to_upload, main, push


class RecordingApi:
    """Records calls to huggingface_hub's `HfApi`, checking each against the real method's signature."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        import inspect

        from huggingface_hub import HfApi

        def record(*args, **kwargs):
            inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
            self.calls.append((name, args, kwargs))

        return record


def test_dry_run_lists_the_folder_and_calls_nothing(converted, capsys):
    output = converted("llava")
    api = RecordingApi()
    files = push(output, "org/tiny-dynamic", dry_run=True, api=api)
    assert api.calls == []
    names = {str(path) for path in files}
    assert {"config.json", "model.safetensors", "modeling_dynamic_llava.py", "README.md"} <= names
    assert main([str(output), "--repo-id", "org/tiny-dynamic", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("would upload") and "modeling_sparse_llava.py" in printed


def test_push_creates_the_repo_and_uploads_in_one_commit(converted):
    output = converted("llava")
    api = RecordingApi()
    files = push(output, "org/tiny-dynamic", private=True, revision="v1", api=api)
    assert [name for name, _, _ in api.calls] == [
        "create_repo",
        "update_repo_settings",
        "create_branch",
        "upload_folder",
    ]
    assert api.calls[0][1] == ("org/tiny-dynamic",) and api.calls[0][2] == {"private": True, "exist_ok": True}
    assert api.calls[1][1] == ("org/tiny-dynamic",) and api.calls[1][2] == {"private": True}  # also an existing repo
    upload = api.calls[3][2]
    assert upload["repo_id"] == "org/tiny-dynamic" and upload["revision"] == "v1"
    assert upload["folder_path"] == str(output)
    assert sorted(upload["allow_patterns"]) == sorted(str(path) for path in files)


def test_refuses_what_is_not_a_converted_model(converted, tmp_path, capsys):
    with pytest.raises(PushError, match="has no config.json"):
        files_to_upload(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(PushError, match="no auto_map"):
        files_to_upload(tmp_path)
    assert main([str(converted("llava")), "--repo-id", "no-org", "--dry-run"]) == 2
    assert "must look like ORG/NAME" in capsys.readouterr().err


def test_model_card_metadata(base_checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    from sparse_llava.convert_llava import convert

    base = tmp_path / "base"
    shutil.copytree(base_checkpoints[("llava", "hub")][0], base)
    (base / "README.md").write_text("---\nlicense: llama2\n---\n# tiny\n")
    for method, trained in (("dynamic-llava", "untrained"), ("p-mod", "untrained"), ("yopo", "not fine-tuned")):
        output = convert(str(base), method, tmp_path / method, {}, progress=False)
        card = ModelCard.load(output / "README.md")
        assert card.data.license == "llama2"
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
        assert card.data.base_model == str(base) and method in card.data.tags and "custom_code" in card.data.tags
        assert 'pipeline("image-text-to-text"' in card.text and trained in card.text


def test_converted_model_loads_by_repo_id_from_an_offline_cache(converted, tmp_path):
    """As users load it once it is on the Hub: by repo id, here from a pre-filled cache with the network off."""
    import os
    import subprocess
    import sys

    fill_hub_cache(tmp_path / "hub", "org/tiny-dynamic-llava", converted("llava"))
    probe = (
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained('org/tiny-dynamic-llava', trust_remote_code=True)\n"
        "processor = AutoProcessor.from_pretrained('org/tiny-dynamic-llava', trust_remote_code=True)\n"
        "print(type(model).__name__, type(processor).__name__)\n"
    )
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_MODULES_CACHE=str(tmp_path / "modules")
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DynamicLlavaForConditionalGeneration", "LlavaProcessor"]


def test_folder_given_through_a_parent_path(converted, tmp_path, monkeypatch):
    """Paths with `..` or hidden parents still list the folder's files (only hidden files inside are skipped)."""
    output = converted("llava")
    monkeypatch.chdir(tmp_path)
    relative = Path("..") / output.relative_to(tmp_path.parent) if output.is_relative_to(tmp_path.parent) else output
    assert {str(path) for path in files_to_upload(relative)} == {str(path) for path in files_to_upload(output)}
    api = RecordingApi()
    push(output, "org/tiny", api=api)
    assert "*.safetensors" in api.calls[-1][2]["delete_patterns"]
