"""The on-disk teacher cache: a manifest plus write-once safetensors shards.

Layout of a cache folder (see ``docs/teacher_cache.md``)::

    manifest.json            the header (teacher, dataset, plan, store) + the list of complete shards
    queries.safetensors      the teacher's query_embed [Nt, d], stored once
    shard-00000.safetensors  tensors i{i}.{key}: the teacher's outputs for view k of images i (one k per shard)

One entry per (image, view): the teacher saw the view alone, so an entry does not depend on any batch and a
cache serves any batch size, number of processes and nodes (format version 2; version 1 stored padded
batches and is refused).

Consistency rules:

* **Single writer.** Only the process that owns the :class:`CacheWriter` writes ``manifest.json``
  (teacher actors return tensors; the builder's driver writes the shards and the manifest). Two
  writers on one folder would lose each other's manifest entries, so a writer holds an exclusive
  ``flock`` on ``<cache>/.lock`` for its life (:class:`CacheLock`); a second build fails at once.
* **Write-once shards, manifest last.** A shard is written to a temporary file, renamed into place,
  hashed, and only then listed in the manifest (rewritten atomically). A reader only sees listed
  shards, so a crash at any point leaves a valid (if incomplete) cache; a shard file on disk but not in
  the manifest was never visible and is simply written again when the build resumes. A resumed build
  checks the SHA-256 of every listed shard and rebuilds the ones that do not match.
* **Inside the folder.** Every file a manifest names must lie inside the cache folder (no absolute
  paths, no ``..``, no symlink leading out): a reader never follows a manifest elsewhere.
* **The shard says what it holds.** Each shard's header records its view, images and plan fingerprint; a
  reader compares them with the manifest entry when it opens the shard and refuses a mismatch (e.g. a manifest
  whose views were swapped), and a run refuses at start a cache lacking an image view it will read.
* **Verify reads only what it is given.** ``kd-detr cache verify`` hashes the cache's own files, and a teacher
  checkpoint or annotation file only when the user names it (:func:`verify_report`): the paths a manifest
  records are never opened on their own.
* **Same images.** The manifest fingerprints the training images (:func:`dataset_fingerprint`) as well
  as the annotation file; a run or a resumed build on changed images is refused (:func:`images_problem`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kd_detr.atomic import atomic_write, remove_stale_temp_files, write_json_atomic
from kd_detr.folder_lock import LOCK_NAME, FolderLock, FolderLockError, LockBusy, LockFileRefused, LockUnsupported
from kd_detr.teacher.outputs import TeacherOutputs

from .attention_codec import StoreConfig, batch_keys, decode_batch, store_section_defaults

log = logging.getLogger("kd_detr.teacher.cache")

__all__ = ["CACHE_FORMAT", "FORMAT_VERSION", "MANIFEST", "QUERIES", "LOCK", "IMAGES_FINGERPRINT", "CacheError",
           "CacheLock", "CacheWriter", "CacheReader", "verify_cache", "verify_report", "VerifyReport", "missing_views",
           "cache_info", "sha256_file",
           "dataset_fingerprint", "images_problem"]

CACHE_FORMAT = "kd-detr-teacher-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
QUERIES = "queries.safetensors"
LOCK = LOCK_NAME
IMAGES_FINGERPRINT = "images_fingerprint"  # key of the manifest's dataset section
HEADER_SECTIONS = ("teacher", "dataset", "plan", "store")

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


class CacheError(ValueError):
    """A teacher cache is missing, incomplete, corrupt, or was built for another teacher/data/plan."""


# ------------------------------------------------------------------------------------------ helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, name: Any, what: str, manifest_path: Path) -> Path:
    """``root / name`` when ``name`` (a path written in the manifest) is a relative path that stays inside
    the cache folder; else :class:`CacheError` naming the manifest and the entry. A manifest is data: an
    absolute path, a ``..`` or a symlink out of the folder would make the reader (and ``cache verify``)
    serve or bless a file that no build wrote."""
    if not isinstance(name, str) or not name:
        raise CacheError(f"{manifest_path}: {what} has no file name ({name!r}): rebuild the cache with `kd-detr cache`")
    pure = PurePosixPath(name)
    if pure.is_absolute() or os.path.isabs(name):
        why = "an absolute path"
    elif ".." in pure.parts or ".." in Path(name).parts:
        why = "a path with '..'"
    else:
        path = root / name
        real, base = path.resolve(), root.resolve()
        if real != base and base in real.parents:
            return path
        why = f"a path that resolves to {real}"
    raise CacheError(f"{manifest_path}: {what} names {name!r}, {why} outside the cache folder {root}: a cache only "
                     f"reads files inside its folder; rebuild the cache with `kd-detr cache`")


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


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 over each image's file name, size in bytes and modification time (``st_mtime_ns``), in data
    set order: what a cache records of the training images (``dataset.images_fingerprint``).

    Cheap by design: one ``stat`` per image, no image is read (COCO train2017, 118k images, takes about a
    second on a local disk). It changes when an image is replaced, edited, added, removed or renamed
    under an unchanged annotation file. It also changes when the images are copied without their times
    (``cp`` without ``-p``; ``rsync -a`` and ``cp -p`` keep them): then the cache must be rebuilt although
    the pixels are the same. A missing image counts with size and time ``-1``.

    Args:
        dataset: a :class:`~kd_detr.data.CocoDetection` (its ``img_dir``, ``image_ids`` and JSON images).
    """
    names = {int(img["id"]): str(img["file_name"]) for img in dataset.coco.dataset["images"]}
    img_dir = Path(dataset.img_dir)
    h = hashlib.sha256()
    for image_id in dataset.image_ids:
        name = names[int(image_id)]
        try:
            st = os.stat(img_dir / name)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def images_problem(manifest: Mapping[str, Any], dataset: Any, *, fingerprint: Optional[str] = None,
                   fix: str = "rebuild the cache with `kd-detr cache`") -> Optional[str]:
    """``None`` when the cache of ``manifest`` was built from the images ``dataset`` holds now, else one
    line saying what differs and ``fix``. A cache written before image fingerprints existed is refused
    too (nothing tells whether its images changed).

    Args:
        fingerprint: ``dataset_fingerprint(dataset)`` when the caller has it already.
    """
    have = (manifest.get("dataset") or {}).get(IMAGES_FINGERPRINT)
    where = getattr(dataset, "img_dir", "the data set")
    if not have:
        return (f"images: the cache records no image fingerprint (dataset.{IMAGES_FINGERPRINT}: it was built by an "
                f"older kd-detr), so nothing tells whether the images in {where} changed since: {fix}")
    if have != (fingerprint or dataset_fingerprint(dataset)):
        return (f"images: the images in {where} changed since the cache was built (file names, sizes or modification "
                f"times differ from the manifest's dataset.{IMAGES_FINGERPRINT}): {fix}")
    return None


