"""Upload a converted sparse-llava folder to the Hugging Face Hub.

    python conversion/push_to_hub.py OUT --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run]

The folder is checked first (a converted model: config with an `auto_map` naming its own code files, never another
repo's; weights in shards of at most 5 GB; only regular files, no symbolic links); `--dry-run` lists what would be
uploaded and touches nothing. The upload is one commit made with huggingface_hub (`create_repo`, then `create_commit`
of exactly the listed files).

Deleting what an earlier push left behind: the commit includes `sparse_llava_upload.json`, the manifest of what it
uploaded: a format marker (`format`, `format_version`) and, for each file, the sha256 of its content and its git blob
id (sha1 of `b"blob <size>\\0" + content`). A re-push deletes a file that it no longer sends only when it can show that
an earlier push of this tool uploaded it, that is when all of these hold:
- the manifest carries this tool's marker and well-formed entries (else it is not this tool's: nothing is deleted,
  and this push's manifest replaces it);
- the path is one a push can upload: relative, normalised, inside the folder, with no hidden component, no
  `__pycache__`, not the manifest itself (else that entry is ignored);
- the file's current content on the Hub is what the manifest recorded (`get_paths_info`: the LFS sha256 for an LFS
  file, the git blob id for a regular one); a file changed since by anyone else is kept.
The manifest and the files are read at one commit of the branch, and the push's commit is made on top of that commit
only (`parent_commit`), so nothing changed in between is deleted. Whatever a push leaves in place it says, with why.
"""

import argparse
import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path

MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"
# Written with every push: what it uploaded, so that the next push deletes exactly what it no longer sends.
MANIFEST = "sparse_llava_upload.json"
MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION = "sparse-llava upload manifest", 2
# Files whose `auto_map` names code that transformers loads (from the folder, or from another repo if it says so).
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Remote files a push without an earlier manifest reports (and leaves in place) when it does not replace them.
WEIGHT_AND_CODE_SUFFIXES = (".safetensors", ".bin", ".index.json", ".py")


class PushError(ValueError):
    """The folder cannot be pushed as it is, or the Hub refused (the message names the problem)."""


