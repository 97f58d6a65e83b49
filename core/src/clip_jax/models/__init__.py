"""Model towers and the two-tower CLIP architecture (Flax Linen)."""