def _json_normal(obj: Any) -> Any:
    """What ``obj`` reads back as from JSON (tuples -> lists, int keys -> str), for comparisons."""
    return json.loads(json.dumps(obj, default=str))


_MISSING = "<missing>"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; non-dict (and empty dict) values are leaves."""
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _diff(cache: Mapping[str, Any], wanted: Mapping[str, Any], *, both_ways: bool) -> list[str]:
    """``key: cache has X, this run needs Y`` for each dotted key of ``wanted`` (and of ``cache`` when
    ``both_ways``) whose values differ."""
    cache, wanted = _json_normal(cache), _json_normal(wanted)
    keys = list(_flatten(wanted))
    if both_ways:
        keys += [k for k in _flatten(cache) if k not in keys]
    problems = []
    for key in keys:
        have, need = _lookup(cache, key), _lookup(wanted, key)
        if have != need:
            problems.append(f"{key}: cache has {have!r}, this run needs {need!r}")
    return problems


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CacheError(f"no teacher cache in {root} ({MANIFEST} not found): build it with `kd-detr cache`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not a kd-detr teacher cache manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {CACHE_FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        old = (" (version 1 stored the teacher's outputs per padded batch, valid only at the batch size it was "
               "built with; version 2 stores each image view alone and serves any batch size)"
               if manifest.get("format_version") == 1 else "")
        raise CacheError(f"{path}: cache format version {manifest.get('format_version')!r}, this kd-detr reads "
                         f"version {FORMAT_VERSION}{old}: rebuild the cache with `kd-detr cache`")
    missing = [k for k in (*HEADER_SECTIONS, "shards") if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks {missing}")
    if not isinstance(manifest["shards"], list):
        raise CacheError(f"{path}: 'shards' must be a list")
    if isinstance(manifest["store"], Mapping):
        # a cache written before the store gained a field reads as that field's "as before" value (e.g. no
        # class_topk: dense class logits), so it still compares equal to a build or run asking for that
        manifest["store"] = store_section_defaults(manifest["store"])
    for what, section, key in (("plan.num_views", "plan", "num_views"), ("dataset.images", "dataset", "images")):
        if isinstance(manifest[section], Mapping) and key in manifest[section]:
            _integer(manifest[section][key], what, path)
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, Mapping) or any(k not in entry for k in ("file", "sha256", "bytes", "view",
                                                                           "images", "image_ids")):
            raise CacheError(f"{path}: shard entry {i} lacks file/sha256/bytes/view/images/image_ids: {entry!r}")
        _inside(root, entry["file"], f"shard entry {i}", path)
        where = f"shard entry {i} ({entry['file']})"
        _integer(entry["view"], f"{where}: view", path)
        _integer(entry["bytes"], f"{where}: bytes", path)
        for key in ("images", "image_ids"):
            if not isinstance(entry[key], list):
                raise CacheError(f"{path}: {where}: {key} must be a list of integers, got {entry[key]!r}: "
                                 "rebuild the cache with `kd-detr cache`")
            for value in entry[key]:
                _integer(value, f"{where}: {key}", path)
    _inside(root, QUERIES, "the queries file", path)
    return manifest


def _integer(value: Any, what: str, manifest_path: Path) -> int:
    """``value`` when it is a JSON integer (not a bool, float or string), else a one-line :class:`CacheError`
    naming the manifest and the field: counts, views and image ids are used as indices."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheError(f"{manifest_path}: {what} must be an integer, got {value!r}: the manifest was edited or "
                         "damaged; rebuild the cache with `kd-detr cache`")
    return value


