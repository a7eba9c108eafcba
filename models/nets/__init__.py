"""The networks, as torch modules: the query encoder, the decoder step (one signature for every
method, docs/CONTRACTS.md), its incremental serving form, and the content tower for new items.
Imports torch and nothing else of the project."""
