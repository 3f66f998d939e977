"""Writes a teacher cache folder (:class:`CacheWriter`): write-once shards, the manifest rewritten atomically
after each, a resumed build checked against the folder's header and its shards' SHA-256."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kd_detr.atomic import atomic_write, write_json_atomic

from .attention_codec import StoreConfig, batch_keys
from .lock import CacheLock
from .manifest import (_SHARD_NAME, CACHE_FORMAT, FORMAT_VERSION, HEADER_SECTIONS, MANIFEST, QUERIES, CacheError,
                       _diff, _json_normal, _read_manifest, sha256_file)

log = logging.getLogger("kd_detr.teacher.cache")

__all__ = ["CacheWriter"]


_WRITE_HINTS = {
    errno.ENOSPC: "no space left on device? free space on that disk or build into another --out",
    errno.EDQUOT: "disk quota exceeded? free space or build into another --out",
    errno.EROFS: "the file system is read-only: build into another --out",
    errno.EACCES: "check the permissions of the cache folder",
    errno.EPERM: "check the permissions of the cache folder",
}


def _write_error(path: Path, what: str, e: BaseException) -> "CacheError":
    """A one-line :class:`CacheError` for a failed write of ``path`` (an ``OSError``, or the
    ``SafetensorError`` that wraps one as ``... (os error 28) ...``)."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code:
        detail = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        hint = _WRITE_HINTS.get(code, "check the disk and the cache folder")
    else:
        detail, hint = " ".join(str(e).split()) or type(e).__name__, "check the disk and the cache folder"
    return CacheError(f"cannot write teacher cache {what} {path}: {detail}: {hint}; nothing half-written was kept "
                      f"({MANIFEST} lists only complete shards: rerun `kd-detr cache` to resume)")


