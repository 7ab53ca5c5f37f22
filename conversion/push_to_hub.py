"""Upload a converted sparse-llava folder to the Hugging Face Hub.

    python conversion/push_to_hub.py OUT --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run]

The folder is checked first (a converted model: config with an `auto_map`, its code files, weights in shards of at
most 5 GB); `--dry-run` lists what would be uploaded and touches nothing. The upload is one commit made with
huggingface_hub (`create_repo`, then `upload_folder`).
"""

import argparse
import json
import sys
from pathlib import Path

MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"
STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.py"]


class PushError(ValueError):
    """The folder cannot be pushed as it is (the message names the problem)."""


def files_to_upload(folder) -> list[Path]:
    """Check that `folder` is a converted model and return the files an upload would send, relative to it."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PushError(f"{folder} has no config.json: is it a converted model folder?")
    config = json.loads(config_file.read_text())
    auto_map = config.get("auto_map") or {}
    if "AutoModelForImageTextToText" not in auto_map:
        raise PushError(f"{config_file} has no auto_map for AutoModelForImageTextToText: convert the model first")
    for reference in auto_map.values():
        module = reference.split("--")[-1].split(".")[0]
        if not (folder / f"{module}.py").is_file():
            raise PushError(f"{folder} lacks {module}.py, which config.json's auto_map points to")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise PushError(f"{folder} has no .safetensors weights")
    for path in weights:
        if path.stat().st_size > MAX_SHARD_BYTES:
            raise PushError(f"{path.name} is larger than 5 GB; re-save with max_shard_size='5GB'")
    files = sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts)
    )
    if Path("config.json") not in files:
        raise PushError(f"nothing to upload from {folder}")
    return files


def push(
    folder,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    commit_message: str = "Upload sparse-llava model",
    api=None,
) -> list[Path]:
    """Upload `folder` to `repo_id` (a dry run only lists the files). Returns the files uploaded (or to upload)."""
    if "/" not in repo_id:
        raise PushError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    files = files_to_upload(folder)
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private:
        # create_repo leaves an existing repo's visibility as it is; --private must not upload into a public repo.
        api.update_repo_settings(repo_id, private=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message,
        allow_patterns=[str(path) for path in files],
        # A re-push must not leave stale weights or code behind (e.g. a single file next to new shards).
        delete_patterns=STALE_PATTERNS,
    )
    return files


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
