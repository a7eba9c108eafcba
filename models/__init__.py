"""Pure compute shared by training and serving; imports neither ``service`` nor ``training``.

* ``index``: the item index (tree + trie arrays), which every sub-package reads.
* ``nets``: the torch networks (encoder, decoder step, content tower).
* ``bundle``: a bundle directory, checked and loaded, and its decoder backends.
* ``search``: beam search, its stages and graphs, constraints, brute force, the ``Retriever``.
* ``catalogue``: live catalogue versions built from deltas.
"""
