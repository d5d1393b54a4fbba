"""Evaluation of a CLIP: metrics on embeddings (metrics), evaluation sets (datasets), the stage (run)."""

from .datasets import EvalDataError, EvalSet, load_dataset, load_store_split
from .run import evaluate_clip, evaluate_set

__all__ = ["EvalDataError", "EvalSet", "evaluate_clip", "evaluate_set", "load_dataset", "load_store_split"]