def files_to_upload(folder) -> list[Path]:
    """Check that `folder` is a converted model and return the files an upload would send, relative to it."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PushError(f"{folder} has no config.json: is it a converted model folder?")
    files = regular_files(folder)
    config = _read_json(folder, "config.json")
    if "AutoModelForImageTextToText" not in (config.get("auto_map") or {}):
        raise PushError(f"{config_file} has no auto_map for AutoModelForImageTextToText: convert the model first")
    for name in AUTO_MAP_FILES:
        if (folder / name).is_file():
            _check_auto_map(folder, name)
    weights = [path for path in files if path.suffix == ".safetensors" and len(path.parts) == 1]
    if not weights:
        raise PushError(f"{folder} has no .safetensors weights")
    for path in weights:
        if (folder / path).stat().st_size > MAX_SHARD_BYTES:
            raise PushError(f"{path} is larger than 5 GB; re-save with max_shard_size='5GB'")
    return files


def regular_files(folder: Path) -> list[Path]:
    """
    The regular files inside `folder`, relative to it (hidden ones and `__pycache__` skipped). A symbolic link, or
    anything else that is not a regular file, is refused: uploading it would send what lies outside the folder.
    """
    files = []
    for directory, subdirectories, names in os.walk(folder):  # does not follow symlinked folders
        subdirectories[:] = sorted(name for name in subdirectories if not _skipped(name))
        for name in [*subdirectories, *sorted(names)]:
            path = Path(directory) / name
            relative = path.relative_to(folder)
            if _skipped(name) or relative == Path(MANIFEST):  # the manifest is written by the push itself
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise PushError(
                    f"{relative} in {folder} is a symbolic link (to {os.readlink(path)}); push uploads only regular "
                    "files inside the folder: replace the link with a copy, or remove it"
                )
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise PushError(f"{relative} in {folder} is not a regular file; remove it to push the folder")
            files.append(relative)
    return sorted(files)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _read_json(folder: Path, name: str) -> dict:
    try:
        fields = json.loads((folder / name).read_text())
    except ValueError as error:
        raise PushError(f"{folder / name} is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise PushError(f"{folder / name} is not a JSON object")
    return fields


def _check_auto_map(folder: Path, name: str) -> None:
    """Every `auto_map` entry must name a module file of the folder, never code in another repo (`repo--module.X`)."""
    for auto_class, references in (_read_json(folder, name).get("auto_map") or {}).items():
        for reference in references if isinstance(references, list) else [references]:
            if reference is None:
                continue
            if not isinstance(reference, str) or "--" in reference:
                raise PushError(
                    f"{name}'s auto_map entry {auto_class}: {reference!r} points to code outside the folder (another "
                    "repo); a converted model's code must be its own files"
                )
            module = reference.rsplit(".", 1)[0]
            if not (folder / f"{module}.py").is_file():
                raise PushError(f"{folder} lacks {module}.py, which {name}'s auto_map points to")


def push(
    folder,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    commit_message: str = "Upload sparse-llava model",
    api=None,
    report=print,
) -> list[Path]:
    """
    Upload `folder` to `repo_id` in one commit (a dry run only lists the files). Files an earlier push wrote that this
    one does not send are deleted in the same commit; nothing else in the repo is. Returns the files uploaded (or to
    upload).
    """
    if "/" not in repo_id:
        raise PushError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    folder = Path(folder)
    files = files_to_upload(folder)
    if dry_run:
        return files
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    uploaded = [path.as_posix() for path in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private:
            # create_repo leaves an existing repo's visibility as it is; --private must not upload into a public repo.
            api.update_repo_settings(repo_id, private=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision))
        # The manifest, and the files it lists, are read at one commit; the push commits on top of that one only.
        head = api.repo_info(repo_id, revision=revision).sha if MANIFEST in remote else None
        earlier = _earlier_upload(api, repo_id, head, report) if head else None
        if earlier is None:
            # Not pushed by this tool before (or not verifiably): leave the repo's files alone, but say which ones may
            # be stale, e.g. a single-file checkpoint beside new shards.
            untouched = sorted(
                name for name in remote - set(uploaded) if "/" not in name and name.endswith(WEIGHT_AND_CODE_SUFFIXES)
            )
            if untouched:
                report(f"note: {repo_id} also holds {', '.join(untouched)}, which this push leaves in place")
            earlier = {}
        no_longer_sent = {name: ids for name, ids in earlier.items() if name not in uploaded}
        stale = _unchanged_on_the_hub(api, repo_id, head, no_longer_sent, report)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_FORMAT_VERSION,
            "uploaded_by": "sparse-llava push_to_hub",
            "files": {name: _content_ids(folder / name) for name in uploaded},
        }
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in uploaded]
        operations.append(CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=_json_bytes(manifest)))
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, revision=revision, parent_commit=head
        )
    except PushError:
        raise
    except Exception as error:  # HTTP errors, no network, no token, offline mode: the Hub's own message, in one line
        lines = str(error).strip().splitlines()
        raise PushError(
            f"the Hub request for {repo_id} failed: {type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        ) from None
    for name in stale:
        report(f"deleted {name} (uploaded by an earlier push, not part of this one)")
    return files


def _content_ids(path: Path) -> dict[str, str]:
    """What the Hub reports of a file's content: its sha256 (for an LFS file) and its git blob id (for a regular one)."""
    sha256 = hashlib.sha256()
    git_blob = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            sha256.update(chunk)
            git_blob.update(chunk)
    return {"sha256": sha256.hexdigest(), "git_blob": git_blob.hexdigest()}


def _json_bytes(fields: dict) -> bytes:
    return (json.dumps(fields, indent=2) + "\n").encode()


