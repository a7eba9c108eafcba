"""TDR: deep tree-based retrieval with layer-wise multi-class training (Liu et al.)."""
