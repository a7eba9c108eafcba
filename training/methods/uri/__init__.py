"""URI: the decoder is both the retriever and the indexer (Li et al., ICLR 2025)."""
