"""Pushing a converted folder: the checks, the dry run, and the calls made to the Hub API (recorded, no network)."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import fill_hub_cache
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from safetensors.torch import load_file

from sparse_llava.push_to_hub import MANIFEST, MANIFEST_FORMAT, PushError, files_to_upload, main, push


class RecordingApi:
    """
    huggingface_hub's `HfApi` for the tests: each call is checked against the real method's signature and recorded,
    and the repo's files (`remote`, path -> bytes) and its head commit (`head`) change as the Hub's would
    (`list_repo_files`, `repo_info`, `get_paths_info`, `hf_hub_download`, `create_commit`).
    """

    def __init__(self, remote: dict | None = None, download_dir: Path | None = None):
        self.calls, self.remote, self.download_dir = [], dict(remote or {}), download_dir
        self.head = hashlib.sha1(repr(sorted(self.remote.items())).encode()).hexdigest()

    def __getattr__(self, name):
        import inspect

        from huggingface_hub import HfApi

        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
            self.calls.append((name, args, kwargs))
            handler = getattr(type(self), f"_{name}", None)
            return None if handler is None else handler(self, *args, **kwargs)

        return record

    def _list_repo_files(self, repo_id, revision=None):
        return sorted(self.remote)

    def _repo_info(self, repo_id, revision=None):
        from huggingface_hub.hf_api import ModelInfo

        return ModelInfo(id=repo_id, sha=self.head)

    def _get_paths_info(self, repo_id, paths, revision=None):
        """As the Hub answers: the files that exist (others left out), LFS ones as the Hub's default .gitattributes."""
        from huggingface_hub.hf_api import RepoFile

        assert revision == self.head, "paths read at another commit than the manifest"
        infos = []
        for path in paths:
            if path not in self.remote:
                continue
            content = self.remote[path]
            if path.endswith((".safetensors", ".bin")) or len(content) > 10 * 1000**2:
                sha256 = hashlib.sha256(content).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n"
                lfs = {"size": len(content), "oid": sha256, "pointerSize": len(pointer)}
                infos.append(RepoFile(path=path, size=len(content), oid=git_blob_id(pointer.encode()), lfs=lfs))
            else:
                infos.append(RepoFile(path=path, size=len(content), oid=git_blob_id(content)))
        return infos

    def _hf_hub_download(self, repo_id, filename, revision=None):
        path = self.download_dir / filename
        path.write_bytes(self.remote[filename])
        return str(path)

    def _create_commit(self, repo_id, operations, commit_message, revision=None, parent_commit=None):
        for operation in operations:
            if isinstance(operation, CommitOperationAdd):
                content = operation.path_or_fileobj
                self.remote[operation.path_in_repo] = (
                    content if isinstance(content, bytes) else Path(content).read_bytes()
                )
            else:
                del self.remote[operation.path_in_repo]
        self.head = hashlib.sha1(f"{self.head} {commit_message}".encode()).hexdigest()

    def commit_by_someone_else(self, path: str, content: bytes):
        self._create_commit("", [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)], f"change {path}")

    def commit(self):
        (commit,) = [kwargs for name, _, kwargs in self.calls if name == "create_commit"]
        return commit

    def deletes(self) -> list[str]:
        return [op.path_in_repo for op in self.commit()["operations"] if isinstance(op, CommitOperationDelete)]


