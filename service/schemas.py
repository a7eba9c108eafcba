"""Request and response models of the HTTP API (what the OpenAPI schema shows).

Static bounds live here; the limits that come from settings (``max_k``, beam bounds, history and
exclude lengths, deadline, batch size) are checked by the engine and answered with a 422 naming the
field, in the same shape as FastAPI's validation errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)


def _id_to_str(value: Any) -> Any:
    # JSON integers are accepted as ids and mean their decimal string; bools are not ids
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ItemId = Annotated[str, BeforeValidator(_id_to_str), Field(min_length=1, max_length=256)]

_STRING_IDS = TypeAdapter(list[Annotated[str, Field(min_length=1, max_length=256)]])


def _ids(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # A list of valid string ids (the usual case) is checked in pydantic-core alone, 7x faster than
    # one Python call per id for an 80,000-id allow-list; anything else takes the per-id path, which
    # converts integers and names the bad entry.
    try:
        return _STRING_IDS.validate_python(value, strict=True)
    except ValidationError:
        return handler(value)


ItemIds = Annotated[list[ItemId], WrapValidator(_ids)]
"""Item ids of a request: strings, or JSON integers meaning their decimal string."""


class RetrieveRequest(BaseModel):
    """One user's retrieval request.

    Strict types: a number must be a JSON number and a boolean a JSON boolean (``"k": "5"`` and
    ``"k": true`` are 422 naming ``k``); item ids are the one exception, see ``ItemId``.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | None = Field(
        default=None,
        max_length=256,
        description="Caller's user id: the cache key and the A/B assignment key.",
    )
    history: ItemIds = Field(
        default_factory=list,
        description="Item ids the user interacted with, oldest first (at most GENRET_MAX_HISTORY_ITEMS); "
        "only the model's max_history most recent known ids are used.",
    )
    k: int | None = Field(
        default=None, ge=1, description="Items to return (at most GENRET_MAX_K; default GENRET_DEFAULT_K)."
    )
    beam_size: int | None = Field(
        default=None,
        ge=1,
        description="Beam width (GENRET_MIN_BEAM_SIZE..GENRET_MAX_BEAM_SIZE; default from settings).",
    )
    exclude: ItemIds = Field(default_factory=list, description="Item ids never to return.")
    exclude_history: bool = Field(default=False, description="Never return items of the history.")
    allow: ItemIds | None = Field(
        default=None,
        description="Return only these item ids (at most GENRET_MAX_ALLOW_ITEMS; unknown ids ignored); "
        "k is still met while k allowed items exist (`fallback: dense`).",
    )
    categories: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        description="Return only items holding one of these raw attribute ids (with `allow`: both); "
        "422 when the model has no item attributes.",
    )
    debug: bool = Field(default=False, description="Add timings, cache and batch details to the response.")
    deadline_ms: int | None = Field(
        default=None,
        ge=1,
        description="Answer with 504 if not computed within this many ms (at most GENRET_MAX_DEADLINE_MS).",
    )
    model: str | None = Field(
        default=None, max_length=128, description="Serve from this model instead of the default."
    )


class BatchRetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RetrieveRequest] = Field(
        ..., min_length=1, description="Requests answered together (at most GENRET_MAX_BATCH_REQUESTS)."
    )


class ScoredItem(BaseModel):
    id: str
    score: float


class ModelRef(BaseModel):
    name: str
    version: str
    method: str
    catalogue_version: int = Field(default=0, description="The catalogue version that answered.")


class DebugInfo(BaseModel):
    """Nothing here depends on whether this request's encoder states were cached: the cache key is the
    caller-chosen ``user_id`` plus the history, so a hit/miss field would tell anyone whether that
    user's history was cached (service/http/responses.py ``debug_info``)."""

    timings_ms: dict[str, float] = Field(
        description="Milliseconds: queue (this request's wait before its batch began). No stage that runs "
        "after the cache lookup is shown, since its time depends on whether the states were cached."
    )
    batch_size: int
    num_candidates: int
    history_used: int = Field(description="Known history items given to the encoder.")


