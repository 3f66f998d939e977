"""Hugging Face Hub model ids as model specs: ``hf:org/name`` and ``hf:org/name@revision``, wherever ``hf:DIR``
is accepted.

An id is resolved by ``huggingface_hub.snapshot_download`` into its own cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the layout ``models--org--name/snapshots/<commit>/``), with
only what a ``save_pretrained`` folder needs (``config.json``, ``*.safetensors``, preprocessor JSON). Offline
(``HF_HUB_OFFLINE=1`` or ``KD_DETR_OFFLINE=1``) it is looked up in that cache only, and a model that is not
there is one line naming the id and how to fetch it. Custom code is never run (no ``trust_remote_code``).

The resolved :class:`HubSnapshot` names exactly which weights a run used: the commit hash the revision
pointed at and the SHA-256 of every weight file; it is recorded in the model's config (so in checkpoints and
run records) and in cache manifests. A path that exists locally is always a folder, never an id.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kd_detr.download import sha256_file
from kd_detr.errors import UserError

__all__ = ["HubError", "HubSnapshot", "hub_cache_dir", "hub_offline", "is_hub_id", "resolve_hub_id"]

# org/name with an optional @revision (a branch, a tag or a commit hash)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what a transformers detector folder needs; nothing else of a repository is fetched
ALLOW_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "preprocessor_config.json")
_TRUE = ("1", "true", "yes", "on")


class HubError(UserError, ValueError):
    """A Hub id that cannot be resolved (offline and not cached, no such repository or revision)."""


def hub_offline() -> bool:
    """Whether the Hub is off: ``HF_HUB_OFFLINE`` or ``KD_DETR_OFFLINE`` set (read when called, not at import)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "KD_DETR_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``
    (read when called, so a test or a user changing the variables is followed)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(text: str) -> bool:
    """``org/name[@revision]`` that is not an existing local path (a local folder always wins)."""
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


@dataclass(frozen=True)
class HubSnapshot:
    """One resolved Hub id: ``repo_id``, the ``revision`` asked for (``main`` by default), the ``commit`` it
    pointed at, the local snapshot ``folder`` and the SHA-256 of each weight file (``files``)."""

    repo_id: str
    revision: str
    commit: str
    folder: Path
    files: dict[str, str] = field(default_factory=dict)

    @property
    def pinned(self) -> str:
        """The id at its commit: ``org/name@<commit>`` (resolves to the same files, offline too)."""
        return f"{self.repo_id}@{self.commit}"

    def record(self) -> dict:
        """What run records, checkpoints and cache manifests keep of it (JSON-safe)."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "files": dict(self.files)}


@functools.lru_cache(maxsize=32)
def _resolve(repo_id: str, revision: str, offline: bool, cache_dir: str) -> HubSnapshot:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    # a commit already in the cache needs no network at all
    local_only = offline or bool(_COMMIT.match(revision) and (Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
                                                                / "snapshots" / revision).is_dir())
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=list(ALLOW_PATTERNS), local_files_only=local_only))
    except LocalEntryNotFoundError:
        why = "the Hub is off (HF_HUB_OFFLINE / KD_DETR_OFFLINE)" if offline else "the Hub cannot be reached"
        raise HubError(f"hf:{repo_id}@{revision}: not in the Hugging Face cache {cache_dir} and {why}; fetch it once "
                       f"on a machine with internet (any kd-detr command naming hf:{repo_id}, or `hf download "
                       f"{repo_id}{'' if revision == 'main' else ' --revision ' + revision}`) into that cache, then "
                       "run again") from None
    except RevisionNotFoundError:
        raise HubError(f"hf:{repo_id}: the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"hf:{repo_id}: no such model repository on the Hub (or it is private: log in with "
                       "`hf auth login`)") from None
    files = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=folder.name, folder=folder, files=files)


def resolve_hub_id(text: str) -> HubSnapshot:
    """Resolve ``org/name[@revision]`` (the part after ``hf:``) to a local snapshot folder, downloading what is
    missing unless offline. Resolved once per process and id."""
    m = _HUB_ID.match(text)
    if not m:
        raise HubError(f"hf:{text}: not a Hub model id (org/name or org/name@revision) nor an existing folder")
    return _resolve(m.group("repo"), m.group("rev") or "main", hub_offline(), str(hub_cache_dir()))


def snapshot_of(folder: Optional[str]) -> Optional[str]:
    """The commit hash of a Hub cache snapshot folder (``.../snapshots/<commit>``), else ``None``."""
    if not folder:
        return None
    p = Path(folder)
    return p.name if p.parent.name == "snapshots" and _COMMIT.match(p.name) else None
