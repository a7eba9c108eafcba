"""The encoder-state cache's value format: raw little-endian arrays after a struct header, never pickle.

A value is bound to the model that wrote it: its header carries a digest of the bundle fingerprint
and the shapes ``T, D, Dr`` and dtype, and a reader accepts it only when all of them equal the
:class:`StateSpec` the serving model expects for that request (``T`` = the request's history length),
the length matches, the mask is 0/1 with a real item and every float lies within the model's range
(``StateSpec.max_abs``: the bound the exporter recorded in the manifest's ``state_bounds``, or
``DEFAULT_STATE_BOUND`` for a bundle without one; training/state_bounds.py). With
``GENRET_CACHE_HMAC_KEY`` set, an HMAC-SHA256 over the Redis key and the value closes it, so a value
written by anyone without the key — or copied under another user's key — is refused. The caches in
:mod:`service.cache.state_cache` treat anything refused as a miss (counted ``invalid``, deleted, recomputed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.metrics import CACHE_RESULTS

log = logging.getLogger(__name__)

_MAGIC = b"GRS2"
_VERSION = 2
_DTYPE_F32 = 1
_FLAG_HMAC = 1
# magic, version, dtype code, flags, (pad), T, D, Dr, blake2b-128 of the bundle fingerprint
_HEADER = struct.Struct("<4sBBBxIII16s")
_TAG_BYTES = hashlib.sha256().digest_size
# For bundles exported without ``state_bounds``: far above what a normalised encoder produces (its
# outputs are O(1)-O(10)), far below where float32 scores overflow (3.4e38 / (Dr * |item_emb|)).
DEFAULT_STATE_BOUND = 1e4


class CacheFormatError(ValueError):
    """A cached value is not one the serving model can use (header, length, shapes, tag, values)."""


@dataclass(frozen=True)
class StateRow:
    """The encoder states of one request row."""

    memory: np.ndarray  # [T, D] float32
    memory_mask: np.ndarray  # [T] bool
    query: np.ndarray  # [Dr] float32


@dataclass(frozen=True)
class StateSpec:
    """What a cached row must be for the serving model to use it."""

    fingerprint: str  # the bundle's manifest fingerprint
    length: int  # T: the request's (truncated) history length
    memory_dim: int  # D
    query_dim: int  # Dr
    max_abs: float = DEFAULT_STATE_BOUND  # largest |value| the model's encoder can produce

    def value_bytes(self, signed: bool) -> int:
        """The exact size of a valid cached value for this spec (a reader never reads more)."""
        t, d, dr = self.length, self.memory_dim, self.query_dim
        return _HEADER.size + 4 * t * d + t + 4 * dr + (_TAG_BYTES if signed else 0)

    def check_range(self, row: StateRow) -> None:
        """Raise :class:`CacheFormatError` unless every value is finite and within ``max_abs``."""
        for name, values in (("memory", row.memory), ("query", row.query)):
            if not (np.abs(values) <= self.max_abs).all():  # NaN compares False: refused too
                raise CacheFormatError(
                    f"cached {name} holds values beyond the model's range |x| <= {self.max_abs:g}"
                )

    def check(self, row: StateRow) -> None:
        """Raise :class:`CacheFormatError` unless ``row`` has exactly this spec's shapes."""
        t, d, dr = self.length, self.memory_dim, self.query_dim
        got = (row.memory.shape, row.memory_mask.shape, row.query.shape)
        if got != ((t, d), (t,), (dr,)):
            raise CacheFormatError(f"row shapes {got} differ from the model's ({t}, {d}), ({t},), ({dr},)")


def fingerprint_digest(fingerprint: str) -> bytes:
    return hashlib.blake2b(fingerprint.encode(), digest_size=16).digest()


def _tag(hmac_key: bytes, key: str, body: bytes) -> bytes:
    # the Redis key is signed with the value: a value copied under another key does not verify
    return hmac.new(hmac_key, key.encode() + b"\0" + body, hashlib.sha256).digest()


def encode_state(row: StateRow, spec: StateSpec, *, key: str = "", hmac_key: bytes | None = None) -> bytes:
    """Header + memory (f32 LE) + mask (u8) + query (f32 LE) [+ HMAC tag over key and all before it]."""
    spec.check(row)
    spec.check_range(row)
    t, d, dr = spec.length, spec.memory_dim, spec.query_dim
    flags = _FLAG_HMAC if hmac_key is not None else 0
    body = b"".join(
        (
            _HEADER.pack(_MAGIC, _VERSION, _DTYPE_F32, flags, t, d, dr, fingerprint_digest(spec.fingerprint)),
            np.ascontiguousarray(row.memory, dtype="<f4").tobytes(),
            np.ascontiguousarray(row.memory_mask, dtype=np.uint8).tobytes(),
            np.ascontiguousarray(row.query, dtype="<f4").tobytes(),
        )
    )
    return body if hmac_key is None else body + _tag(hmac_key, key, body)


def decode_state(data: bytes, spec: StateSpec, *, key: str = "", hmac_key: bytes | None = None) -> StateRow:
    """Inverse of :func:`encode_state`; raises :class:`CacheFormatError` unless ``data`` is a value
    for ``spec`` (same fingerprint and shapes), complete, finite and (with ``hmac_key``) signed."""
    if len(data) < _HEADER.size:
        raise CacheFormatError(f"cached value of {len(data)} bytes is shorter than the header")
    magic, version, dtype, flags, t, d, dr, fp = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or dtype != _DTYPE_F32:
        raise CacheFormatError(f"bad header magic={magic!r} version={version} dtype={dtype}")
    if not hmac.compare_digest(fp, fingerprint_digest(spec.fingerprint)):
        raise CacheFormatError("cached value was written by another bundle (fingerprint differs)")
    if (t, d, dr) != (spec.length, spec.memory_dim, spec.query_dim):
        raise CacheFormatError(
            f"cached shapes T={t} D={d} Dr={dr} differ from the model's "
            f"T={spec.length} D={spec.memory_dim} Dr={spec.query_dim}"
        )
    signed = bool(flags & _FLAG_HMAC)
    if signed != (hmac_key is not None) or flags & ~_FLAG_HMAC:
        raise CacheFormatError(f"cached value flags={flags} do not match this cache's signing setting")
    size = spec.value_bytes(signed=False)
    if len(data) != size + (_TAG_BYTES if signed else 0):
        raise CacheFormatError(f"cached value has {len(data)} bytes, its header says {size} (+ tag)")
    if hmac_key is not None and not hmac.compare_digest(data[size:], _tag(hmac_key, key, data[:size])):
        raise CacheFormatError("cached value's HMAC does not verify")
    off = _HEADER.size
    memory = np.frombuffer(data, dtype="<f4", count=t * d, offset=off).reshape(t, d)  # [T, D]
    off += 4 * t * d
    mask = np.frombuffer(data, dtype=np.uint8, count=t, offset=off)  # [T]
    off += t
    query = np.frombuffer(data, dtype="<f4", count=dr, offset=off)  # [Dr]
    if mask.max(initial=0) > 1 or not mask.any():
        raise CacheFormatError("cached memory_mask is not 0/1 with at least one real item")
    row = StateRow(
        memory=memory.astype(np.float32), memory_mask=mask.astype(bool), query=query.astype(np.float32)
    )
    spec.check_range(row)
    return row


def history_hash(dense_history: np.ndarray) -> str:
    """A short stable digest of the (already truncated) dense history."""
    return hashlib.blake2b(
        np.ascontiguousarray(dense_history, dtype="<i8").tobytes(), digest_size=16
    ).hexdigest()


def cache_key(fingerprint: str, user_key: str, dense_history: np.ndarray) -> str:
    return f"genret:{fingerprint}:{user_key}:{history_hash(dense_history)}"


class StateCodec:
    """Encode/decode for one cache (its optional HMAC key), counting every lookup's result."""

    def __init__(self, hmac_key: bytes | None = None) -> None:
        self._hmac_key = hmac_key

    def encode(self, key: str, spec: StateSpec, row: StateRow) -> bytes:
        return encode_state(row, spec, key=key, hmac_key=self._hmac_key)

    def value_bytes(self, spec: StateSpec) -> int:
        """The size of a valid value for ``spec`` in this cache (with its tag when signing)."""
        return spec.value_bytes(self._hmac_key is not None)

    def decode_many(
        self, keys: Sequence[str], specs: Sequence[StateSpec], values: Sequence[object]
    ) -> tuple[list[StateRow | None], list[str]]:
        """Rows for ``values`` (None = miss) and the keys whose values were refused (to delete)."""
        out: list[StateRow | None] = []
        invalid: list[str] = []
        for key, spec, value in zip(keys, specs, values, strict=True):
            if value is None:
                CACHE_RESULTS.labels(result="miss").inc()
                out.append(None)
                continue
            try:
                if not isinstance(value, bytes):  # the pool never decodes responses
                    raise CacheFormatError(f"expected bytes, got {type(value).__name__}")
                out.append(decode_state(value, spec, key=key, hmac_key=self._hmac_key))
                CACHE_RESULTS.labels(result="hit").inc()
            except CacheFormatError as exc:
                log.warning("cache value under %s refused, recomputing: %s", key, exc)
                CACHE_RESULTS.labels(result="invalid").inc()
                invalid.append(key)
                out.append(None)
        return out, invalid