class RetrieveResponse(BaseModel):
    items: list[ScoredItem]
    model: ModelRef
    variant: str
    unknown_history_items: int = Field(description="History ids unknown to the model, skipped.")
    truncated: bool = Field(
        description="True when the history was cut to the model's max_history most recent."
    )
    added_history_items: int = Field(
        default=0,
        description="History items added to the catalogue after training (the encoder does not know them): skipped.",
    )
    fallback: Literal["popular", "dense"] | None = Field(
        default=None,
        description="'popular': the history had no usable item and popular items were returned; 'dense': "
        "the beam left fewer than k items and `fallback_items` came from exact search over what may be returned.",
    )
    fallback_items: int | None = Field(default=None, description="Items filled by the dense fallback.")
    fewer: Literal["catalogue", "beam_limit"] | None = Field(
        default=None,
        description="Set when fewer than k items are returned: 'catalogue' = fewer than k items are left "
        "after exclusions and filters; 'beam_limit' = the beam reached too few (not with the dense fill).",
    )
    debug: DebugInfo | None = None


class BatchRetrieveResponse(BaseModel):
    results: list[RetrieveResponse]


class ModelDescription(BaseModel):
    name: str
    version: str
    method: str
    fingerprint: str
    num_items: int
    num_live: int = Field(description="Items that may be returned (added ones included, removed ones not).")
    catalogue_version: int = Field(description="Deltas applied to the bundle (0 = as trained).")
    max_history: int
    loaded_at: float
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelDescription]


class AdminModelDescription(ModelDescription):
    """What the admin API adds: where the bundle lives on the server's disk."""

    path: str


class AdminModelsResponse(BaseModel):
    models: list[AdminModelDescription]


class ReadyResponse(BaseModel):
    ready: bool
    draining: bool
    models: list[str]
    device: str
    decoder_backend: str
    backend_devices: dict[str, str] = Field(description="Per model: where its ONNX Runtime sessions run.")
    search_mode: str
    cache: dict[str, Any]
    queue_depth: int
    catalogue_lag: dict[str, int] = Field(
        default_factory=dict,
        description="Per model: published catalogue delta files this replica has not taken yet (0 = caught "
        "up; genret_catalogue_lag_versions). Reported, never a reason to be unready: a replica serves "
        "the last catalogue version it could build (docs/live_catalogue.md).",
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        default=None,
        description="Reload only this model, or unload it if its bundle left the bundle path "
        "(default: every bundle, and unload every model whose bundle is gone).",
    )


class ReloadOutcome(BaseModel):
    name: str
    old_version: str | None
    new_version: str | None = Field(
        description="The version serving after the reload; None when the model was unloaded (or was "
        "refused and had no serving version)."
    )
    changed: bool
    removed: bool = Field(default=False, description="The model's bundle left the bundle path: unloaded.")
    refused: str | None = Field(
        default=None,
        description="Why this bundle folder was refused (a bad name, a failed check or warm-up); its "
        "serving version, if any, stays, and the other bundles were still loaded.",
    )


class ReloadResponse(BaseModel):
    reloaded: list[ReloadOutcome]


class ItemsJob(BaseModel):
    """A large delta accepted by ``POST /admin/items`` (202) and where it is now
    (``GET /admin/items/jobs/{job}``; docs/live_catalogue.md "Large deltas")."""

    job: str
    model: str
    state: Literal["queued", "running", "live", "refused", "failed"] = Field(
        description="live: published and served here (other replicas within a poll); refused: it no "
        "longer applied when its turn came, nothing written; failed: it could not be written."
    )
    items: int = Field(description="Ids added + removed.")
    base_version: int = Field(description="The catalogue version it was checked against when accepted.")
    submitted_at: float
    finished_at: float | None = None
    version: int | None = Field(default=None, description="The catalogue version it made, once live.")
    added: int | None = None
    removed: int | None = None
    new_leaves: int | None = None
    joined_copies: int | None = None
    over_capacity: int | None = None
    error: dict[str, str] | None = Field(
        default=None, description="`field` and `msg`, once refused or failed."
    )


class AddItemsResponse(BaseModel):
    """What ``POST /admin/items`` did: the catalogue version it made and where the items went."""

    model: str
    version: int = Field(description="The catalogue version this delta made.")
    added: int
    removed: int
    new_leaves: int = Field(description="Added items placed in a new leaf beside their nearest items.")
    joined_copies: int = Field(
        description="Added items that joined the leaf of a near copy (cosine >= 0.99)."
    )
    over_capacity: int = Field(description="Added items that joined a full leaf (no room near them).")
