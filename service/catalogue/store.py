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
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.catalogue.delta import Delta, DeltaError

log = logging.getLogger(__name__)

FILE = re.compile(r"(\d{6,})\.json")
SUFFIX = ".deltas"


class SequenceTaken(Exception):
    """Another writer claimed this sequence number first: catch up and retry."""


@dataclass(frozen=True)
class DeltaFile:
    """One file of the directory, read and parsed (``delta is None``: unreadable, with ``error``)."""

    seq: int
    path: Path
    base_fingerprint: str
    version: int
    delta: Delta | None
    error: str = ""


def delta_dir(bundle_path: Path, catalogue_dir: Path | None) -> Path:
    """Where the deltas of the bundle at ``bundle_path`` live (module docstring)."""
    bundle_path = Path(bundle_path)
    root = catalogue_dir if catalogue_dir is not None else bundle_path.resolve().parent
    return Path(root) / f"{bundle_path.name}{SUFFIX}"


def file_name(seq: int) -> str:
    return f"{seq:06d}.json"


class DeltaStore:
    """The delta directory of one bundle (module docstring); safe to share between processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._reported: set[tuple[int, str]] = set()  # (seq, reason) already logged
        self._written: dict[int, DeltaFile] = {}  # files this process wrote, not yet read back

    def sequences(self, after: int = 0) -> list[int]:
        """Sequence numbers of the delta files past ``after``, ascending."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = sorted(int(m.group(1)) for n in names if (m := FILE.fullmatch(n)))
        return [s for s in found if s > after]

    def read(self, seq: int) -> DeltaFile:
        """File ``seq``, parsed; a damaged one comes back with ``delta=None`` and the reason."""
        own = self._written.pop(seq, None)
        if own is not None:  # written here a moment ago: the parsed delta, not the file again
            return own
        path = self.directory / file_name(seq)
        try:
            obj = json.loads(path.read_text())
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            delta = Delta.from_json(obj.get("delta"))
            return DeltaFile(seq, path, str(obj["base_fingerprint"]), int(obj.get("version", 0)), delta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = exc.args[0] if isinstance(exc, DeltaError) else f"{type(exc).__name__}: {exc}"
            return DeltaFile(seq, path, "", 0, None, error=str(reason))

    def pending(self, after: int) -> list[DeltaFile]:
        """The files past sequence ``after``, in order, parsed (damaged ones with ``delta=None``)."""
        return [self.read(seq) for seq in self.sequences(after)]

    def report(self, f: DeltaFile, reason: str) -> None:
        """Log why file ``f`` is skipped, once per (file, reason)."""
        if (f.seq, reason) not in self._reported:
            self._reported.add((f.seq, reason))
            log.warning("catalogue delta %s skipped: %s", f.path, reason)

    def claim(self, seq: int, fingerprint: str, version: int, delta: Delta) -> Path:
        """Write ``delta`` as file ``seq``; :class:`SequenceTaken` when that number exists already."""
        self.directory.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "base_fingerprint": fingerprint,
            "version": version,
            "created_at": time.time(),
            "delta": delta.to_json(compact=True),  # vectors as base64 float32: fast to write and read
        }
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
        self._written[seq] = DeltaFile(seq, final, fingerprint, version, delta)
        return final
