"""The package's example: a chest-CT-like 2D dataset generated at run time (``phantom``); no data files are shipped."""
