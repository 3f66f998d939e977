"""Weights that download themselves: a file named by a URL is fetched on first use into a user cache, checked,
and found there afterwards.

* Where: ``$KD_DETR_HOME`` (default ``<torch.hub.get_dir()>/kd_detr``, i.e. ``~/.cache/torch/hub/kd_detr``,
  following ``TORCH_HOME`` / ``XDG_CACHE_HOME``), in a sub-folder per kind (``teachers/``, ``backbones/``); never
  inside the installed package.
* Checked: the SHA-256 a teacher card records (``sha256``), or the hash prefix torchvision puts in its file names
  (``resnet50-0676ba61.pth``: the first hex digits of the SHA-256, as ``torch.hub`` checks them). A mismatch is
  an error naming the URL and both hashes, and nothing is kept.
* Safe: bytes go to a temporary name beside the target, renamed only when complete and checked; an interrupted
  or failed download leaves no file that looks complete.
* Offline: ``--offline`` or ``KD_DETR_OFFLINE=1`` (or a machine that cannot reach the URL) is one line naming the
  URL and the path to put the file at.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from kd_detr.errors import UserError

__all__ = ["DownloadError", "cached_file", "download", "expected_hash", "imagenet_backbone", "kd_detr_home",
           "offline", "sha256_file"]

log = logging.getLogger("kd_detr.download")

# torchvision / torch.hub file names: <name>-<first 8+ hex digits of the SHA-256>.<ext>
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
_TRUE = ("1", "true", "yes", "on")
TIMEOUT_S = 60


class DownloadError(UserError, OSError):
    """A file that could not be fetched or checked; one line naming the URL and where the file goes."""


def kd_detr_home() -> Path:
    """The download cache: ``$KD_DETR_HOME``, else ``<torch.hub.get_dir()>/kd_detr`` (read when called)."""
    if os.environ.get("KD_DETR_HOME"):
        return Path(os.environ["KD_DETR_HOME"]).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "kd_detr"


def offline() -> bool:
    """Downloads are off: ``KD_DETR_OFFLINE`` set (``--offline`` sets it for the command)."""
    return os.environ.get("KD_DETR_OFFLINE", "").strip().lower() in _TRUE


def cached_file(kind: str, url: str) -> Path:
    """Where the file of ``url`` lives in the cache: ``KD_DETR_HOME/<kind>/<the URL's file name>``."""
    name = Path(urllib.request.url2pathname(url.split("?")[0].rstrip("/"))).name
    if not name:
        raise DownloadError(f"{url}: the URL names no file")
    return kd_detr_home() / kind / name


def expected_hash(url: str, sha256: Optional[str] = None) -> Optional[str]:
    """The SHA-256 (or its prefix) a download must have: ``sha256`` when given, else the prefix in a
    torchvision-style file name, else ``None`` (unchecked)."""
    if sha256:
        return sha256.strip().lower()
    m = _HASH_IN_NAME.search(Path(url.split("?")[0]).name)
    return m.group(1) if m else None


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, progress: bool = True) -> Path:
    """``dest``, fetched from ``url`` unless it is already there (then checked too). ``sha256``: the full hash,
    or a prefix of it (``expected_hash``); ``None``: no check (the hash is logged so a card can record it)."""
    dest = Path(dest)
    want = expected_hash(url, sha256)
    if dest.is_file():
        if want and not sha256_file(dest).startswith(want):
            raise DownloadError(f"{dest} (from {url}) does not have the recorded SHA-256 {want}: remove it and run "
                                "again to download it anew")
        return dest
    if offline():
        raise DownloadError(f"{url} is needed at {dest} and downloads are off (--offline / KD_DETR_OFFLINE=1): "
                            f"download it on a machine with internet and put it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        got = _fetch(url, fd, dest, progress)
        if want and not got.startswith(want):
            raise DownloadError(f"{url}: the downloaded file's SHA-256 is {got}, not the recorded {want}; nothing "
                                f"was kept at {dest} (a changed or corrupted file: check the URL and the hash)")
        if not want:
            log.warning("%s: no SHA-256 recorded to check it against; it has %s", url, got)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s to %s", url, dest)
    return dest


def _fetch(url: str, fd: int, dest: Path, progress: bool) -> str:
    """Stream ``url`` into the open file ``fd`` (closed here); returns the SHA-256 of the bytes."""
    from tqdm import tqdm

    h = hashlib.sha256()
    where = f"put the file at {dest} by hand, or pass its path (--teacher-checkpoint / --backbone-weights)"
    with os.fdopen(fd, "wb") as out:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "kd-detr"})
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                done = 0
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                          disable=not progress, leave=False) as bar:
                    while True:
                        block = resp.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                        h.update(block)
                        done += len(block)
                        bar.update(len(block))
                if total is not None and done != total:
                    raise DownloadError(f"{url}: the connection ended after {done} of {total} bytes; run again to "
                                        f"retry, or {where}")
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {where}") from None
        except http.client.HTTPException as e:  # IncompleteRead: the server dropped the connection mid-file
            raise DownloadError(f"{url}: the connection broke during the download ({type(e).__name__}); run again "
                                f"to retry, or {where}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"{url} cannot be reached ({reason}); on a machine without internet, {where}") from None
        except OSError as e:
            if isinstance(e, DownloadError):
                raise
            raise DownloadError(f"{url}: the download failed ({e}); run again to retry, or {where}") from None
    return h.hexdigest()


def imagenet_backbone(arch: str, progress: bool = True) -> Path:
    """The ImageNet weights of torchvision's ``arch`` (``resnet50``, ``resnet101``...) that the official
    Conditional DETR starts from (``IMAGENET1K_V1``, torchvision's ``pretrained=True``), fetched into
    ``KD_DETR_HOME/backbones/`` and checked by the hash in their file name."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError, KeyError):
        raise DownloadError(f"backbone {arch!r} has no torchvision ImageNet weights (IMAGENET1K_V1): pass a local "
                            "state dict with --backbone-weights PATH") from None
    return download(weights.url, cached_file("backbones", weights.url), progress=progress)
