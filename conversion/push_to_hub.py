"""Upload a converted sparse-llava folder to the Hugging Face Hub.

    python conversion/push_to_hub.py OUT --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run]

The folder is checked first (a converted model: config with an `auto_map` naming its own code files, never another
repo's; weights in shards of at most 5 GB; only regular files, no symbolic links); `--dry-run` lists what would be
uploaded and touches nothing. The upload is one commit made with huggingface_hub (`create_repo`, then `create_commit`
of exactly the listed files). It includes `sparse_llava_upload.json`, the list of what it uploaded: a re-push deletes
the files of that list it no longer sends, and nothing else in the repo.
"""

import argparse
import json
import os
import stat
import sys
from pathlib import Path

MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"
# Written with every push: what it uploaded, so that the next push deletes exactly what it no longer sends.
MANIFEST = "sparse_llava_upload.json"
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
        previous = _previous_upload(api, repo_id, revision) if MANIFEST in remote else None
        if previous is None:
            # Not pushed by this tool before (or by one without a manifest): leave the repo's files alone, but say
            # which ones may be stale, e.g. a single-file checkpoint beside new shards.
            untouched = sorted(
                name for name in remote - set(uploaded) if "/" not in name and name.endswith(WEIGHT_AND_CODE_SUFFIXES)
            )
            if untouched:
                report(f"note: {repo_id} also holds {', '.join(untouched)}, which this push leaves in place")
            previous = set()
        stale = sorted((previous & remote) - set(uploaded) - {MANIFEST})
        manifest = json.dumps({"uploaded_by": "sparse-llava push_to_hub", "files": uploaded}, indent=2) + "\n"
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in uploaded]
        operations.append(CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=manifest.encode()))
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
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


def _previous_upload(api, repo_id: str, revision: str | None) -> set[str]:
    """The files the manifest of an earlier push lists (only plain relative paths are trusted)."""
    path = api.hf_hub_download(repo_id, MANIFEST, revision=revision)
    try:
        names = json.loads(Path(path).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise PushError(f"{repo_id}'s {MANIFEST} is not a manifest of this tool; remove it or push elsewhere") from None
    if not isinstance(names, list):
        raise PushError(f"{repo_id}'s {MANIFEST} is not a manifest of this tool; remove it or push elsewhere")
    return {
        name
        for name in names
        if isinstance(name, str) and name and not name.startswith("/") and ".." not in name.split("/")
    }


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