class CacheWriter:
    """Writes a teacher cache folder; resumes one with the same header.

    Args:
        root: the cache folder (created if needed).
        header: the manifest without ``shards``: ``teacher``, ``dataset``, ``plan``, ``store`` sections
            (``format``/``format_version`` are added). On an existing cache it must equal the stored
            header field by field, else :class:`CacheError` lists each differing dotted key.

    Only one writer per folder (it alone rewrites ``manifest.json``): the writer holds the folder's
    :class:`CacheLock` from its creation to :meth:`close` (or garbage collection), and a writer in another
    process fails at once. ``write_shard`` may be called from several threads of that process (the
    manifest update is locked).

    Resuming verifies the SHA-256 of every shard the manifest lists (one read of the cache): a shard
    missing, of another size or corrupt is dropped from the manifest with a warning and rebuilt.
    A failed write (disk full, ...) raises :class:`CacheError` naming the file; the temporary file is
    removed and the manifest keeps listing only complete shards.
    """

    def __init__(self, root: str | os.PathLike, header: Mapping[str, Any]):
        self.root = Path(root)
        header = _json_normal(dict(header))
        if "shards" in header:
            raise ValueError("CacheWriter header must not contain 'shards' (the writer keeps that list)")
        missing = [k for k in HEADER_SECTIONS if k not in header]
        if missing:
            raise ValueError(f"CacheWriter header lacks sections {missing} (needs {list(HEADER_SECTIONS)})")
        for key, want in (("format", CACHE_FORMAT), ("format_version", FORMAT_VERSION)):
            if header.setdefault(key, want) != want:
                raise ValueError(f"CacheWriter header {key} is {header[key]!r}, this kd-detr writes {want!r}")
        self.store = StoreConfig.from_dict(header["store"])  # validates the store section
        self._lock = threading.Lock()
        # before the manifest is read: the one holder of the folder decides what is complete
        self._folder_lock: Optional[CacheLock] = CacheLock(self.root)
        try:
            if (self.root / MANIFEST).exists():
                manifest = _read_manifest(self.root)  # also refuses paths leading out of the folder
                existing = {k: v for k, v in manifest.items() if k != "shards"}
                problems = _diff(existing, header, both_ways=True)
                if problems:
                    raise CacheError(f"the folder {self.root} holds a cache of another teacher/data/plan: "
                                     + "; ".join(problems)
                                     + " (use another folder, or delete this one to rebuild)")
                self.manifest = {**header, "shards": self._verified(manifest["shards"])}
                if len(self.manifest["shards"]) != len(manifest["shards"]):
                    self._write_manifest()
            else:
                self.manifest = {**header, "shards": []}
                self._write_manifest()  # fixes the header from the start: a resumed build is compared with it
        except BaseException:
            self.close()
            raise

    # -- internals

    def _verified(self, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The manifest entries whose file is present with the listed size and SHA-256; the others are
        dropped (with a warning naming each) so that a resume rebuilds them. Reads every listed shard."""
        kept = []
        for entry in shards:
            path = self.root / entry["file"]
            if not path.is_file():
                why = "missing"
            elif path.stat().st_size != entry["bytes"]:
                why = f"{path.stat().st_size} bytes on disk, the manifest says {entry['bytes']}"
            elif sha256_file(path) != entry["sha256"]:
                why = "corrupt (its SHA-256 differs from the manifest's)"
            else:
                kept.append(entry)
                continue
            log.warning("teacher cache %s: shard %s is listed in %s but %s; it will be rebuilt",
                        self.root, entry["file"], MANIFEST, why)
        return kept

    def _write_manifest(self) -> None:
        try:
            write_json_atomic(self.root / MANIFEST, self.manifest)
        except OSError as e:
            raise _write_error(self.root / MANIFEST, "manifest", e) from None

    # -- lifetime

    def close(self) -> None:
        """Release the folder's lock (idempotent); the writer must not write after this."""
        lock, self._folder_lock = getattr(self, "_folder_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown: the kernel drops the lock anyway
            pass

    # -- public

    @property
    def header(self) -> dict[str, Any]:
        return {k: v for k, v in self.manifest.items() if k != "shards"}

    def done(self) -> set[str]:
        """File names of the shards listed in the manifest (complete and visible to readers)."""
        with self._lock:
            return {e["file"] for e in self.manifest["shards"]}

    def done_views(self) -> set[tuple[int, int]]:
        """``(i, k)`` of every image view in a complete shard."""
        with self._lock:
            return {(int(i), int(e["view"])) for e in self.manifest["shards"] for i in e["images"]}

    def write_queries(self, query_embed: Tensor) -> None:
        """Store the teacher's ``query_embed [Nt, d]`` once; an existing file must hold the same tensor."""
        q = query_embed.detach().to("cpu").contiguous()
        path = self.root / QUERIES
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                old = f.get_tensor("query_embed") if "query_embed" in f.keys() else None
            if old is None or old.dtype != q.dtype or old.shape != q.shape or not torch.equal(old, q):
                raise CacheError(f"{path} holds other teacher queries than this teacher's query_embed "
                                 f"{tuple(q.shape)} {q.dtype}: delete the cache folder to rebuild it")
            return
        meta = self._metadata()
        try:
            atomic_write(path, lambda tmp: save_file({"query_embed": q}, tmp, metadata=meta))
        except (OSError, SafetensorError) as e:
            raise _write_error(path, "queries file", e) from None

    def _metadata(self, **extra: Any) -> dict[str, str]:
        meta = {"format": CACHE_FORMAT, "format_version": str(FORMAT_VERSION),
                "plan_fingerprint": str(self.manifest["plan"].get("fingerprint", "")),
                "teacher_sha256": str(self.manifest["teacher"].get("checkpoint_sha256", ""))}
        meta.update({k: str(v) for k, v in extra.items()})
        return meta

    def write_shard(self, name: str, view: int, entries: Mapping[int, Mapping[str, Tensor]],
                    image_ids: list[int]) -> dict[str, Any]:
        """Write shard ``name`` with the entries of view ``view`` of some images (``i -> tensors of
        encode_batch`` of that view alone), then list it in the manifest.

        Args:
            name: file name inside the cache, e.g. ``shard-00012.safetensors`` (the caller decides
                which image views go in which shard).
            entries: dataset index ``i`` -> the stored tensors of view ``view`` of image ``i``.
            image_ids: the dataset image ids of those images, in the order of ``sorted(entries)`` (for
                ``cache info`` and debugging).
        Returns:
            the manifest entry ``{"file", "sha256", "bytes", "view", "images", "image_ids"}``.
        """
        if not _SHARD_NAME.match(name) or name == QUERIES:
            raise ValueError(f"shard name must be a plain '<name>.safetensors' file name, got {name!r}")
        if not entries:
            raise ValueError(f"shard {name}: no image views to write")
        view = int(view)
        required = batch_keys(self.store)
        tensors: dict[str, Tensor] = {}
        for i, entry in sorted(entries.items()):
            i = int(i)
            missing = [k for k in required if k not in entry]
            if missing:
                raise ValueError(f"shard {name}: view {view} of image {i} lacks {missing} "
                                 f"(store {self.store.spec} needs {list(required)})")
            if entry["image_index"].numel() != 1 or int(entry["image_index"].reshape(-1)[0]) != i:
                raise ValueError(f"shard {name}: the entry of image {i} holds image_index "
                                 f"{entry['image_index'].tolist()} (one view alone, of image {i}, expected)")
            for k, t in entry.items():
                tensors[f"i{i}.{k}"] = t.detach().to("cpu").contiguous()
        images = sorted(int(i) for i in entries)
        if len(image_ids) != len(images):
            raise ValueError(f"shard {name}: {len(image_ids)} image_ids for {len(images)} image views")
        with self._lock:
            listed = {e["file"] for e in self.manifest["shards"]}
            if name in listed:
                raise CacheError(f"{self.root / name} is already complete (shards are write-once)")
            taken = {(int(i), int(e["view"])): e["file"] for e in self.manifest["shards"] for i in e["images"]}
            dup = [i for i in images if (i, view) in taken]
            if dup:
                raise CacheError(f"shard {name}: view {view} of images {dup} is already in "
                                 f"{sorted({taken[(i, view)] for i in dup})}")

        digest: dict[str, Any] = {}

        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata=self._metadata(view=view, images=json.dumps(images)))
            digest["sha256"] = sha256_file(tmp)  # hashed before the rename, from the page cache
            digest["bytes"] = os.path.getsize(tmp)

        # A file of this name on disk but not in the manifest is a leftover of a crash between the
        # rename and the manifest write (or of a failed manifest write): it was never visible,
        # overwriting it is fine. atomic_write removes its temporary file on any error.
        if self._folder_lock is None:
            raise CacheError(f"the cache writer of {self.root} was closed: open a new CacheWriter to write")
        try:
            atomic_write(self.root / name, write)
        except (OSError, SafetensorError) as e:
            raise _write_error(self.root / name, "shard", e) from None
        entry = {"file": name, "sha256": digest["sha256"], "bytes": digest["bytes"], "view": view,
                 "images": images, "image_ids": [int(i) for i in image_ids]}
        with self._lock:
            self.manifest["shards"].append(entry)
            try:
                self._write_manifest()
            except BaseException:
                self.manifest["shards"].remove(entry)  # the manifest on disk does not list it either
                raise
        return entry
