"""The OpenAI-compatible backend against a real HTTP server on loopback: protocol, faults, log, teacher."""

from __future__ import annotations

import base64
import json
import time

import pytest
from openai_server import ChatServer, echo_alt_text
from test_annotate_support import make_store, png

from cycle.annotate.backends.base import BackendError, FailedGeneration
from cycle.annotate.backends.openai_backend import OpenAIBackend
from cycle.annotate.parse import parse_output
from cycle.annotate.schema import build_prompt
from cycle.annotate.teacher import choose_seed_ids, import_seed, teach_seed
from cycle.config import AnnotateConfig, OpenAIBackendConfig

echo = echo_alt_text  # the loopback model: the four formulas about the alt-text


def backend_for(server, tmp_path=None, **cfg):
    conf = OpenAIBackendConfig(
        base_url=server.base_url,
        model="teacher-test",
        concurrency=3,
        requests_per_minute=0,
        timeout_s=2.0,
        max_retries=3,
    )
    for k, v in cfg.items():
        setattr(conf, k, v)
    log = tmp_path / "requests.jsonl" if tmp_path else None
    return OpenAIBackend(conf, max_new_tokens=64, request_log=log, backoff_s=0.01)


def items(n):
    return [(png((10 * i, 0, 0)), build_prompt(f"thing {i}")) for i in range(n)]


def test_protocol_and_request_log(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with ChatServer(echo, api_key="sk-test") as server:
        backend = backend_for(server, tmp_path)
        out = backend.generate(items(5), keys=[f"k{i}" for i in range(5)])
        backend.close()
        assert [parse_output(o).record["tags"] for o in out] == [[f"thing {i}"] for i in range(5)]
        body = server.requests[0]
        parts = body["messages"][0]["content"]
        assert parts[0]["type"] == "text" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
        assert base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1]).startswith(b"\x89PNG")
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["desc", "neg_desc", "tags", "neg_tags"]
        assert body["max_tokens"] == 64 and "seed" not in body

        log = (tmp_path / "requests.jsonl").read_text().splitlines()
        assert len(log) == 5 and {json.loads(line)["key"] for line in log} == {f"k{i}" for i in range(5)}
        with open(tmp_path / "requests.jsonl", "a") as fh:
            fh.write('{"key": "k9", "seed": nu')  # a line cut by a kill
        # A restart answers logged requests from the log: nothing is paid twice.
        again = backend_for(server, tmp_path)
        sent = len(server.requests)
        out2 = again.generate(items(6), keys=[f"k{i}" for i in range(6)])
        assert out2[:5] == out and len(server.requests) == sent + 1
        # Another seed (a retry) is another request.
        again.generate(items(1), keys=["k0"], seed=7, temperature=0.7)
        assert server.requests[-1]["seed"] == 7 and server.requests[-1]["temperature"] == 0.7
        again.close()


def test_retries_timeouts_429_and_5xx(tmp_path):
    with ChatServer(echo) as server:
        server.inject(("timeout", 1.2), ("429", 1), ("500",), ("503",))
        backend = backend_for(server, timeout_s=0.4, concurrency=1, max_retries=5)
        t0 = time.monotonic()
        out = backend.generate(items(3), keys=["a", "b", "c"])
        elapsed = time.monotonic() - t0
        backend.close()
        assert all(parse_output(o).status == "ok" for o in out)
        assert len(server.requests) == 3 + 4 and backend.retries_done == 4
        assert elapsed >= 0.4 + 1.0  # waited out the timeout and honoured Retry-After: 1


def test_gives_up_after_max_retries_and_on_auth(tmp_path, monkeypatch):
    with ChatServer(echo, api_key="right") as server:
        monkeypatch.setenv("OPENAI_API_KEY", "right")
        server.inject(*[("500",)] * 3)
        backend = backend_for(server, max_retries=2, concurrency=1)
        with pytest.raises(BackendError, match="giving up after 3 attempts, last: HTTP 500"):
            backend.generate(items(1))
        backend.close()
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        with pytest.raises(BackendError, match="answered 401"):
            backend_for(server).generate(items(1))


def test_structured_output_dropped_when_unsupported_and_bad_items(tmp_path):
    with ChatServer(echo, supports_schema=False) as server:
        backend = backend_for(server, concurrency=1)
        out = backend.generate(items(2) + [(b"not an image", "x")])
        backend.close()
        assert parse_output(out[0]).status == "ok" and parse_output(out[1]).status == "ok"
        assert isinstance(out[2], FailedGeneration) and "unreadable image" in out[2].reason
        assert "response_format" in server.requests[0] and "response_format" not in server.requests[-1]
        with pytest.raises(BackendError, match="404"):
            backend_for(server, base_url=server.base_url + "/wrong").generate(items(1))


def test_protocol_breaking_answer_fails_the_item_only():
    with ChatServer(echo) as server:
        server.inject(("no-choices",))
        backend = backend_for(server, concurrency=1)
        out = backend.generate(items(2))
        backend.close()
        assert isinstance(out[0], FailedGeneration) and "choices[0].message.content" in out[0].reason
        assert parse_output(out[1]).status == "ok"


