"""Stage 5: quality scores of synthetic pairs: the model-free intensity gate (``model_free``), the segmentation
gate of a model trained on real data (``segmentation``), and preview grids (``preview``)."""
