"""Teacher cache: teacher outputs on a fixed view plan, stored once and replayed by distillation
(:class:`~kd_detr.teacher.sources.CacheSource`).

Storage layer (see ``docs/teacher_cache.md``): ``manifest`` (the format, the manifest, hashing and paths),
``fingerprint`` (the training images' fingerprint), ``lock`` (one writer per folder), ``writer``, ``reader``,
``verify`` (``cache verify`` / ``cache info``), and the tensor codecs ``attention_codec`` and ``class_codec``.
"""

from .attention_codec import (StoreConfig, batch_keys, bytes_per_view, decode_attention, decode_batch,
                              encode_attention, encode_batch, feature_bytes)
from .manifest import CACHE_FORMAT, FORMAT_VERSION, CacheError, sha256_file
from .reader import CacheReader
from .verify import VerifyReport, cache_info, missing_views, verify_cache, verify_report
from .writer import CacheWriter

__all__ = ["StoreConfig", "batch_keys", "bytes_per_view", "decode_attention", "decode_batch", "encode_attention",
           "encode_batch", "feature_bytes", "CACHE_FORMAT", "FORMAT_VERSION", "CacheError", "CacheReader", "CacheWriter",
           "cache_info", "sha256_file", "verify_cache", "verify_report", "VerifyReport",
           "missing_views"]
