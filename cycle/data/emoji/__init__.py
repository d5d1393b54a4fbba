"""emoji-scenes: the built-in dataset (real Noto Color Emoji glyphs composed into scenes, see DESIGN.md).

`build_emoji_scenes(cfg, store, progress=True) -> {split: rows}` writes it into a run's store.

Splits (`samples.split`): `train`, `val` (tuning and early stopping), and the held-out `test_zeroshot`,
`test_retrieval`, `test_negatives`, `test_compositional`. Ids read `emoji-<split>-<index:06d>`.
Every row's `alt_text` is web-like noise over the clean description (`altnoise`); images are PNG.

`samples.meta` (JSON) of every row:
    scene       the exact scene graph (format in `scenes`): background, objects with name, emoji,
                subgroup, count, position, size and pixel boxes
    clean       the clean description ("the image shows two dogs on the left and ..., on a blue background.")
    alt_noise   which corruption made `alt_text`: "none" or one of `altnoise.KINDS`
and by split:
    train               seed_edits (only rows with a teacher seed): {"neg_desc": ["object"|"relation"|"count"],
                        "neg_tags": ["object"|"keyword"|"color", ...]} aligned with the seed's lists
    val                 captions [clean], positive (= clean), negatives [{"text": ..., "edit": ...}] x3
    test_zeroshot       label: the object's name (one plain emoji; every vocabulary object, see
                        n_test_zeroshot_per_object renderings each)
    test_retrieval      captions: [clean]; reworded: {"captions": [1..3 other wordings], "styles": [...]}
    test_negatives      positive: clean; negatives: [{"text": ..., "edit": "object"|"relation"|"count"}],
                        one per edit, each a minimal edit of positive (`edits`); reworded: {"positive",
                        "negatives" (the same edits in the same other wording), "styles"}
    test_compositional  captions: [clean]; heldout_pairs: the scene's object pairs, none of which
                        co-occurs in any train or val scene; reworded: as test_retrieval's
`reworded` (`reword`) says the same facts in wordings that neither the teacher template nor the alt-text
noise uses; the evaluation reports it as `<split>_reworded/<metric>`.

The `seed` table gets the teacher annotations of `seed_share` of the training rows (origin
"emoji-scenes:scene-graph", format in `seeds`). `facts` reads checkable facts back from any text, which is
how annotation quality is measured. The vocabulary of a config: `vocab.load_vocab(cfg.vocab_size)`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_emoji_scenes", "plan_emoji_scenes", "load_vocab", "scene_facts", "text_facts", "fact_prf"]


def __getattr__(name: str) -> Any:  # lazy: reading facts should not import Pillow or the store
    if name == "build_emoji_scenes":
        from .build import build_emoji_scenes

        return build_emoji_scenes
    if name == "plan_emoji_scenes":
        from .plan import plan_emoji_scenes

        return plan_emoji_scenes
    if name == "load_vocab":
        from .vocab import load_vocab

        return load_vocab
    if name in ("scene_facts", "text_facts", "fact_prf"):
        from . import facts

        return getattr(facts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
