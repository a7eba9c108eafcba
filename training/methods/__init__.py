"""One package per retrieval method (config, model, losses, train), each written against
:mod:`training.trainer` and loaded by name through :mod:`training.registry`."""
