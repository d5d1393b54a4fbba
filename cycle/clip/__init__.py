"""CLIP: the model factory and checkpoint format (model), HF conversion (convert), exports (export)."""
