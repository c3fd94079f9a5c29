"""Upload an export folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo URL.

    Any failure (no network, no token, no permission) raises SystemExit with what to do; the
    local folder is only read, never changed, so the export stays intact for a later retry.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload qat export")
    except Exception as err:  # HTTP, offline-mode, connection and auth errors all have their own types
        raise SystemExit(
            f"qat: could not push {folder} to the Hub as {repo_id} ({type(err).__name__}: {err}). "
            f"The export is intact at {folder}; check network access and `huggingface-cli login` "
            f"(or HF_TOKEN), then run: huggingface-cli upload {repo_id} {folder}"
        ) from None
    return str(url)
