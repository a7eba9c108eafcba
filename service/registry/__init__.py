"""Bundles by name: one loaded and warmed version (``loaded_model``) and the registry that loads,
hot-reloads and swaps them (``model_registry``). May import ``models``, ``service.cache.codec`` and
the package root."""
