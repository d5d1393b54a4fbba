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

from ..store import is_usable, sql_in

KINDS = ("object", "count", "position")


def _mean(values: list[float]) -> Optional[float]:
    return round(sum(values) / len(values), 4) if values else None


def annotation_quality(
    store, samples_version: int | str, generation: int, splits: Sequence[str] = ("train",)
) -> Optional[dict]:
    """Fact precision/recall/F1 of annotations and of alt-text against scene graphs; None without scenes."""
    scenes = {}
    alts = {}
    kinds = {}
    for rb in store.scan("samples", ["id", "alt_text", "meta"], sql_in("split", splits), version=samples_version):
        for row in rb.to_pylist():
            if row["meta"] and '"scene"' in row["meta"]:
                meta = json.loads(row["meta"])
                if isinstance(meta, dict) and "scene" in meta:
                    scenes[row["id"]], alts[row["id"]] = meta["scene"], row["alt_text"]
                    kinds[row["id"]] = meta.get("alt_noise", "unknown")
    if not scenes:
        return None
    from ..data.emoji.facts import fact_prf, scene_facts, text_facts
    from ..data.emoji.vocab import candidates

    names = tuple(o.name for o in candidates())
    ann = {
        r["id"]: r
        for r in store.read(
            "annotations", ["id", "status", "desc", "neg_desc", "tags"], f"generation = {int(generation)}"
        ).to_pylist()
    }
    # Seed images were the annotator's SFT data: their annotations are partly recall, so the images it
    # never trained on are scored apart too (`unseen`).
    seeds = {r["id"] for r in store.read("teacher", ["id"]).to_pylist()} if store.has("teacher") else set()
    unseen: dict[str, list[float]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    neg_false, neg_total, usable = 0, 0, 0
    for sid, scene in scenes.items():
        row = ann.get(sid)
        if row is None:
            continue
        true = scene_facts(scene)
        alt_pred = text_facts(alts[sid], names)
        ok = is_usable(row["status"])
        usable += ok
        pred = text_facts(list(row["desc"]) + list(row["tags"]), names) if ok else set()
        for who, facts in (("annotation", pred), ("alt_text", alt_pred)):
            prf = fact_prf(facts, true)
            for m in ("precision", "recall", "f1"):
                scores[f"{who}.{m}"].append(prf[m])
            by_kind[kinds[sid]][f"{who}_f1"].append(prf["f1"])
            if sid not in seeds:
                unseen[f"{who}_f1"].append(prf["f1"])
            for kind in KINDS:
                if any(f[0] == kind for f in true):
                    scores[f"{who}.f1_{kind}"].append(fact_prf(facts, true, kind)["f1"])
        if ok:
            for m in ("precision", "recall", "f1"):
                scores[f"annotation_usable.{m}"].append(fact_prf(pred, true)[m])
            for sentence in row["neg_desc"]:
                neg_total += 1
                neg_false += bool(text_facts(sentence, names) - true)
    n = sum(1 for sid in scenes if sid in ann)
    out: dict = {
        "scenes": n,
        "schema_valid_share": round(usable / n, 4) if n else None,
        "neg_desc_false_share": round(neg_false / neg_total, 4) if neg_total else None,
    }
    for key, values in sorted(scores.items()):
        who, metric = key.split(".")
        out.setdefault(who, {})[metric] = _mean(values)
    # Where the annotator helps and where it hurts: the same F1s per kind of alt-text corruption.
    out["by_alt_noise"] = {
        kind: {"n": len(v["alt_text_f1"]), **{k: _mean(x) for k, x in sorted(v.items())}}
        for kind, v in sorted(by_kind.items())
    }
    if seeds and unseen:
        out["unseen"] = {"scenes": len(unseen["alt_text_f1"]), **{k: _mean(v) for k, v in sorted(unseen.items())}}
    if out.get("annotation", {}).get("f1") is not None and out.get("alt_text", {}).get("f1") is not None:
        out["f1_gain_over_alt_text"] = round(out["annotation"]["f1"] - out["alt_text"]["f1"], 4)
    return out