def git_blob_id(content: bytes) -> str:
    """The git object id of a file's content, from git itself."""
    return (
        subprocess.run(["git", "hash-object", "--stdin"], input=content, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )


def manifest_of_ours(files: dict[str, bytes]) -> bytes:
    """A manifest in this tool's format, listing `files` (path -> content) with their real content ids."""
    ids = {
        name: {"sha256": hashlib.sha256(content).hexdigest(), "git_blob": git_blob_id(content)}
        for name, content in files.items()
    }
    return json.dumps({"format": MANIFEST_FORMAT, "format_version": 2, "files": ids}).encode()


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


def test_push_creates_the_repo_and_uploads_in_one_commit(converted, tmp_path):
    output = converted("llava")
    api = RecordingApi(download_dir=tmp_path)
    files = push(output, "org/tiny-dynamic", private=True, revision="v1", api=api)
    assert [name for name, _, _ in api.calls] == [
        "create_repo",
        "update_repo_settings",
        "create_branch",
        "list_repo_files",
        "create_commit",
    ]
    assert api.calls[0][1] == ("org/tiny-dynamic",) and api.calls[0][2] == {"private": True, "exist_ok": True}
    assert api.calls[1][1] == ("org/tiny-dynamic",) and api.calls[1][2] == {"private": True}  # also an existing repo
    commit = api.commit()
    assert commit["revision"] == "v1" and commit["commit_message"] == "Upload sparse-llava model"
    # Exactly the listed files, byte for byte, and the manifest of what was uploaded.
    names = [str(path) for path in files]
    assert set(api.remote) == {*names, MANIFEST}
    for name in names:
        assert api.remote[name] == (output / name).read_bytes()
    # The manifest: this tool's marker, and each file with its sha256 and git blob id (from git itself).
    manifest = json.loads(api.remote[MANIFEST])
    assert (manifest["format"], manifest["format_version"]) == (MANIFEST_FORMAT, 2)
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(api.remote[name]).hexdigest(), "git_blob": git_blob_id(api.remote[name])}
        for name in names
    }


