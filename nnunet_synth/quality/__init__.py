"""Stage 5: quality scores of synthetic pairs (model-free intensity gate, segmentation gate)."""
