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


def _scene(meta_json: Optional[str]) -> Optional[tuple[dict, str]]:
    """(scene graph, kind of alt-text noise) of a `samples.meta`, or None when it holds no scene."""
    if meta_json and '"scene"' in meta_json:
        meta = json.loads(meta_json)
        if isinstance(meta, dict) and "scene" in meta:
            return meta["scene"], meta.get("alt_noise", "unknown")
    return None


def _has_scenes(store, samples_version, where: str) -> bool:
    """Whether any sample of `where` holds a scene graph: a scan that stops at the first one."""
    for rb in store.scan("samples", ["meta"], f"({where}) AND meta LIKE '%\"scene\"%'", samples_version):
        if any(_scene(m) for m in rb.column("meta").to_pylist()):
            return True
    return False


def annotation_quality(
    store,
    samples_version: int | str,
    generation: int,
    splits: Sequence[str] = ("train",),
    batch_size: int = SCAN_BATCH_ROWS,
) -> Optional[dict]:
    """Fact precision/recall/F1 of annotations and of alt-text against scene graphs; None without scenes.

    One batched scan of the generation's annotations; each batch's samples (and whether its ids are seeds)
    are looked up by id, in `samples`' key index on a large table, so memory holds a batch and the running
    sums, not the table, and time grows with the rows."""
    from ..data.emoji.facts import fact_prf, scene_facts, text_facts
    from ..data.emoji.vocab import candidates

    in_splits = sql_in("split", splits)
    if not _has_scenes(store, samples_version, in_splits):
        return None
    names = tuple(o.name for o in candidates())
    teacher_rows = store.count("teacher") if store.has("teacher") else 0
    # Seed images were the annotator's SFT data: their annotations are partly recall, so the images it
    # never trained on are scored apart too (`unseen`).
    unseen, scores, by_kind = _Means(), _Means(), defaultdict(_Means)
    n, neg_false, neg_total, usable = 0, 0, 0, 0
    columns = ["id", "status", "desc", "neg_desc", "tags"]
    for rb in store.scan("annotations", columns, f"generation = {int(generation)}", batch_size=batch_size):
        ann = rb.to_pylist()
        samples = store.rows_by_id(
            "samples", [r["id"] for r in ann], ["id", "alt_text", "meta"], in_splits, samples_version
        )
        seeds = store.present("teacher", samples) if teacher_rows else set()
        for row in ann:
            sample = samples.get(row["id"])
            found = _scene(sample["meta"]) if sample else None
            if found is None:
                continue
            (scene, kind_of_noise), sid = found, row["id"]
            n += 1
            true = scene_facts(scene)
            alt_pred = text_facts(sample["alt_text"], names)
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
