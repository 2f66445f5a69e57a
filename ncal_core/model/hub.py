"""A checkpoint named as a local folder or as a Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`).

Hub ids resolve through huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE): a cached snapshot is used
without the network, and with HF_HUB_OFFLINE=1 the network is never tried; otherwise the files a checkpoint
needs (configs, safetensors, tokenizer) are downloaded into that cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ncal_core.errors import NCALError

# what loading a checkpoint or adapter reads; no .bin/.pt/.gguf copies of the weights
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as `owner/repo` and is not an existing local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def checkpoint_folder(name_or_path: str | Path, revision: str | None = None, *, what: str) -> Path:
    """The local folder of a checkpoint: `name_or_path` itself, or the hub id's cached (or downloaded) snapshot.

    what: how an error names the setting, e.g. `--model_name_or_path`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise NCALError(f"{what} {name}: not a checkpoint folder, nor a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{what} {name}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                      local_files_only=_offline()))
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise NCALError(f"{at}: not in the Hugging Face cache and {how}; download it first "
                        f"(`huggingface-cli download {name}`) or pass a local folder") from None
    except RevisionNotFoundError:
        raise NCALError(f"{at}: the hub has no such revision") from None
    except RepositoryNotFoundError:
        raise NCALError(f"{at}: no such model on the hub (a private one needs `hf auth login`)") from None
    except HfHubHTTPError as err:
        raise NCALError(f"{at}: the hub refused the download ({str(err).splitlines()[0]})") from None
