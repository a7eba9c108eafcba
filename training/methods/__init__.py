"""One package per retrieval method, each of the same shape: ``config`` (a frozen dataclass and its
YAML under ``training/configs/``), ``model``, ``losses``, ``train`` (the entry point
``train_<method>(ctx) -> TrainedMethod``); further modules are named for what they do (URI's
``layerwise`` index learning, TDR's ``tree_learning``, SASRec's ``cache``). Written against
:mod:`training.trainer` and :mod:`training.context`; the one method table that loads them by
name is :mod:`training.registry`."""
