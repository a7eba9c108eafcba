"""The encoder-state cache: the value format (``codec``: raw arrays after a header, bound to the
bundle that wrote them) and the caches themselves (``state_cache``: Redis behind a circuit breaker,
an in-process LRU, none). May import ``service.metrics``; nothing else of the service."""
