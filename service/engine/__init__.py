"""What turns a request into an answer: request mapping (``request_map``: limits, variant, dense ids,
the resolved k and beam), the dynamic batcher (``batcher``; its jobs, stages and hand-off in
``jobs``), the compute worker (``compute``) with its search strategy (``strategy``), the per-row
encoder states, the domain results, and the staged runner of rows off the primary path
(``shadow_executor``). :class:`~service.engine.engine.Engine` is the facade the routes, the shadow
lane and the quality monitor call. May import ``models``, ``service.cache``, ``service.registry``
and the package root (the request model is ``service.schemas``); never ``service.http`` or
``service.shadow``."""
