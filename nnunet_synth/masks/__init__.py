"""Stage 2: new label maps that over-represent rare classes (000 §2.3)."""
