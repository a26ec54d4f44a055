"""Networks: `layers.py` (shared building blocks) <- one module per family <- `registry.py` (`model.family`)."""