def test_retry_after_header_forms():
    from email.utils import formatdate

    from cycle.annotate.backends.openai_backend import _retry_after

    assert _retry_after({"Retry-After": "3"}) == 3.0
    assert _retry_after({"retry-after": "0.5"}) == 0.5
    assert 5 <= _retry_after({"Retry-After": formatdate(time.time() + 10, usegmt=True)}) <= 11
    assert _retry_after({"Retry-After": "soon"}) is None and _retry_after({}) is None


def test_rate_limit_spaces_requests(tmp_path):
    with ChatServer(echo) as server:
        backend = backend_for(server, requests_per_minute=600, concurrency=4)  # one per 0.1 s
        t0 = time.monotonic()
        backend.generate(items(6))
        backend.close()
        assert time.monotonic() - t0 >= 0.5


def test_teach_seed_and_import(tmp_path):
    store = make_store(tmp_path / "lance", n_train=10, n_val=0)
    v = store.version("samples")
    ids = choose_seed_ids(store, v, 4, seed=3)
    assert ids == choose_seed_ids(store, v, 4, seed=3) and len(set(ids)) == 4
    with pytest.raises(ValueError, match="asked for 11"):
        choose_seed_ids(store, v, 11)

    calls = []

    def teacher(prompt, seed, body):  # every first try fails; the retry with a seed works
        assert prompt.startswith("Given an image-text pair crawled from the internet")
        calls.append(seed)
        return "no idea" if seed is None and len(calls) % 2 else echo(prompt, seed, body)

    with ChatServer(teacher) as server:
        cfg = AnnotateConfig(batch_size=2, retries=1)
        cfg.openai = OpenAIBackendConfig(
            base_url=server.base_url, model="teacher-test", requests_per_minute=0, concurrency=1
        )
        ids = [f"s{i:05d}" for i in range(4)]
        stats = teach_seed(cfg, store, v, ids, tmp_path / "teach", progress=False)
        assert stats == stats | {"asked": 4, "written": 4, "failed": 0}
        assert calls.count(1) == 2  # two first tries failed and were retried with seed 1
        assert store.ids("teacher") == set(ids)
        seed_rows = store.read("teacher").to_pylist()
        assert all(r["origin"].startswith("teacher:openai:teacher-test") for r in seed_rows)
        sent = len(server.requests)
        assert teach_seed(cfg, store, v, ids, tmp_path / "teach", progress=False)["asked"] == 0
        assert len(server.requests) == sent
        with pytest.raises(ValueError, match="not in samples"):
            teach_seed(cfg, store, v, ["nope"], tmp_path / "teach", progress=False)

    with ChatServer(lambda prompt, seed, body: "no idea") as server:  # a teacher that never answers usefully
        cfg.openai.base_url = server.base_url
        stats = teach_seed(cfg, store, v, ["s00004"], tmp_path / "teach2", progress=False)
        assert stats == stats | {"asked": 1, "written": 0, "failed": 1} and len(server.requests) == 2
    rejected = [r for r in store.read("rejects").to_pylist() if r["source"] == "teacher"]
    assert [(r["key"], r["reason"]) for r in rejected] == [("s00004", "teacher_output_unusable")]
    assert "no JSON object" in rejected[0]["detail"] and "no idea" in rejected[0]["detail"]

    # Import: a directory of <id>.json, a JSONL file; bad documents land in rejects with a reason.
    rec = {
        "desc": ["the image shows a cup."],
        "neg_desc": ["the image shows a bowl."],
        "tags": ["cup"],
        "neg_tags": ["bowl"],
    }
    d = tmp_path / "vlm150m"
    d.mkdir()
    (d / "s00005.json").write_text(json.dumps(rec))
    (d / "x.json").write_text(json.dumps({"uid": "s00006", **rec, "alt_text": "a cup", "status": "ok"}))
    (d / "s00007.json").write_text("{broken")
    (d / "s00008.json").write_text(json.dumps({**rec, "neg_tags": None}))
    (d / "s00009.json").write_text(json.dumps({**rec, "status": "failed"}))
    (d / "zzz.json").write_text(json.dumps(rec))
    stats = import_seed(d, store, progress=False)
    assert stats["imported"] == 2 and stats["read"] == 6
    assert stats["rejected"] == {"unreadable_json": 1, "invalid_annotation": 1, "failed_annotation": 1, "unknown_id": 1}
    rejects = [r for r in store.read("rejects").to_pylist() if r["source"].startswith("seed-import:")]
    assert {r["key"] for r in rejects} == {"s00007", "s00008", "s00009", "zzz"}
    jl = tmp_path / "more.jsonl"
    jl.write_text(
        json.dumps({"id": "s00005", **rec})
        + "\n"
        + json.dumps({"key": "s00009", **rec})
        + "\n"
        + json.dumps(rec)
        + "\n"
    )
    assert import_seed(jl, store, progress=False) == {
        "read": 3,
        "valid": 2,
        "imported": 1,
        "already_present": 1,
        "teacher_rows_before": 6,
        "rejected": {"missing_id": 1},
    }
    with pytest.raises(FileNotFoundError, match="do not exist"):
        import_seed(tmp_path / "absent", store)
