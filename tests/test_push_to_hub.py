"""Pushing a converted folder: the checks, the dry run, and the calls made to the Hub API (recorded, no network)."""

import json

import pytest
from sparse_llava.push_to_hub import PushError, files_to_upload, main, push


class RecordingApi:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
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
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == ("org/tiny-dynamic",) and api.calls[0][2] == {"private": True, "exist_ok": True}
    upload = api.calls[2][2]
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