def _view_index(manifest: Mapping[str, Any], where: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """``(i, k) -> shard entry``; an image view listed twice is an error (which copy would be right?)."""
    index: dict[tuple[int, int], dict[str, Any]] = {}
    for entry in manifest["shards"]:
        for i in entry["images"]:
            key = (int(i), int(entry["view"]))
            if key in index:
                raise CacheError(f"{where / MANIFEST}: view {key[1]} of image {key[0]} is listed in both "
                                 f"{index[key]['file']} and {entry['file']}")
            index[key] = entry
    return index


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


# --------------------------------------------------------------------------------------------- lock


def _check_adoptable(root: Path) -> None:
    """Refuse to adopt a folder with foreign files (a mistyped path must not fill someone's folder);
    shard/queries/temp/lock files of a build that crashed before its first manifest write are fine."""
    if not root.exists():
        return
    if not root.is_dir():
        raise CacheError(f"{root} exists and is not a folder: give --out a new or empty folder")
    if (root / MANIFEST).exists():
        return
    foreign = [p.name for p in root.iterdir()
               if not (p.name in (QUERIES, LOCK) or _SHARD_NAME.match(p.name) or p.name.endswith(".tmp")
                       or _STALE_TEMP.match(p.name))]
    if foreign:
        raise CacheError(f"{root} is not empty and holds no teacher cache ({MANIFEST} missing; "
                         f"found {sorted(foreign)[:5]}): choose an empty or new folder")


def _acquire(root: Path) -> FolderLock:
    """Take the folder lock (:class:`~kd_detr.folder_lock.FolderLock`: exclusive, non-blocking, this pid written
    into ``root/.lock``, never through a link), then remove the temporary files a killed build left."""
    lock = FolderLock(root)
    try:
        lock.acquire()
    except LockBusy as e:
        raise CacheError(f"another kd-detr cache build is writing {root} (pid {e.holder}): wait for it, "
                         f"or use another --out") from None
    except LockFileRefused as e:
        raise CacheError(f"teacher cache {root}: {e}") from None
    except LockUnsupported as e:
        raise CacheError(f"{e}: build into a folder on a local disk") from None
    except FolderLockError as e:
        raise CacheError(str(e)) from None
    _remove_stale_temps(root)
    return lock


# temporary files of a write killed mid-way: atomic_write's ``.<name>.<8 chars>.tmp`` and safetensors'
# own ``.tmp`` plus six random characters
_STALE_TEMP = re.compile(r"^\..+\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def _remove_stale_temps(root: Path) -> None:
    """Remove the temporary files a killed build left in ``root``. Only right after the lock was taken by
    a process that held none: then no write of any process is in flight there."""
    for p in remove_stale_temp_files(root, pattern=_STALE_TEMP):
        log.info("teacher cache %s: removed %s, left by an interrupted write", root, p.name)


_held: dict[str, list] = {}  # real path of a cache folder -> [its FolderLock, holders in this process]
_held_guard = threading.Lock()


class CacheLock:
    """The exclusive folder lock (:class:`~kd_detr.folder_lock.FolderLock`, the one a training run takes on its
    output dir) on ``<cache>/.lock`` that makes a cache folder single-writer. A ``.lock`` that is not a regular
    file (a link to another file, ...) is refused naming it: nothing is written through it.

    Taken without waiting: while another process holds it, :class:`CacheError` says at once
    ``another kd-detr cache build is writing X (pid N)``. The kernel drops it when the holder exits
    (a crashed build leaves no stale lock; the ``.lock`` file itself stays, harmlessly). Within one
    process the lock is shared: a second :class:`CacheWriter` (or :func:`~kd_detr.teacher.cache.build.build_cache`
    and its writer) on the folder counts as the same holder, and the lock goes when the last one releases.

    Creates the folder if needed (after refusing one with foreign files).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        _check_adoptable(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {self.root}: {e.strerror}") from None
        key = os.path.realpath(self.root)
        with _held_guard:
            held = _held.get(key)
            if held is None:
                held = _held[key] = [_acquire(self.root), 0]
            held[1] += 1
        self._key: Optional[str] = key

    def release(self) -> None:
        """Give up this holder's share (idempotent)."""
        key, self._key = getattr(self, "_key", None), None
        if key is None:
            return
        with _held_guard:
            held = _held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del _held[key]
                held[0].release()

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown: the kernel drops the lock anyway
            pass


# ------------------------------------------------------------------------------------------- writer


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


# ------------------------------------------------------------------------------------------- reader


class CacheReader:
    """Reads a teacher cache (memory-mapped shards); picklable for DataLoader workers.

    Args:
        root: the cache folder.
        expect: a partial header (e.g. ``{"teacher": {"checkpoint_sha256": ...}, "plan": {"num_views": 4},
            "store": {"attention": "full"}}``): each dotted key must equal the manifest's, else
            :class:`CacheError` lists ``key: cache has X, this run needs Y``.
        verify_shards: check a shard's SHA-256 against the manifest the first time this reader (or
            worker process) opens it. Costs one read of the shard; ``False`` trusts the files.
    """

    def __init__(self, root: str | os.PathLike, expect: Optional[Mapping[str, Any]] = None,
                 verify_shards: bool = True):
        self.root = Path(root)
        self._manifest = _read_manifest(self.root)
        if expect:
            problems = _diff(self._manifest, expect, both_ways=False)
            if problems:
                raise CacheError(f"the teacher cache {self.root} does not match this run:\n  "
                                 + "\n  ".join(problems))
        self.store = StoreConfig.from_dict(self._manifest["store"])
        self.verify_shards = verify_shards
        self._index = _view_index(self._manifest, self.root)
        self._handles: dict[str, Any] = {}
        # per open shard: image prefix "i{i}." -> its tensor names (a shard's key list is scanned once, not
        # once per view read)
        self._names: dict[str, dict[str, list[str]]] = {}
        self._verified: set[str] = set()
        self._queries: Optional[Tensor] = None

    # -- pickling: safetensors handles (mmaps) do not cross processes; each worker reopens lazily

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_names"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- info

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def store_config(self) -> StoreConfig:
        return self.store

    def keys(self) -> list[tuple[int, int]]:
        """Every stored ``(i, k)`` (image index, view), sorted."""
        return sorted(self._index)

    def has(self, i: int, k: int) -> bool:
        return (int(i), int(k)) in self._index

    def missing(self, views: Iterable[tuple[int, int]], on_disk: bool = False) -> list[tuple[int, int]]:
        """The ``(i, k)`` of ``views`` that the cache does not hold, in the given order; ``on_disk``: also those
        its manifest lists in a shard file that is not there (one ``stat`` per shard)."""
        index = self._index
        if on_disk:
            present = {e["file"] for e in self._manifest["shards"] if (self.root / e["file"]).is_file()}
            index = {key: e for key, e in index.items() if e["file"] in present}
        return [(int(i), int(k)) for i, k in views if (int(i), int(k)) not in index]

    # -- data

    def _open(self, entry: Mapping[str, Any]) -> Any:
        name = entry["file"]
        handle = self._handles.get(name)
        if handle is not None:
            return handle
        path = self.root / name
        if not path.is_file():
            raise CacheError(f"teacher cache shard {path} is missing (listed in {MANIFEST}); "
                             f"run `kd-detr cache verify` / rebuild the cache")
        if self.verify_shards and name not in self._verified:
            sha = sha256_file(path)
            if sha != entry["sha256"]:
                raise CacheError(f"teacher cache shard {path} is corrupt: SHA-256 {sha} differs from the "
                                 f"manifest's {entry['sha256']}; rebuild it (delete the file and run "
                                 f"`kd-detr cache` again)")
            self._verified.add(name)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CacheError(f"cannot open teacher cache shard {path}: {e}") from None
        # the manifest says which view a shard holds, the shard's own header says it too: a manifest whose
        # entries were swapped would otherwise serve the teacher's outputs of another augmented view
        mismatch = _header_mismatch(handle.metadata() or {}, entry, self._manifest)
        if mismatch:
            raise CacheError(f"teacher cache shard {path}: {mismatch}; refused (the manifest does not describe "
                             f"this shard): rebuild the cache with `kd-detr cache`")
        names: dict[str, list[str]] = {}
        for key in handle.keys():
            names.setdefault(key[:key.find(".") + 1], []).append(key)
        self._handles[name], self._names[name] = handle, names
        return handle

    def entry(self, i: int, k: int) -> dict[str, Tensor]:
        """The stored tensors of view ``k`` of image ``i`` (keys of :func:`batch_keys`, CPU, ``B = 1``)."""
        entry = self._index.get((int(i), int(k)))
        if entry is None:
            raise CacheError(f"the teacher cache {self.root} is incomplete: it has no view {k} of image {i} "
                             f"(run `kd-detr cache` again to finish it)")
        handle = self._open(entry)
        prefix = f"i{int(i)}."
        names = self._names[entry["file"]].get(prefix, ())
        if not names:
            raise CacheError(f"teacher cache shard {self.root / entry['file']} has no tensors for view {k} "
                             f"of image {i} although {MANIFEST} lists it")
        return {name[len(prefix):]: handle.get_tensor(name) for name in names}

    def queries(self) -> Tensor:
        """The teacher's ``query_embed [Nt, d]``."""
        if self._queries is None:
            path = self.root / QUERIES
            if not path.is_file():
                raise CacheError(f"teacher cache {self.root} lacks {QUERIES}: rebuild it with `kd-detr cache`")
            with safe_open(str(path), framework="pt") as f:
                self._queries = f.get_tensor("query_embed")
        return self._queries

    def view_outputs(self, i: int, k: int) -> TeacherOutputs:
        """:class:`TeacherOutputs` (float32, CPU, ``B = 1``) of view ``k`` of image ``i``, as the teacher gave
        them for the view alone (cross-attention over the view's own C5 grid)."""
        return decode_batch(self.entry(i, k), self.store, self.queries())

    def close(self) -> None:
        self._handles.clear()
        self._names.clear()


# ----------------------------------------------------------------------------------- verify and info


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _header_mismatch(meta: Mapping[str, str], entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """What differs between a shard's own header metadata and its manifest entry ("" when they agree): format,
    view, plan fingerprint, and the images (a shard written by :meth:`CacheWriter.write_shard` records them)."""
    fingerprint = str(manifest["plan"].get("fingerprint", ""))
    have = {"format": meta.get("format"), "view": meta.get("view"), "plan": meta.get("plan_fingerprint")}
    want = {"format": CACHE_FORMAT, "view": str(entry["view"]), "plan": fingerprint}
    diff = [f"{k} {have[k]!r} (the manifest: {want[k]!r})" for k in have if have[k] != want[k]]
    if "images" in meta:
        try:
            images = [int(i) for i in json.loads(meta["images"])]
        except (ValueError, TypeError):
            images = None
        listed = [int(i) for i in entry["images"]]
        if images != listed:
            diff.append(f"images {_short(meta['images'])} (the manifest: {_short(json.dumps(listed))})")
    return f"its header says {', '.join(diff)}" if diff else ""


@dataclass
class VerifyReport:
    """What :func:`verify_report` found: integrity ``problems`` (empty: none), completeness (``present`` of
    ``total`` image views, the first ``missing`` ``(image, view)``), and ``unchecked``: what was not checked
    and how to check it."""

    root: Path
    problems: list[str] = field(default_factory=list)
    present: int = 0
    total: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.present == self.total

    def completeness(self) -> str:
        """``complete (M views)`` or ``incomplete: N of M views present (first missing: ...); ...``."""
        if self.complete:
            return f"complete ({self.total} image views)"
        first = ", ".join(f"view {k} of image {i}" for i, k in self.missing[:3])
        return (f"incomplete: {self.present} of {self.total} image views present"
                + (f" (first missing: {first})" if first else "")
                + "; finish it: rerun `kd-detr cache` with the same options")


def _expected_views(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """``(images, views per image)`` the manifest's plan covers."""
    plan, dataset = manifest["plan"], manifest["dataset"]
    images = plan.get("num_images", dataset.get("images")) if isinstance(plan, Mapping) else None
    views = plan.get("num_views") if isinstance(plan, Mapping) else None
    return (images if isinstance(images, int) and not isinstance(images, bool) else 0,
            views if isinstance(views, int) and not isinstance(views, bool) else 0)


def missing_views(manifest: Mapping[str, Any], index: Mapping[tuple[int, int], Any],
                  views: Optional[Iterable[tuple[int, int]]] = None) -> list[tuple[int, int]]:
    """The ``(image, view)`` of ``views`` (default: every view of the plan, view 0 of every image first) that
    ``index`` (:func:`_view_index`) does not hold."""
    if views is None:
        n, k = _expected_views(manifest)
        views = ((i, v) for v in range(k) for i in range(n))
    return [(int(i), int(k)) for i, k in views if (int(i), int(k)) not in index]


def _inside_folder(path: Path, folder: Path) -> bool:
    real, base = path.resolve(), folder.resolve()
    return real != base and base in real.parents


def _teacher_sha256(path: Path) -> str:
    from ..loading import teacher_weights_sha256

    class _Spec:  # teacher_weights_sha256 reads only the checkpoint path (a file, or an hf: folder)
        checkpoint = path
    return teacher_weights_sha256(_Spec())


def verify_report(root: str | os.PathLike, *, checkpoint: Optional[str | os.PathLike] = None,
                  annotations: Optional[str | os.PathLike] = None,
                  data: Optional[str | os.PathLike] = None) -> VerifyReport:
    """Check a cache folder without a teacher (what ``kd-detr cache verify`` prints).

    Checks: the manifest parses and has this format; ``queries.safetensors`` is present and readable;
    every listed shard is present with the listed size and SHA-256, its header metadata names the same
    view, images and plan fingerprint, and it holds every tensor of every listed view; how many of the plan's
    image views are present (:attr:`VerifyReport.complete`).

    Files outside the cache folder are read only when the caller names them: ``checkpoint`` (the teacher, by
    SHA-256 against ``teacher.checkpoint_sha256``), ``annotations`` (against ``dataset.annotations_sha256``),
    or ``data``, a data folder: the manifest's annotation file is hashed when it lies inside it. The paths a
    manifest records are data, not instructions: they are never opened on their own (a manifest could name
    any file on the machine); what was not checked is listed in :attr:`VerifyReport.unchecked`.
    """
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = _read_manifest(root)
        index = _view_index(manifest, root)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    problems = report.problems
    try:
        store = StoreConfig.from_dict(manifest["store"])
    except ValueError as e:
        problems.append(f"{root / MANIFEST}: bad store section: {e}")
        return report
    n, k = _expected_views(manifest)
    report.total = n * k
    outside = sorted((i, v) for i, v in index if not (0 <= i < n and 0 <= v < k))
    if outside:
        problems.append(f"{root / MANIFEST}: lists image views outside its plan of {n} images x {k} views "
                        f"(first: view {outside[0][1]} of image {outside[0][0]})")
    on_disk = {key: e for key, e in index.items() if (root / e["file"]).is_file()}  # a deleted shard's views are absent
    report.missing = missing_views(manifest, on_disk)
    report.present = report.total - len(report.missing)
    qpath = root / QUERIES
    if not qpath.is_file():
        problems.append(f"{qpath}: missing")
    else:
        try:
            with safe_open(str(qpath), framework="pt") as f:
                if "query_embed" not in f.keys():
                    problems.append(f"{qpath}: no query_embed tensor")
        except Exception as e:
            problems.append(f"{qpath}: unreadable ({e})")
    _check_sources(manifest, report, checkpoint, annotations, data)
    required = batch_keys(store)
    for entry in manifest["shards"]:
        path = root / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{entry['file']}: {size} bytes, the manifest says {entry['bytes']}")
            continue
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            problems.append(f"{entry['file']}: SHA-256 {sha} differs from the manifest's {entry['sha256']}")
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
        except Exception as e:
            problems.append(f"{entry['file']}: unreadable ({e})")
            continue
        mismatch = _header_mismatch(meta, entry, manifest)
        if mismatch:
            problems.append(f"{entry['file']}: {mismatch}")
        for i in entry["images"]:
            lacking = [k for k in required if f"i{i}.{k}" not in keys]
            if lacking:
                problems.append(f"{entry['file']}: view {entry['view']} of image {i} lacks {lacking}")
    return report


def _check_sources(manifest: Mapping[str, Any], report: VerifyReport, checkpoint, annotations, data) -> None:
    """Compare the teacher checkpoint and the annotation file the caller named with the manifest's SHA-256."""
    teacher, dataset = manifest.get("teacher") or {}, manifest.get("dataset") or {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            report.problems.append(f"{path}: the teacher checkpoint to check does not exist")
        elif teacher.get("checkpoint_sha256") and _teacher_sha256(path) != teacher["checkpoint_sha256"]:
            report.problems.append(f"{path}: not the teacher checkpoint the cache was built from (SHA-256 differs "
                                   "from the manifest's teacher.checkpoint_sha256): use that checkpoint, or "
                                   "rebuild the cache")
    else:
        report.unchecked.append(f"the teacher checkpoint (the manifest names {teacher.get('checkpoint')!r}; pass "
                                "--teacher-checkpoint to check it against its recorded SHA-256)")
    ann = Path(annotations) if annotations is not None else None
    recorded = dataset.get("annotations")
    if ann is None and data is not None and isinstance(recorded, str) and recorded:
        if _inside_folder(Path(recorded), Path(data)):
            ann = Path(recorded)
        else:
            report.unchecked.append(f"the annotation file: the manifest names {recorded!r}, outside --data "
                                    f"{data} (pass --train-ann to check a file)")
            return
    if ann is None:
        report.unchecked.append(f"the annotation file (the manifest names {recorded!r}; pass --data or --train-ann "
                                "to check it against its recorded SHA-256)")
    elif not ann.is_file():
        report.problems.append(f"{ann}: the annotation file to check does not exist")
    elif dataset.get("annotations_sha256") and sha256_file(ann) != dataset["annotations_sha256"]:
        report.problems.append(f"{ann}: the annotation file changed since the cache was built (SHA-256 differs "
                               "from the manifest's dataset.annotations_sha256): the cache is stale, rebuild it")
    report.unchecked.append("the training images (a run checks them against dataset.images_fingerprint)")


def verify_cache(root: str | os.PathLike, **sources: Any) -> list[str]:
    """The integrity problems :func:`verify_report` finds (empty: none); an incomplete cache has none (see
    :attr:`VerifyReport.complete`). ``sources``: ``checkpoint``, ``annotations``, ``data`` of
    :func:`verify_report`."""
    return verify_report(root, **sources).problems


def cache_info(root: str | os.PathLike) -> str:
    """A human summary of a cache folder (no hashing: use :func:`verify_cache` for integrity)."""
    root = Path(root)
    m = _read_manifest(root)
    store = StoreConfig.from_dict(m["store"])
    teacher, dataset, plan = m["teacher"], m["dataset"], m["plan"]
    shards = m["shards"]
    image_views = sum(len(e["image_ids"]) for e in shards)
    shard_bytes = sum(int(e["bytes"]) for e in shards)
    qpath = root / QUERIES
    total = shard_bytes + (qpath.stat().st_size if qpath.is_file() else 0) \
        + (root / MANIFEST).stat().st_size
    per_view: dict[int, int] = {}
    for e in shards:
        per_view[int(e["view"])] = per_view.get(int(e["view"]), 0) + len(e["images"])
    sha = str(teacher.get("checkpoint_sha256") or "")
    lines = [
        f"teacher cache {root}",
        f"  teacher:  {teacher.get('name', '?')} ({teacher.get('model', '?')}), checkpoint "
        f"{teacher.get('checkpoint', '?')} sha256 {sha[:12] or '?'}",
        f"  dataset:  {dataset.get('annotations', '?')}, {dataset.get('images', '?')} images"
        + (f" in {dataset['image_dir']}" if dataset.get("image_dir") else "")
        + (f", image fingerprint {str(dataset[IMAGES_FINGERPRINT])[:12]}" if dataset.get(IMAGES_FINGERPRINT)
           else ", no image fingerprint (older cache: rebuild it to distil from it)"),
        f"  plan:     K={plan.get('num_views', '?')} views per image (one entry per image view: any batch "
        f"size), seed {plan.get('seed', '?')}, fingerprint {str(plan.get('fingerprint', '?'))[:12]}",
        f"  store:    {store.describe()}",
        f"  content:  {len(shards)} shards, {image_views} image views"
        + (f" (images per view: {', '.join(f'{v}: {n}' for v, n in sorted(per_view.items()))})"
           if per_view else ""),
        f"  size:     {_human(total)} total ({total} bytes), "
        + (f"{_human(shard_bytes / image_views)} per image view" if image_views else "no image views yet"),
    ]
    return "\n".join(lines)
