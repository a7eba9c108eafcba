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
* A reload loads every new version first and swaps them in together. A bundle folder that is refused
  (a bad name, or a bundle that fails to load or warm) does not block the others: the reload reports
  it (``refused`` in its outcome, ``genret_reloads_total{result="error"}``), keeps that model's
  serving version if it has one, and loads the rest. A reload of one named model that is refused,
  or one in which nothing but refused bundles would change, raises :class:`BadBundle` and changes
  nothing. At start-up every bundle must load (no serving
  version to fall back to): the first refusal fails it.
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
from pathlib import Path
from typing import Any

from service.errors import BadBundle, ReloadConflict, ServiceError, UnknownModel
from service.metrics import MODEL_INFO, RELOADS
from service.registry.loaded_model import LoadedModel, load_model, manifest_field, warm
from service.settings import Settings

__all__ = ["LoadedModel", "ModelRegistry", "load_model", "manifest_field", "warm"]

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


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint written in ``path/manifest.json`` (cheap: no arrays are read)."""
    try:
        return str(json.loads((path / MANIFEST).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


Loader = Callable[[str, Path, Settings], LoadedModel]


class ModelRegistry:
    def __init__(self, settings: Settings, loader: Loader = load_model) -> None:
        self._settings = settings
        self._loader = loader
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()  # one reload at a time
        self._in_use: Callable[[], Collection[str]] = frozenset
        self._on_load: Callable[[LoadedModel], LoadedModel] | None = None

    def on_load(self, hook: Callable[[LoadedModel], LoadedModel]) -> None:
        """Pass every freshly loaded model through ``hook`` before it serves (the live catalogue
        re-applies its deltas there: service/catalogue/live.py)."""
        self._on_load = hook

    def replace_model(self, old: LoadedModel, new: LoadedModel) -> bool:
        """Swap ``new`` in for ``old`` (same name: a new catalogue version of the same bundle) if
        ``old`` still serves; False when a reload replaced or unloaded it meanwhile. Requests holding
        ``old`` finish on it."""
        with self._lock:
            if self._models.get(old.name) is not old:
                return False
            self._models = {**self._models, old.name: new}
            return True

    def keep_loaded(self, in_use: Callable[[], Collection[str]]) -> None:
        """Refuse reloads that would unload a name ``in_use()`` returns (e.g. the experiment's bundles)."""
        self._in_use = in_use

    def discover(self) -> dict[str, Path]:
        """Bundle name -> directory, from ``settings.bundle_path``; a bad name is :class:`BadBundle`."""
        found, refused = self.discover_all()
        if refused:
            raise BadBundle(next(iter(refused.values())))
        return found

    def discover_all(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Bundle name -> directory, and folder name -> why it is refused (a bad model name), from
        ``settings.bundle_path``. A single bundle with a bad name is :class:`BadBundle` at once."""
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
            return {check_model_name(name, root): root}, {}
        found: dict[str, Path] = {}
        refused: dict[str, str] = {}
        for p in sorted(root.iterdir()):  # hidden directories (".partial" copies in flight) are never served
            if p.name.startswith(".") or not (p / MANIFEST).is_file():
                continue
            try:
                found[check_model_name(p.name, p)] = p
            except BadBundle as exc:
                refused[p.name] = exc.message
        if not found and not refused:
            raise BadBundle(f"GENRET_BUNDLE_PATH={root} holds no bundle (no */{MANIFEST})")
        return found, refused

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

        Raises :class:`ReloadConflict` when the default model would change, and :class:`BadBundle`
        when the one model named is refused, or every bundle that would change is; either way nothing
        is swapped. Otherwise refused folders are reported (outcomes with ``refused``) and the rest
        swapped in.
        """
        with self._lock:
            found, refused = self.discover_all()
            if name is None:
                removed = [n for n in self._models if n not in found]
            elif name in refused:
                raise BadBundle(refused[name])
            elif name in found:
                found, removed, refused = {name: found[name]}, [], {}
            elif name in self._models:
                found, removed = {}, [name]
            else:
                raise UnknownModel(f"no bundle named {name!r} under {self._settings.bundle_path}")
            self._check_default((set(self._models) - set(removed)) | set(found), ReloadConflict)
            needed = sorted(set(removed) & set(self._in_use()))
            if needed:
                raise ReloadConflict(f"reload would unload {needed}, still named by the experiment file")
            fresh: dict[str, LoadedModel] = {}
            for key, path in found.items():
                if (
                    force
                    or key not in self._models
                    or read_fingerprint(path) != self._models[key].fingerprint
                ):
                    try:
                        fresh[key] = self._load(key, path)
                    except BadBundle as exc:
                        if name is not None:
                            raise
                        refused[key] = exc.message
            if refused and not fresh and not removed:  # nothing else to load: the reload failed
                raise BadBundle("; ".join(refused.values()))
            if refused:
                kept = (set(self._models) - set(removed) - set(refused)) | set(fresh)
                self._check_default(kept | (set(refused) & set(self._models)), ReloadConflict)
            outcomes = [self._outcome(key, self._models.get(key), new) for key, new in fresh.items()]
            outcomes += [self._outcome(key, self._models[key], None) for key in removed]
            outcomes += [self._refused(key, self._models.get(key), why) for key, why in refused.items()]
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

    @staticmethod
    def _refused(key: str, serving: LoadedModel | None, why: str) -> dict[str, Any]:
        """A refused folder's outcome: its serving version (if any) stays."""
        log.error("reload: %s refused, the rest loaded: %s", key, why)
        version = None if serving is None else serving.version
        return {
            "name": key,
            "old_version": version,
            "new_version": version,
            "changed": False,
            "removed": False,
            "refused": why,
        }

    def _load(self, name: str, path: Path) -> LoadedModel:
        started = time.perf_counter()
        try:
            model = self._loader(name, path, self._settings)
            if self._on_load is not None:
                model = self._on_load(model)
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
    """After a reload, as :meth:`service.engine.engine.Engine.start` does: collect, then freeze what is
    left so later collections do not walk the new bundle. A replaced model is freed by reference
    counting alone (it holds no reference cycle), so freezing never keeps an old one alive; the
    reload test in tests/integration/test_reliability_reload.py watches the RSS for that."""
    gc.collect()
    gc.freeze()
