"""Reads a teacher cache (:class:`CacheReader`): memory-mapped shards, each checked against its manifest entry
the first time it is opened."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open
from torch import Tensor

from kd_detr.teacher.outputs import TeacherOutputs

from .attention_codec import StoreConfig, decode_batch
from .manifest import MANIFEST, QUERIES, CacheError, _diff, _header_mismatch, _read_manifest, _view_index, sha256_file

__all__ = ["CacheReader"]


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
