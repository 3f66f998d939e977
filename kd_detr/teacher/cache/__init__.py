"""Teacher cache: teacher outputs on a fixed view plan, stored once and replayed by distillation
(:class:`~kd_detr.teacher.sources.CacheSource`).

Storage layer (this package's ``store`` and ``attention_codec``); see ``docs/teacher_cache.md``.
"""

from .attention_codec import (StoreConfig, batch_keys, bytes_per_view, decode_attention, decode_batch,
                              encode_attention, encode_batch)
from .store import (CACHE_FORMAT, FORMAT_VERSION, CacheError, CacheReader, CacheWriter, cache_info,
                    sha256_file, verify_cache, verify_report, VerifyReport, missing_views)

__all__ = ["StoreConfig", "batch_keys", "bytes_per_view", "decode_attention", "decode_batch", "encode_attention",
           "encode_batch", "CACHE_FORMAT", "FORMAT_VERSION", "CacheError", "CacheReader", "CacheWriter",
           "cache_info", "sha256_file", "verify_cache", "verify_report", "VerifyReport",
           "missing_views"]