def _earlier_upload(api, repo_id: str, head: str, report) -> dict[str, dict] | None:
    """
    The files the manifest at commit `head` says this tool uploaded (path -> content ids), keeping only paths a push
    can upload; None, said in a note, when the manifest is not one this tool wrote.
    """
    manifest_file = api.hf_hub_download(repo_id, MANIFEST, revision=head)
    try:
        manifest = json.loads(Path(manifest_file).read_text())
    except ValueError:  # not JSON, or not UTF-8
        manifest = None
    problem = _manifest_problem(manifest)
    if problem:
        report(f"note: {repo_id}'s {MANIFEST} is not one this tool wrote ({problem}); this push deletes nothing")
        return None
    earlier = {}
    for name, ids in manifest["files"].items():
        reason = _never_uploaded(name)
        if reason:
            report(f"note: ignored {name!r}, listed in {repo_id}'s {MANIFEST}: {reason}; it is left in place")
        else:
            earlier[name] = ids
    return earlier


def _manifest_problem(manifest) -> str | None:
    """Why `manifest` (parsed JSON) is not one this tool wrote, or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if (manifest.get("format"), manifest.get("format_version")) != (MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION):
        return f"no format marker {MANIFEST_FORMAT!r} version {MANIFEST_FORMAT_VERSION}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_is_content_ids(ids) for ids in files.values()):
        return "its files are not listed with their sha256 and git blob id"
    return None


def _is_content_ids(ids) -> bool:
    return (
        isinstance(ids, dict)
        and isinstance(ids.get("sha256"), str)
        and isinstance(ids.get("git_blob"), str)
        and re.fullmatch("[0-9a-f]{64}", ids["sha256"]) is not None
        and re.fullmatch("[0-9a-f]{40}", ids["git_blob"]) is not None
    )


def _never_uploaded(name: str) -> str | None:
    """Why a push can never have uploaded the repo path `name` (None: it can have)."""
    parts = name.split("/")
    if name == MANIFEST:
        return "the manifest itself"
    if name.startswith("/"):
        return "an absolute path"
    if ".." in parts:
        return "a path out of the folder (..)"
    if "" in parts or "." in parts:
        return "not a plain relative path of the folder"
    if any(_skipped(part) for part in parts):
        return "a hidden or __pycache__ path, which push never uploads"
    return None


def _unchanged_on_the_hub(api, repo_id: str, head: str | None, earlier: dict[str, dict], report) -> list[str]:
    """The files of `earlier` whose content at commit `head` is still what this tool uploaded (others: a note)."""
    if not earlier:
        return []
    from huggingface_hub.hf_api import RepoFile

    unchanged = []
    for remote in api.get_paths_info(repo_id, sorted(earlier), revision=head):  # paths no longer there are left out
        ids = earlier[remote.path]
        if isinstance(remote, RepoFile) and (
            remote.lfs.sha256 == ids["sha256"] if remote.lfs else remote.blob_id == ids["git_blob"]
        ):
            unchanged.append(remote.path)
        else:
            report(f"kept {remote.path}: changed on the Hub since an earlier push uploaded it")
    return sorted(unchanged)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Upload a converted sparse-llava folder to the Hugging Face Hub.")
    parser.add_argument("folder", help="the converted model folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="make the repo private (also an existing one)")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default="Upload sparse-llava model")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    try:
        files = push(args.folder, args.repo_id, args.private, args.revision, args.dry_run, args.commit_message)
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. an unreadable file in the folder
        print(f"error: {error}", file=sys.stderr)
        return 1
    verb = "would upload" if args.dry_run else "uploaded"
    total = sum((Path(args.folder) / path).stat().st_size for path in files)
    print(
        f"{verb} {len(files)} files ({total / 1e6:.1f} MB) to {args.repo_id}"
        + (f"@{args.revision}" if args.revision else "")
    )
    for path in files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
