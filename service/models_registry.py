"""Bundles by name: load + verify + warm, hot reload beside the old one, atomic swap.

``GENRET_BUNDLE_PATH`` is either one bundle directory (served under its manifest name) or a
directory whose subdirectories are bundles (served under the subdirectory name, so a new version
dropped in place — or a symlink switched — keeps its name). A reload loads and warms the new
version while the old one keeps serving, then swaps the dict entry; requests already holding the
old :class:`LoadedModel` finish on it. A bundle that fails to load or warm is refused with
:class:`BadBundle` and the old one stays.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import BadBundle, UnknownModel
from service.metrics import MODEL_INFO, RELOADS
from service.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def manifest_field(manifest: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a manifest that may be a dataclass, a mapping or both."""
    if isinstance(manifest, dict):
        return manifest.get(name, default)
    value = getattr(manifest, name, None)
    if value is not None:
        return value
    try:
        return manifest[name]
    except (KeyError, TypeError):
        return default


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint written in ``path/manifest.json`` (cheap: no arrays are read)."""
    try:
        return str(json.loads((path / MANIFEST).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class LoadedModel:
    """One verified, warmed bundle version and everything a request needs from it."""

    name: str
    version: str
    method: str
    fingerprint: str
    path: Path
    bundle: Any  # models.bundle.Bundle
    retriever: Any  # models.retriever.Retriever
    raw_ids: list[str]  # [N+1], raw_ids[0] == ""
    dense_of: dict[str, int]  # raw id -> dense id
    popular: np.ndarray  # [N] dense ids, most popular first
    popularity: np.ndarray  # [N+1]
    item_emb: torch.Tensor  # [N+1, Dr] float32 on the serving device (brute-force baseline)
    max_history: int
    loaded_at: float

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "num_items": self.num_items,
            "max_history": self.max_history,
            "path": str(self.path),
            "loaded_at": self.loaded_at,
        }


def load_model(name: str, path: Path, settings: Settings) -> LoadedModel:
    """Load + verify a bundle, build its Retriever and warm it with a dummy batch."""
    from models.bundle import load_bundle  # imported here: the registry is usable without models in tests
    from models.retriever import Retriever

    bundle = load_bundle(path)
    retriever = Retriever(
        bundle,
        device=settings.device,
        backend=settings.decoder_backend,
        intra_op_threads=settings.intra_op_threads,
    )
    raw_ids = [str(x) for x in bundle.item_ids]
    if len(raw_ids) >= 1 and raw_ids[0] != "":
        raise BadBundle(f"bundle {path}: item_ids[0] must be the padding id '', got {raw_ids[0]!r}")
    popularity = np.asarray(bundle.popularity, dtype=np.float64)
    popular = np.argsort(-popularity[1:], kind="stable").astype(np.int64) + 1  # [N]
    item_emb = retriever.item_emb  # [N+1, Dr], already on the device
    fingerprint = str(manifest_field(bundle.manifest, "fingerprint", ""))
    version = str(manifest_field(bundle.manifest, "version", "") or fingerprint[:12])
    model = LoadedModel(
        name=name,
        version=version,
        method=str(manifest_field(bundle.manifest, "method", "unknown")),
        fingerprint=fingerprint,
        path=path,
        bundle=bundle,
        retriever=retriever,
        raw_ids=raw_ids,
        dense_of={raw: i for i, raw in enumerate(raw_ids) if i > 0},
        popular=popular,
        popularity=popularity,
        item_emb=item_emb,
        max_history=int(retriever.max_history),
        loaded_at=time.time(),
    )
    warm(model, settings)
    return model


def warm(model: LoadedModel, settings: Settings) -> None:
    """One dummy batch through encode + search (and the brute-force path), so the first request is not slow."""
    history = [np.array([1], dtype=np.int64), np.array([1, min(2, model.num_items)], dtype=np.int64)]
    beam = min(settings.default_beam_size, settings.max_beam_size)
    result = model.retriever.retrieve(history, k=min(settings.default_k, model.num_items), beam_size=beam)
    if np.asarray(result.items).shape[0] != len(history):
        raise BadBundle(f"warm-up of {model.name} returned {np.asarray(result.items).shape} items")
    if settings.search_mode == "bruteforce":
        from service.bruteforce import bruteforce_topk

        states = model.retriever.encode(history)
        bruteforce_topk(states.query, model.item_emb, settings.default_k)


Loader = Callable[[str, Path, Settings], LoadedModel]


class ModelRegistry:
    def __init__(self, settings: Settings, loader: Loader = load_model) -> None:
        self._settings = settings
        self._loader = loader
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()  # one reload at a time

    def discover(self) -> dict[str, Path]:
        """Bundle name -> directory, from ``settings.bundle_path``."""
        root = self._settings.bundle_path
        if root is None:
            raise BadBundle("no bundle configured: set GENRET_BUNDLE_PATH")
        if not root.is_dir():
            raise BadBundle(f"GENRET_BUNDLE_PATH={root} is not a directory")
        if (root / MANIFEST).is_file():
            try:
                name = str(json.loads((root / MANIFEST).read_text())["name"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BadBundle(f"{root / MANIFEST}: cannot read the bundle name ({exc})") from exc
            return {name: root}
        # hidden directories (".partial" copies in flight) are never served
        found = {
            p.name: p
            for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / MANIFEST).is_file()
        }
        if not found:
            raise BadBundle(f"GENRET_BUNDLE_PATH={root} holds no bundle (no */{MANIFEST})")
        return found

    @property
    def default_name(self) -> str:
        if self._settings.default_model is not None:
            return self._settings.default_model
        if not self._models:
            raise UnknownModel("no model is loaded")
        return sorted(self._models)[0]

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[LoadedModel]:
        return [self._models[n] for n in self.names()]

    def get(self, name: str | None = None) -> LoadedModel:
        key = self.default_name if name is None else name
        model = self._models.get(key)
        if model is None:
            raise UnknownModel(f"unknown model {key!r}; loaded: {self.names()}")
        return model

    def load_all(self) -> None:
        """Initial load: every discovered bundle must load, or startup fails with the reason."""
        for name, path in self.discover().items():
            self._install(self._load(name, path))
        if self._settings.default_model is not None and self._settings.default_model not in self._models:
            raise BadBundle(f"GENRET_DEFAULT_MODEL={self._settings.default_model!r} not among {self.names()}")

    def reload(self, name: str | None = None, *, force: bool = True) -> list[dict[str, Any]]:
        """Load changed (or, with ``force``, all) bundles beside the serving ones, then swap each in.

        Raises :class:`BadBundle` at the first bundle that fails; the ones serving stay.
        """
        with self._lock:
            found = self.discover()
            if name is not None:
                if name not in found:
                    raise UnknownModel(f"no bundle named {name!r} under {self._settings.bundle_path}")
                found = {name: found[name]}
            outcomes = []
            for key, path in found.items():
                old = self._models.get(key)
                if not force and old is not None and read_fingerprint(path) == old.fingerprint:
                    continue
                new = self._load(key, path)
                self._install(new)
                outcomes.append(
                    {
                        "name": key,
                        "old_version": None if old is None else old.version,
                        "new_version": new.version,
                        "changed": old is None or old.fingerprint != new.fingerprint,
                    }
                )
            if outcomes:  # as Engine.start: keep full collections from walking the new bundle's objects
                gc.collect()
                gc.freeze()
            return outcomes

    async def watch(self, poll_s: float) -> None:
        """Poll the bundle path; reload bundles whose manifest fingerprint changed (runs until cancelled)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                changed = await asyncio.to_thread(self.reload, None, force=False)
            except BadBundle as exc:
                log.error("watched reload refused, old bundle keeps serving: %s", exc)
                continue
            except Exception:
                log.exception("watched reload failed, old bundle keeps serving")
                continue
            for outcome in changed:
                log.info("reloaded %s", outcome)

    def _load(self, name: str, path: Path) -> LoadedModel:
        started = time.perf_counter()
        try:
            model = self._loader(name, path, self._settings)
        except BadBundle:
            RELOADS.labels(result="error").inc()
            raise
        except Exception as exc:  # any load/verify/warm failure refuses the bundle
            RELOADS.labels(result="error").inc()
            raise BadBundle(f"bundle {name!r} at {path} refused: {type(exc).__name__}: {exc}") from exc
        RELOADS.labels(result="ok").inc()
        log.info(
            "loaded %s version=%s method=%s items=%d from %s in %.2fs",
            model.name,
            model.version,
            model.method,
            model.num_items,
            path,
            time.perf_counter() - started,
        )
        return model

    def _install(self, model: LoadedModel) -> None:
        old = self._models.get(model.name)
        self._models = {**self._models, model.name: model}  # readers see the old or the new dict, whole
        if old is not None and old.version != model.version:
            MODEL_INFO.remove(
                old.name, old.version, old.method, self._settings.device, self._settings.decoder_backend
            )
        MODEL_INFO.labels(
            name=model.name,
            version=model.version,
            method=model.method,
            device=self._settings.device,
            backend=self._settings.decoder_backend,
        ).set(1)
