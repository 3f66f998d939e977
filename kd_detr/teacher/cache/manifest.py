"""The teacher cache's on-disk format: names, the manifest (read, validated, compared), hashing and the rule
that a manifest only names files inside its folder.

Layout of a cache folder (see ``docs/teacher_cache.md``)::

    manifest.json            the header (teacher, dataset, plan, store) + the list of complete shards
    queries.safetensors      the teacher's query_embed [Nt, d], stored once
    shard-00000.safetensors  tensors i{i}.{key}: the teacher's outputs for view k of images i (one k per shard)

One entry per (image, view): the teacher saw the view alone, so an entry does not depend on any batch and a
cache serves any batch size, number of processes and nodes (format version 2; version 1 stored padded
batches and is refused).

Consistency rules:

* **Single writer.** Only the process that owns the :class:`~.writer.CacheWriter` writes ``manifest.json``
  (teacher actors return tensors; the builder's driver writes the shards and the manifest). Two
  writers on one folder would lose each other's manifest entries, so a writer holds an exclusive
  ``flock`` on ``<cache>/.lock`` for its life (:class:`~.lock.CacheLock`); a second build fails at once.
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
  checkpoint or annotation file only when the user names it (:func:`~.verify.verify_report`): the paths a
  manifest records are never opened on their own.
* **Same images.** The manifest fingerprints the training images (:func:`~.fingerprint.dataset_fingerprint`)
  as well as the annotation file; a run or a resumed build on changed images is refused
  (:func:`~.fingerprint.images_problem`).

This module holds the format; the lock is :mod:`.lock`, the writer :mod:`.writer`, the reader :mod:`.reader`,
``cache verify``/``cache info`` :mod:`.verify`, and the image fingerprint :mod:`.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kd_detr.errors import UserError
from kd_detr.folder_lock import LOCK_NAME

from .attention_codec import store_section_defaults

__all__ = ["CACHE_FORMAT", "FORMAT_VERSION", "MANIFEST", "QUERIES", "LOCK", "IMAGES_FINGERPRINT", "HEADER_SECTIONS",
           "CacheError", "sha256_file"]

CACHE_FORMAT = "kd-detr-teacher-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
QUERIES = "queries.safetensors"
LOCK = LOCK_NAME
IMAGES_FINGERPRINT = "images_fingerprint"  # key of the manifest's dataset section
HEADER_SECTIONS = ("teacher", "dataset", "plan", "store")

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


class CacheError(UserError, ValueError):
    """A teacher cache is missing, incomplete, corrupt, or was built for another teacher/data/plan."""


# ---------------------------------------------------------------------------------- hashing, paths


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


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _header_mismatch(meta: Mapping[str, str], entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """What differs between a shard's own header metadata and its manifest entry ("" when they agree): format,
    view, plan fingerprint, and the images (a shard written by :meth:`~.writer.CacheWriter.write_shard` records
    them)."""
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