def shard_the_weights(folder: Path) -> str:
    """Replace the folder's model.safetensors by one shard and its index, as a re-save with max_shard_size does."""
    shard = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(folder / shard)
    weight_map = {name: shard for name in load_file(folder / shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shard


def test_re_push_deletes_only_what_an_earlier_push_wrote(converted, tmp_path):
    """
    The second push sends sharded weights and no CHANGES.md: the earlier single file (LFS) and CHANGES.md (a regular
    file) go; files others added to the repo stay.
    """
    folder = tmp_path / "model"
    shutil.copytree(converted("llava"), folder)
    (folder / "CHANGES.md").write_text("first release\n")
    first = RecordingApi(download_dir=tmp_path)
    push(folder, "org/tiny", api=first)
    others = {"notes/model.safetensors": b"someone else's", "extra.py": b"# theirs", "old.bin": b"theirs"}

    shard = shard_the_weights(folder)
    (folder / "CHANGES.md").unlink()
    second, reported = RecordingApi({**first.remote, **others}, tmp_path), []
    head = second.head
    files = push(folder, "org/tiny", api=second, report=reported.append)
    names = {str(path) for path in files}
    assert {shard, "model.safetensors.index.json"} <= names and "model.safetensors" not in names
    assert set(second.remote) == names | {MANIFEST} | set(others)
    assert reported == [
        "deleted CHANGES.md (uploaded by an earlier push, not part of this one)",
        "deleted model.safetensors (uploaded by an earlier push, not part of this one)",
    ]
    assert second.deletes() == ["CHANGES.md", "model.safetensors"]
    # Checked and committed at the commit the manifest was read from: the Hub refuses the commit if the branch moved.
    assert second.commit()["parent_commit"] == head


def test_push_into_a_repo_without_a_manifest_deletes_nothing(converted, tmp_path):
    remote = {"pytorch_model.bin": b"old", "modeling_old.py": b"# old", "docs/a.py": b"# docs", "notes.txt": b"hi"}
    api, reported = RecordingApi(remote, tmp_path), []
    files = push(converted("llava"), "org/tiny", api=api, report=reported.append)
    assert set(api.remote) == {str(path) for path in files} | {MANIFEST} | set(remote)
    assert "hf_hub_download" not in [name for name, _, _ in api.calls]
    assert reported == ["note: org/tiny also holds modeling_old.py, pytorch_model.bin, which this push leaves in place"]


@pytest.mark.parametrize(
    "manifest, problem",
    [
        (b'{"files": "everything"}', "no format marker"),
        (
            json.dumps({"files": [".gitattributes", ".hidden/file", "README.md", "pytorch_model.bin"]}),
            "no format marker",
        ),
        # This tool's first format: a bare list, nothing to check the files against.
        (json.dumps({"uploaded_by": "sparse-llava push_to_hub", "files": ["README.md"]}), "no format marker"),
        (json.dumps({"format": MANIFEST_FORMAT, "format_version": 2, "files": {"README.md": {}}}), "not listed with"),
        (b"\xff\xfe not JSON", "not a JSON object"),
    ],
    ids=["files not a list", "another tool's list", "first format", "entries without ids", "not JSON"],
)
def test_a_manifest_this_tool_did_not_write_deletes_nothing(manifest, problem, converted, tmp_path):
    folder = tmp_path / "no-readme"
    shutil.copytree(converted("llava"), folder)
    (folder / "README.md").unlink()
    manifest = manifest.encode() if isinstance(manifest, str) else manifest
    theirs = {
        ".gitattributes": b"*.bin filter=lfs\n",
        ".hidden/file": b"x",
        "README.md": b"# theirs",
        "pytorch_model.bin": b"old",
    }
    api, reported = RecordingApi({MANIFEST: manifest, **theirs}, tmp_path), []
    push(folder, "org/tiny", api=api, report=reported.append)
    assert api.deletes() == [] and all(api.remote[name] == content for name, content in theirs.items())
    assert "get_paths_info" not in [name for name, _, _ in api.calls]
    assert reported[0].startswith(f"note: org/tiny's {MANIFEST} is not one this tool wrote (")
    assert problem in reported[0] and reported[0].endswith("); this push deletes nothing")
    assert reported[1:] == ["note: org/tiny also holds pytorch_model.bin, which this push leaves in place"]
    assert json.loads(api.remote[MANIFEST])["format"] == MANIFEST_FORMAT  # replaced by this push's own


def test_paths_a_push_never_uploads_are_ignored_in_its_manifest(converted, tmp_path):
    """Listed in a manifest of this tool's format, with their exact content: still never deleted; each is named."""
    never = {
        ".gitattributes": "a hidden or __pycache__ path",
        "../x": "a path out of the folder (..)",
        "/abs": "an absolute path",
        ".hidden/file": "a hidden or __pycache__ path",
        "docs/.env": "a hidden or __pycache__ path",
        "__pycache__/x.pyc": "a hidden or __pycache__ path",
        "docs//a.py": "not a plain relative path",
        "./a.py": "not a plain relative path",
        MANIFEST: "the manifest itself",
    }
    theirs = {name: f"content of {name}".encode() for name in never}
    earlier = {**theirs, "old.md": b"uploaded by an earlier push"}
    api, reported = RecordingApi({**earlier, MANIFEST: manifest_of_ours(earlier)}, tmp_path), []
    push(converted("llava"), "org/tiny", api=api, report=reported.append)
    assert api.deletes() == ["old.md"]  # the one path a push can have uploaded, unchanged since
    assert all(api.remote[name] == content for name, content in theirs.items() if name != MANIFEST)
    ignored = [line for line in reported if line.startswith("note: ignored ")]
    for line, (name, reason) in zip(ignored, never.items(), strict=True):
        assert line.startswith(f"note: ignored {name!r}, listed in org/tiny's {MANIFEST}: {reason}")
        assert line.endswith("; it is left in place")
    (paths_info,) = [args for name, args, _ in api.calls if name == "get_paths_info"]
    assert paths_info[1] == ["old.md"]  # nothing else is even looked at


def test_a_file_changed_on_the_hub_since_it_was_pushed_is_kept(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted("llava"), folder)
    (folder / "CHANGES.md").write_text("first release\n")
    api = RecordingApi(download_dir=tmp_path)
    push(folder, "org/tiny", api=api)
    # Someone else replaces both after the push: an LFS file and a regular one.
    api.commit_by_someone_else("model.safetensors", b"their weights")
    api.commit_by_someone_else("CHANGES.md", b"their notes\n")

    shard_the_weights(folder)
    (folder / "CHANGES.md").unlink()
    second, reported = RecordingApi(api.remote, tmp_path), []
    push(folder, "org/tiny", api=second, report=reported.append)
    assert second.deletes() == []
    assert second.remote["model.safetensors"] == b"their weights" and second.remote["CHANGES.md"] == b"their notes\n"
    assert reported == [
        "kept CHANGES.md: changed on the Hub since an earlier push uploaded it",
        "kept model.safetensors: changed on the Hub since an earlier push uploaded it",
    ]


@pytest.mark.parametrize("link", ["file outside", "folder outside", "file inside"])
def test_symbolic_links_are_refused(link, converted, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(converted("llava"), folder)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "token.txt").write_text("hf_secret")
    name = {"file outside": "token.txt", "folder outside": "extras", "file inside": "copy.json"}[link]
    target = {"file outside": outside / "token.txt", "folder outside": outside, "file inside": folder / "config.json"}
    (folder / name).symlink_to(target[link])
    api = RecordingApi(download_dir=tmp_path)
    with pytest.raises(PushError, match=rf"{name} in .* is a symbolic link \(to {target[link]}\); push uploads only"):
        push(folder, "org/tiny", api=api)
    assert api.calls == []
    assert main([str(folder), "--repo-id", "org/tiny", "--dry-run"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    (folder / name).unlink()
    (folder / ".cache").symlink_to(outside)  # hidden entries are never uploaded, links or not
    assert "token.txt" not in {path.name for path in files_to_upload(folder)}


@pytest.mark.parametrize(
    "file, entry, message",
    [
        ("config.json", "other/repo--modeling_dynamic_llava.DynamicLlavaForConditionalGeneration", "another repo"),
        ("config.json", "modeling_missing.Model", "lacks modeling_missing.py"),
        ("tokenizer_config.json", ["other/repo--tokenization.Tokenizer", None], "another repo"),
        ("processor_config.json", "attacker/x--processing.Processor", "another repo"),
    ],
)
def test_auto_map_entries_must_name_the_folders_own_code(file, entry, message, converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted("llava"), folder)
    fields = json.loads((folder / file).read_text()) if (folder / file).is_file() else {}
    auto_class = "AutoModelForImageTextToText" if file == "config.json" else "AutoProcessor"
    fields["auto_map"] = {**fields.get("auto_map", {}), auto_class: entry}
    (folder / file).write_text(json.dumps(fields))
    with pytest.raises(PushError, match=message):
        files_to_upload(folder)


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
    api = RecordingApi(download_dir=tmp_path)
    push(relative, "org/tiny", api=api)
    assert set(api.remote) == {str(path) for path in files_to_upload(output)} | {MANIFEST}


class _RefusingHub:
    """A local HTTP server that answers every request like the Hub with a bad token (401), counting the requests."""

    def __enter__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                requests.append(self.path)
                body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _refuse

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once the socket is closed


@pytest.mark.parametrize("failure", ["HTTP 401", "connection refused", "offline mode"])
def test_hub_and_network_errors_are_one_line_from_the_cli(failure, converted, tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "conversion" / "push_to_hub.py"
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN="hf_not_a_real_token", HF_HUB_DISABLE_TELEMETRY="1")
    server = _RefusingHub()
    with server if failure == "HTTP 401" else _no_context():
        env["HF_ENDPOINT"] = server.url if failure == "HTTP 401" else _closed_port_url()
        if failure == "offline mode":
            env["HF_HUB_OFFLINE"] = "1"
        result = subprocess.run(
            [sys.executable, str(script), str(converted("llava")), "--repo-id", "org/tiny"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the Hub request for org/tiny failed: ")
    expected = {"HTTP 401": "401", "connection refused": "Connect", "offline mode": "offline"}[failure]
    assert expected.lower() in line.lower(), line
    if failure == "HTTP 401":
        assert server.requests  # it did reach the (local) Hub


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass
