"""The delta directory of one bundle, which every replica sees (docs/live_catalogue.md).

Layout: ``{GENRET_CATALOGUE_DIR or the bundle directory's parent}/{bundle dir name}.deltas/``
holding ``000001.json``, ``000002.json``, ... (the file *sequence*), each::

    {"base_fingerprint": "<the bundle's>", "version": n, "created_at": <unix s>, "delta": <Delta.to_json()>}

* Order: files apply in sequence order. A file whose ``base_fingerprint`` is not the serving
  bundle's belongs to another version of the bundle and is skipped with a log line (a new bundle
  version starts at catalogue version 0 and continues the sequence after the old files). The
  catalogue version is the number of this bundle's deltas applied; ``version`` in a file is the
  version its writer meant (a mismatch is logged).
* Claiming the next sequence number is atomic across replicas and processes: the file is written
  under a hidden temporary name, then hard-linked (``os.link``) to its final name, which fails when
  another writer took that number first; the writer then catches up (applies the other file) and
  tries the next number. A file is therefore never seen half-written.
* Files that are not ``NNNNNN.json`` (hidden temporaries, editors' backups) are ignored; a delta
  shipped beside a bundle by a rollout is just one more file here (write it under a hidden name
  and rename it, as for bundles).
* A file is read and parsed without trusting it (:mod:`service.catalogue.records`: regular files
  only, never a blocking open, a size limit, any parse error a *fault*). A file that cannot be read
  or applied is **quarantined** by this process: remembered (by sequence number) with its reason,
  logged once, never read again, and passed over, so the files behind it still apply. Nothing in
  the shared directory is renamed or deleted: a file renamed away would free its number for a
  writer that has not seen it yet, and replicas that had passed it would then skip the new file
  while the others apply it. Because a fault depends only on the file's bytes and the version
  before it, every replica quarantines the same files; a restart reads them again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from models.catalogue import carried
from models.catalogue.delta import Delta
from models.catalogue.placement import Placement
from service.catalogue.records import Fault, parse, read_bytes

log = logging.getLogger(__name__)

FILE = re.compile(r"(\d{6,})\.json")
SUFFIX = ".deltas"
MAX_FILE_BYTES = 512 * 1_048_576  # GENRET_CATALOGUE_MAX_FILE_BYTES' default
MAX_ITEMS = 100_000  # GENRET_MAX_DELTA_ITEMS' default


class DeltaLog(Protocol):
    """The ordered log replicas share: :class:`DeltaStore` (a directory) or
    :class:`service.catalogue.stream.StreamLog` (a Redis Stream)."""

    @property
    def where(self) -> str: ...
    def sequences(self, after: int = 0) -> list[int]: ...
    def lag(self, after: int) -> int: ...
    def pending(self, after: int) -> list[DeltaFile]: ...
    def report(self, f: DeltaFile, reason: str) -> None: ...
    def quarantine(self, f: DeltaFile, reason: str, detail: str) -> bool: ...
    def claim(
        self,
        seq: int,
        fingerprint: str,
        version: int,
        delta: Delta,
        placement: Sequence[Placement] | None = None,
    ) -> object: ...


class SequenceTaken(Exception):
    """Another writer claimed this sequence number first: catch up and retry."""


@dataclass(frozen=True)
class DeltaFile:
    """One file of the directory, read and parsed (``delta is None``: a fault, ``reason`` and ``error``
    say which, :data:`service.catalogue.records.REASONS`)."""

    seq: int
    path: Path
    base_fingerprint: str
    version: int
    delta: Delta | None
    error: str = ""
    reason: str = ""
    placement: list[Placement] | None = None  # where its writer placed the added items, when carried


def delta_dir(bundle_path: Path, catalogue_dir: Path | None) -> Path:
    """Where the deltas of the bundle at ``bundle_path`` live (module docstring)."""
    bundle_path = Path(bundle_path)
    root = catalogue_dir if catalogue_dir is not None else bundle_path.resolve().parent
    return Path(root) / f"{bundle_path.name}{SUFFIX}"


def file_name(seq: int) -> str:
    return f"{seq:06d}.json"


class DeltaStore:
    """The delta directory of one bundle (module docstring); safe to share between processes."""

    def __init__(self, directory: Path, max_bytes: int = MAX_FILE_BYTES, max_items: int = MAX_ITEMS) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._reported: set[tuple[int, str]] = set()  # (seq, reason) already logged
        self._written: dict[int, DeltaFile] = {}  # files this process wrote, not yet read back
        self._quarantined: dict[int, DeltaFile] = {}  # seq -> the fault, never read again

    @property
    def where(self) -> str:
        """The log, as error messages name it."""
        return f"the delta directory {self.directory}"

    def sequences(self, after: int = 0) -> list[int]:
        """Sequence numbers of the delta files past ``after``, ascending (none while the directory
        cannot be listed: logged once, the replica keeps its version)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._warn_once(-1, f"cannot list {self.directory}: {exc.strerror or exc}")
            return []
        found = sorted(int(m.group(1)) for n in names if (m := FILE.fullmatch(n)))
        return [s for s in found if s > after]

    def lag(self, after: int) -> int:
        """Files past sequence ``after``: published deltas a replica at ``after`` has not taken."""
        return len(self.sequences(after))

    def read(self, seq: int) -> DeltaFile:
        """File ``seq``, parsed; a fault comes back with ``delta=None``, its reason and detail (a
        quarantined file as it was, without reading it again). Never raises."""
        own = self._written.pop(seq, None)
        if own is not None:  # written here a moment ago: the parsed delta, not the file again
            return own
        known = self._quarantined.get(seq)
        if known is not None:
            return known
        path = self.directory / file_name(seq)
        try:
            got = parse(read_bytes(path, self.max_bytes), self.max_items)
        except Fault as fault:
            return DeltaFile(seq, path, "", 0, None, error=fault.detail, reason=fault.reason)
        return DeltaFile(seq, path, got.base_fingerprint, got.version, got.delta, placement=got.placement)

    def pending(self, after: int) -> list[DeltaFile]:
        """The files past sequence ``after``, in order, parsed (damaged ones with ``delta=None``)."""
        return [self.read(seq) for seq in self.sequences(after)]

    def report(self, f: DeltaFile, reason: str) -> None:
        """Log why file ``f`` is skipped, once per (file, reason)."""
        self._warn_once(f.seq, f"catalogue delta {f.path} skipped: {reason}")

    def quarantine(self, f: DeltaFile, reason: str, detail: str) -> bool:
        """Set file ``f`` aside (module docstring): logged once with its version and reason; True
        the first time (the caller counts it), False for a file already set aside."""
        if f.seq in self._quarantined:
            return False
        self._quarantined[f.seq] = replace(f, delta=None, error=detail, reason=reason)
        version = f"version {f.version}" if f.delta is not None else "version unknown"
        log.warning("catalogue delta %s (%s) quarantined: %s: %s", f.path, version, reason, detail)
        return True

    def _warn_once(self, seq: int, message: str) -> None:
        if (seq, message) not in self._reported:
            self._reported.add((seq, message))
            log.warning("%s", message)

    def claim(
        self,
        seq: int,
        fingerprint: str,
        version: int,
        delta: Delta,
        placement: Sequence[Placement] | None = None,
    ) -> Path:
        """Write ``delta`` as file ``seq``; :class:`SequenceTaken` when that number exists already.
        ``placement``: where the writer placed its added items (carried: replicas install it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "base_fingerprint": fingerprint,
            "version": version,
            "created_at": time.time(),
            "delta": delta.to_json(compact=True),  # vectors as base64 float32: fast to write and read
        }
        if placement:
            body["placement"] = carried.to_json(placement)
        final = self.directory / file_name(seq)
        tmp = self.directory / f".{file_name(seq)}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, final)  # atomic: fails if another writer linked this name first
        except FileExistsError:
            raise SequenceTaken(str(final)) from None
        finally:
            tmp.unlink(missing_ok=True)
        self._written[seq] = DeltaFile(seq, final, fingerprint, version, delta, placement=_list(placement))
        return final


def _list(placement: Sequence[Placement] | None) -> list[Placement] | None:
    return None if not placement else list(placement)
