"""How true the annotations are, where the truth is known: the built-in emoji scenes.

For every sample whose `meta` holds a scene graph, the facts stated by the annotation (`desc` + `tags`)
are compared with the scene's facts (objects, counts, positions), next to the same for the corrupted
alt-text the annotator was given. An annotator worth its cost beats its own input. Negatives are checked
too: a `neg_desc` sentence should state something false, or it is no hard negative.

Facts are read with `cycle.data.emoji.facts` over every object the dataset can name (not only the run's
vocabulary), so an alt-text naming a sibling object counts as the wrong fact it is. `by_alt_noise` splits
both F1s by the corruption the alt-text got (samples.meta["alt_noise"]): where the annotator reads the
image (generic, filename: the alt-text states nothing) and where it only has to keep what it was given.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional, Sequence

from ..store import SCAN_BATCH_ROWS, is_usable, sql_in

KINDS = ("object", "count", "position")


class _Means:
    """Running means by key, summed in arrival order (what `sum(list) / len(list)` gives, without the list)."""

    def __init__(self):
        self.totals: dict[str, list] = {}

    def add(self, key: str, value: float) -> None:
        total = self.totals.setdefault(key, [0, 0])
        total[0] += value
        total[1] += 1

    def count(self, key: str) -> int:
        return self.totals.get(key, (0, 0))[1]

    def mean(self, key: str) -> Optional[float]:
        total, n = self.totals.get(key, (0, 0))
        return round(total / n, 4) if n else None

    def keys(self) -> list[str]:
        return sorted(self.totals)


def annotation_quality(
    store,
    samples_version: int | str,
    generation: int,
    splits: Sequence[str] = ("train",),
    batch_size: int = SCAN_BATCH_ROWS,
) -> Optional[dict]:
    """Fact precision/recall/F1 of annotations and of alt-text against scene graphs; None without scenes.

    One batched scan of the samples; each batch's annotations (and whether its ids are seeds) are looked
    up by id, so memory holds a batch and the running sums, not the table."""
    from ..data.emoji.facts import fact_prf, scene_facts, text_facts
    from ..data.emoji.vocab import candidates

    names: Optional[tuple] = None
    teacher_rows = store.count("teacher") if store.has("teacher") else 0
    # Seed images were the annotator's SFT data: their annotations are partly recall, so the images it
    # never trained on are scored apart too (`unseen`).
    unseen, scores, by_kind = _Means(), _Means(), defaultdict(_Means)
    n_scenes, n = 0, 0
    neg_false, neg_total, usable = 0, 0, 0
    for rb in store.scan("samples", ["id", "alt_text", "meta"], sql_in("split", splits), samples_version, batch_size):
        scenes = {}
        for row in rb.to_pylist():
            if row["meta"] and '"scene"' in row["meta"]:
                meta = json.loads(row["meta"])
                if isinstance(meta, dict) and "scene" in meta:
                    scenes[row["id"]] = (meta["scene"], row["alt_text"], meta.get("alt_noise", "unknown"))
        if not scenes:
            continue
        n_scenes += len(scenes)
        if names is None:
            names = tuple(o.name for o in candidates())
        ann = store.rows_by_id(
            "annotations", scenes, ["id", "status", "desc", "neg_desc", "tags"], f"generation = {int(generation)}"
        )
        seeds = store.present("teacher", scenes) if teacher_rows else set()
        for sid, (scene, alt, kind_of_noise) in scenes.items():
            row = ann.get(sid)
            if row is None:
                continue
            n += 1
            true = scene_facts(scene)
            alt_pred = text_facts(alt, names)
            ok = is_usable(row["status"])
            usable += ok
            pred = text_facts(list(row["desc"]) + list(row["tags"]), names) if ok else set()
            for who, facts in (("annotation", pred), ("alt_text", alt_pred)):
                prf = fact_prf(facts, true)
                for m in ("precision", "recall", "f1"):
                    scores.add(f"{who}.{m}", prf[m])
                by_kind[kind_of_noise].add(f"{who}_f1", prf["f1"])
                if sid not in seeds:
                    unseen.add(f"{who}_f1", prf["f1"])
                for kind in KINDS:
                    if any(f[0] == kind for f in true):
                        scores.add(f"{who}.f1_{kind}", fact_prf(facts, true, kind)["f1"])
            if ok:
                for m in ("precision", "recall", "f1"):
                    scores.add(f"annotation_usable.{m}", fact_prf(pred, true)[m])
                for sentence in row["neg_desc"]:
                    neg_total += 1
                    neg_false += bool(text_facts(sentence, names) - true)
    if not n_scenes:
        return None
    out: dict = {
        "scenes": n,
        "schema_valid_share": round(usable / n, 4) if n else None,
        "neg_desc_false_share": round(neg_false / neg_total, 4) if neg_total else None,
    }
    for key in scores.keys():
        who, metric = key.split(".")
        out.setdefault(who, {})[metric] = scores.mean(key)
    # Where the annotator helps and where it hurts: the same F1s per kind of alt-text corruption.
    out["by_alt_noise"] = {
        kind: {"n": v.count("alt_text_f1"), **{k: v.mean(k) for k in v.keys()}} for kind, v in sorted(by_kind.items())
    }
    if teacher_rows and unseen.count("alt_text_f1"):
        out["unseen"] = {"scenes": unseen.count("alt_text_f1"), **{k: unseen.mean(k) for k in unseen.keys()}}
    if out.get("annotation", {}).get("f1") is not None and out.get("alt_text", {}).get("f1") is not None:
        out["f1_gain_over_alt_text"] = round(out["annotation"]["f1"] - out["alt_text"]["f1"], 4)
    return out
