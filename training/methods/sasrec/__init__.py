"""SASRec: the sequential baseline every generative method builds on (its embeddings, its rerank vector)."""
