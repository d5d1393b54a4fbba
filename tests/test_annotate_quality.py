"""Annotation quality against the emoji scenes' truth: facts of desc + tags vs the scene graph and alt-text."""

from __future__ import annotations

import hashlib
import json
import shutil

from openai_server import ChatServer

from cycle.annotate.backends.openai_backend import OpenAIBackend
from cycle.annotate.quality import annotation_quality
from cycle.annotate.run import annotate_generation
from cycle.annotate.schema import to_target_json
from cycle.config import AnnotateConfig, OpenAIBackendConfig
from cycle.data.emoji.language import describe
from cycle.store import Store


def test_quality_compares_annotations_and_alt_text_with_scene_graphs(tmp_path, tiny_store):
    shutil.copytree(tiny_store.uri, tmp_path / "lance")  # the session's store stays read-only
    store = Store(tmp_path / "lance")
    version = store.version("samples")
    rows = store.read("samples", ["sha256", "meta"], "split = 'train'").to_pylist()
    scenes = {r["sha256"]: json.loads(r["meta"])["scene"] for r in rows}
    names = sorted({o["name"] for s in scenes.values() for o in s["objects"]})
    broken = sorted(scenes)[:5]  # the teacher fails on these images: counted as stating nothing

    def truthful(prompt, seed, body):
        import base64

        data = base64.b64decode(body["messages"][0]["content"][1]["image_url"]["url"].split(",", 1)[1])
        digest = hashlib.sha256(data).hexdigest()
        if digest in broken:
            return "no idea"
        scene = scenes[digest]
        first = scene["objects"][0]["name"]
        other = next(n for n in names if n != first and all(n != o["name"] for o in scene["objects"]))
        true = describe(scene)
        return to_target_json(
            {
                "desc": [true],
                "neg_desc": [true.replace(first, other, 1)],
                "tags": [o["name"] for o in scene["objects"]],
                "neg_tags": [other] * len(scene["objects"]),
            }
        )

    with ChatServer(truthful) as server:
        cfg = AnnotateConfig(batch_size=50, write_batch=200, retries=0)
        cfg.openai = OpenAIBackendConfig(base_url=server.base_url, model="teacher-test", requests_per_minute=0)
        backend = OpenAIBackend(cfg.openai, backoff_s=0.01)
        stats = annotate_generation(cfg, None, store, version, 1, tmp_path / "out", backend=backend, progress=False)
        backend.close()
    q = stats["quality"]
    n = len(rows)
    assert q["scenes"] == n and q["schema_valid_share"] == round((n - 5) / n, 4)
    assert q["annotation_usable"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert q["annotation"]["f1"] == round((n - 5) / n, 4)  # the failed rows state nothing
    assert q["alt_text"]["f1"] < 0.9 and q["f1_gain_over_alt_text"] > 0  # corrupted alt-text is worse
    assert q["neg_desc_false_share"] == 1.0  # every negative names an object that is not there
    assert set(q["alt_text"]) >= {"precision", "recall", "f1", "f1_object", "f1_count", "f1_position"}
    n_seeds = store.count("teacher")
    assert 0 < n_seeds < n and q["unseen"]["scenes"] == n - n_seeds  # images the annotator never trained on
    assert q["unseen"]["alt_text_f1"] < 0.9 and q["unseen"]["annotation_f1"] > q["unseen"]["alt_text_f1"]
    by_kind = q["by_alt_noise"]
    assert sum(v["n"] for v in by_kind.values()) == n
    for kind in ("generic", "filename"):  # alt-text naming nothing states no fact; the teacher reads the image
        if kind in by_kind:
            assert by_kind[kind]["alt_text_f1"] == 0.0 and by_kind[kind]["annotation_f1"] > 0.5
    # Streamed a few samples at a time (each batch's annotations and seeds looked up by id): the same figures.
    assert annotation_quality(store, version, 1, batch_size=7) == q
    # A generation without annotations has nothing to measure yet.
    assert annotation_quality(store, version, 2) == {
        "scenes": 0,
        "schema_valid_share": None,
        "neg_desc_false_share": None,
        "by_alt_noise": {},
    }
