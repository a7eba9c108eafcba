"""Bundles by name: load + verify + warm, hot reload beside the old one, atomic swap.

``GENRET_BUNDLE_PATH`` is either one bundle directory (served under its manifest name) or a
directory whose subdirectories are bundles (served under the subdirectory name, so a new version
dropped in place — or a symlink switched — keeps its name). A reload loads and warms the new
version while the old one keeps serving, then swaps the dict entry; requests already holding the
old :class:`LoadedModel` finish on it. A bundle that fails to load or warm is refused with
:class:`BadBundle` and the old one stays.

Names and the default model:

* A model name must match ``^[a-z0-9][a-z0-9._-]{0,63}$`` (it is a metric label, a path-free id
  and part of every cache key); a bundle with any other name is refused when discovered.
* Requests without ``model`` get ``GENRET_DEFAULT_MODEL``, or the only model loaded; with more than
  one model loaded ``GENRET_DEFAULT_MODEL`` is required (startup fails without it).
* A reload mirrors the bundle path: every discovered bundle is (re)loaded, and a model whose bundle
  left the path is unloaded (``reload(name)`` does the same for one name). A reload that would
  change the default — unload ``GENRET_DEFAULT_MODEL``, or, without it, replace the only model by
  another name or add a second one — is refused with :class:`ReloadConflict` before anything loads,
  as is one that would unload a name :meth:`ModelRegistry.keep_loaded` protects (the experiment's).
* A reload loads every new version first and swaps them in together, so a refused bundle leaves
  every serving model as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.cache import StateSpec
from service.errors import BadBundle, ReloadConflict, ServiceError, UnknownModel
from service.metrics import MODEL_INFO, RELOADS
from service.settings import Settings

if TYPE_CHECKING:  # imported at load time only: the registry is usable without models in tests
    from models.bundle import Bundle
    from models.retriever import Retriever

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_model_name(name: str, path: Path) -> str:
    """``name`` if it is a valid model name, else :class:`BadBundle` naming the rule."""
    if not MODEL_NAME.fullmatch(name):
        raise BadBundle(
            f"bundle at {path}: model name {name!r} refused: names match ^{MODEL_NAME.pattern}$ "
            "(lowercase letters, digits, '.', '_', '-'; at most 64 characters)"
        )
    return name


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
    bundle: Bundle
    retriever: Retriever
    raw_ids: list[str]  # [N+1], raw_ids[0] == ""
    dense_of: dict[str, int]  # raw id -> dense id
    popular: np.ndarray  # [N] dense ids, most popular first
    popularity: np.ndarray  # [N+1]
    item_emb: torch.Tensor  # [N+1, Dr] float32 on the serving device (brute-force baseline)
    max_history: int
    memory_dim: int  # D of the encoder's memory [T, D]
    query_dim: int  # Dr of the encoder's query [Dr]
    loaded_at: float

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1

    def state_spec(self, length: int) -> StateSpec:
        """What a cached encoder-state row of a ``length``-item history must be for this model."""
        return StateSpec(self.fingerprint, length, self.memory_dim, self.query_dim)

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
    dims = manifest_field(bundle.manifest, "dims", {})
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
        memory_dim=int(dims["memory"]),
        query_dim=int(dims["query"]),
        loaded_at=time.time(),
    )
    warm(model, settings)
    return model


def warm(model: LoadedModel, settings: Settings) -> None:
    """One dummy batch through encode + search (and the brute-force path), so the first request is not slow."""
    history = [np.array([1], dtype=np.int64), np.array([1, min(2, model.num_items)], dtype=np.int64)]
    beam = min(settings.default_beam_size or model.retriever.default_beam_size, settings.max_beam_size)
    result = model.retriever.retrieve(history, k=min(settings.default_k, model.num_items), beam_size=beam)
    if np.asarray(result.items).shape[0] != len(history):
        raise BadBundle(f"warm-up of {model.name} returned {np.asarray(result.items).shape} items")
    if settings.search_mode == "bruteforce":
        from models.bruteforce import bruteforce_topk

        states = model.retriever.encode(history)
        bruteforce_topk(states.query, model.item_emb, settings.default_k)


Loader = Callable[[str, Path, Settings], LoadedModel]


class ModelRegistry:
    def __init__(self, settings: Settings, loader: Loader = load_model) -> None:
        self._settings = settings
        self._loader = loader
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()  # one reload at a time
        self._in_use: Callable[[], Collection[str]] = frozenset

    def keep_loaded(self, in_use: Callable[[], Collection[str]]) -> None:
        """Refuse reloads that would unload a name ``in_use()`` returns (e.g. the experiment's bundles)."""
        self._in_use = in_use

    def discover(self) -> dict[str, Path]:
        """Bundle name -> directory, from ``settings.bundle_path``; a bad name is :class:`BadBundle`."""
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
            return {check_model_name(name, root): root}
        # hidden directories (".partial" copies in flight) are never served
        found = {
            check_model_name(p.name, p): p
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
        if len(self._models) == 1:
            return next(iter(self._models))
        # load_all and reload never leave several models without GENRET_DEFAULT_MODEL
        raise UnknownModel(f"no default model among {self.names()}: set GENRET_DEFAULT_MODEL")

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
        found = self.discover()
        self._check_default(set(found), BadBundle)
        self._swap({name: self._load(name, path) for name, path in found.items()}, removed=())

    def reload(self, name: str | None = None, *, force: bool = True) -> list[dict[str, Any]]:
        """Make the served models match the bundle path (module docstring): load changed (or, with
        ``force``, all) bundles beside the serving ones, unload those gone, then swap all at once.

        Raises :class:`ReloadConflict` when the default model would change, :class:`BadBundle` when a
        bundle fails to load; either way nothing is swapped and the serving models stay.
        """
        with self._lock:
            found = self.discover()
            if name is None:
                removed = [n for n in self._models if n not in found]
            elif name in found:
                found, removed = {name: found[name]}, []
            elif name in self._models:
                found, removed = {}, [name]
            else:
                raise UnknownModel(f"no bundle named {name!r} under {self._settings.bundle_path}")
            self._check_default((set(self._models) - set(removed)) | set(found), ReloadConflict)
            needed = sorted(set(removed) & set(self._in_use()))
            if needed:
                raise ReloadConflict(f"reload would unload {needed}, still named by the experiment file")
            fresh = {
                key: self._load(key, path)
                for key, path in found.items()
                if force or key not in self._models or read_fingerprint(path) != self._models[key].fingerprint
            }
            outcomes = [self._outcome(key, self._models.get(key), new) for key, new in fresh.items()]
            outcomes += [self._outcome(key, self._models[key], None) for key in removed]
            self._swap(fresh, removed)
            if outcomes:
                collect_and_freeze()
            return outcomes

    async def watch(self, poll_s: float) -> None:
        """Poll the bundle path; reload bundles whose manifest fingerprint changed and unload those
        gone (runs until cancelled)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                changed = await asyncio.to_thread(self.reload, None, force=False)
            except ServiceError as exc:
                log.error("watched reload refused, serving models unchanged: %s", exc.message)
                continue
            except Exception:
                log.exception("watched reload failed, serving models unchanged")
                continue
            for outcome in changed:
                log.info("reloaded %s", outcome)

    def _check_default(self, after: set[str], error: type[ServiceError]) -> None:
        """Refuse a model set ``after`` in which the default would be missing, ambiguous or changed."""
        default = self._settings.default_model
        if default is not None:
            if default not in after:
                raise error(f"GENRET_DEFAULT_MODEL={default!r} would not be served (models: {sorted(after)})")
            return
        if len(after) > 1:
            raise error(
                f"{len(after)} models {sorted(after)} and no GENRET_DEFAULT_MODEL: set it to the model "
                "requests without `model` get"
            )
        if not after:
            raise error(f"no model would be served (serving {self.names()})")
        if self._models and after != set(self._models):
            raise error(
                f"the default model would change from {self.names()[0]!r} to {sorted(after)[0]!r}: "
                "set GENRET_DEFAULT_MODEL to make the switch explicit"
            )

    @staticmethod
    def _outcome(key: str, old: LoadedModel | None, new: LoadedModel | None) -> dict[str, Any]:
        return {
            "name": key,
            "old_version": None if old is None else old.version,
            "new_version": None if new is None else new.version,
            "changed": old is None or new is None or old.fingerprint != new.fingerprint,
            "removed": new is None,
        }

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

    def _swap(self, fresh: dict[str, LoadedModel], removed: Sequence[str]) -> None:
        """Install ``fresh`` and drop ``removed`` in one dict swap (readers see the old or new dict, whole)."""
        old = self._models
        models = {k: v for k, v in old.items() if k not in removed}
        models.update(fresh)
        self._models = models
        for key in [*removed, *fresh]:
            if key in old:
                self._model_info(old[key], present=False)
        for model in fresh.values():
            self._model_info(model, present=True)

    def _model_info(self, model: LoadedModel, *, present: bool) -> None:
        labels = (
            model.name,
            model.version,
            model.method,
            self._settings.device,
            self._settings.decoder_backend,
        )
        if present:
            MODEL_INFO.labels(*labels).set(1)
        else:
            with contextlib.suppress(KeyError):  # already removed
                MODEL_INFO.remove(*labels)


def collect_and_freeze() -> None:
    """After a reload, as :meth:`service.engine.Engine.start` does: collect, then freeze what is
    left so later collections do not walk the new bundle. A replaced model is freed by reference
    counting alone (it holds no reference cycle), so freezing never keeps an old one alive; the
    reload test in tests/integration/test_reliability_reload.py watches the RSS for that."""
    gc.collect()
    gc.freeze()
