"""The serving package: only what serves (never ``training``, ``cli`` or ``benchmarks``).

At the root: the entry point (``main``, ``server``, ``startup``), the app factories (``app``), the one
``Settings`` class (``settings`` and its field groups), the request and response models of the API
(``schemas``), the error hierarchy mapped to HTTP once (``errors``) and the metrics registry.
Sub-packages by role: ``http`` (routes, responses, connection guard), ``engine`` (request mapping,
batcher, compute), ``cache`` (encoder states), ``registry`` (loaded bundles), ``catalogue`` (live
deltas), ``shadow`` (experiments, shadow lane, quality monitor).
"""
