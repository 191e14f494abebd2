"""lowrank against TransformerLens on the same weights: ``python -m benchmarks.run``."""
