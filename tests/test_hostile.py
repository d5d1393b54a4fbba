"""Hostile data: ids that look like paths, HTML or rich markup, and the inputs that used to end in a
traceback. Ids are data: they never name a file outside the folder being written, never run in the
report, and never change what a terminal shows."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import TINY_YAML, chromium_dom
from PIL import Image

from cycle.cli import main
from cycle.config import ConfigError, check_clip_name, load_config, save_config
from cycle.data.emoji.render import png_bytes
from cycle.data.ingest import ingest
from cycle.files import SAFE_SLUG_MAX, safe_name
from cycle.state import RunState
from cycle.store import Store

XSS_SINGLE = "x' onerror='document.body.dataset.pwned=42;[]"
XSS_DOUBLE = 'y" onerror="document.body.dataset.pwned=43;[]'
XSS_TAG = "<img src=nope onerror=document.body.dataset.pwned=44>"
MARKUP = "[red]RED[/red]"


def png(i: int = 0, side: int = 16) -> bytes:
    return png_bytes(Image.new("RGB", (side, side), (i * 37 % 256, 90, 200)))


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --------------------------------------------------------------------------------------------- safe_name
@pytest.mark.parametrize(
    "sample_id",
    [
        "../../../../escaped_rel",
        "/some/abs/path",
        "sub/inner",
        "..",
        ".",
        ".hidden",
        "a\\b",
        "C:\\x",
        XSS_SINGLE,
        XSS_TAG,
        MARKUP,
        "",
        "ünï cödé/名前",
        "x" * 1000,
        "a.b.c",
        "-",
        "\x00nul",
    ],
)
def test_safe_name_stays_inside_the_folder(tmp_path, sample_id):
    name = safe_name(sample_id, "png")
    stem = name[: -len(".png")]
    assert name.endswith(".png") and "." not in stem  # webdataset: the key ends at the first dot
    assert "/" not in name and "\\" not in name and not name.startswith((".", "-"))
    assert len(name) <= SAFE_SLUG_MAX + 1 + 16 + len(".png")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert safe_name(sample_id, "png") == name  # stable
    (tmp_path / name).write_bytes(b"x")  # a name the file system takes


def test_safe_name_is_unique_where_slugs_collide():
    ids = ["a/b", "a-b", "a b", "a\\b", "A-b", "a-B", "x" * 200, "x" * 201]
    names = [safe_name(i, "json") for i in ids]
    assert len(set(names)) == len(ids)
    assert len({n.lower() for n in names}) == len(ids)  # also on case-insensitive file systems
    assert safe_name("cats/001", ".png").startswith("cats-001-")  # still readable
    with pytest.raises(ValueError):
        safe_name("x", "../png")


# ------------------------------------------------------------------------------------------ a hostile run
class Attributes(HTMLParser):
    """Every attribute of every element, as a browser's DOM has it."""

    def __init__(self):
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def hostile_run(tmp_path):
    """A run (deep enough that `../../../..` from its report/img stays inside tmp_path, where a stray
    write is seen) whose data came in through parquet, webdataset and a folder with hostile ids, plus a
    generation-1 annotation of every sample with hostile text; data, annotate and train marked done."""
    root = tmp_path / "a" / "b" / "c" / "d" / "runs"
    cfg = load_config(None, [f"root={root}", "name=hostile"])
    save_config(cfg, cfg.run_dir)
    store = Store(cfg.run_dir / "lance")
    src = tmp_path / "sources"
    src.mkdir()

    parquet_ids = [
        "../../../../escaped_rel",
        str(tmp_path / "abs_escape"),
        XSS_SINGLE,
        XSS_DOUBLE,
        XSS_TAG,
        "[b]bold",
        "",
        "bad\nnewline",
        "tab\there",
        "..",
        ".hidden",
    ]
    pq.write_table(
        pa.table(
            {
                "id": parquet_ids,
                "image": [png(i) for i in range(len(parquet_ids))],
                "caption": [f"{MARKUP} caption {i} <b>not bold</b> a cat [/b]" for i in range(len(parquet_ids))],
            }
        ),
        src / "hostile.parquet",
    )
    report = ingest(src / "hostile.parquet", store, cfg=cfg.data, progress=False)
    assert report.ingested == len(parquet_ids) - 3 and report.rejected == Counter({"bad_id": 3})

    write_shard(
        src / "hostile.tar",
        [
            ("../../wds_escape.png", png(20)),
            ("../../wds_escape.txt", b"from a shard"),
            (f"{tmp_path}/wds_abs.png", png(21)),
            (f"{tmp_path}/wds_abs.txt", b"absolute member"),
            (".png", png(22)),
            (".txt", b"an empty key"),
        ],
    )
    report = ingest(src / "hostile.tar", store, cfg=cfg.data, progress=False)
    assert report.ingested == 2 and report.rejected == Counter({"bad_id": 1})

    folder = src / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "inner.png").write_bytes(png(30))
    (folder / "sub" / "inner.txt").write_text("a nested id")
    (folder / "top.png").write_bytes(png(31))
    (folder / "top.txt").write_text(MARKUP)
    assert ingest(folder, store, cfg=cfg.data, progress=False).ingested == 2

    ids = sorted(store.ids("samples"))
    assert {"sub/inner", "../../wds_escape", f"{tmp_path}/wds_abs", XSS_SINGLE, str(tmp_path / "abs_escape")} <= set(
        ids
    )
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in store.read("rejects").to_pylist()}
    assert rejects["hostile.parquet#6"][0] == "bad_id" and "empty id" in rejects["hostile.parquet#6"][1]
    assert rejects["hostile.parquet#7"][0] == "bad_id" and "U+000A" in rejects["hostile.parquet#7"][1]
    assert rejects["hostile.tar:"][0] == "bad_id"

    version = store.table("samples").version
    state = RunState(cfg.run_dir)
    state.mark_done(0, "data", "fp", outputs={"samples_version": version})
    store.insert_new(
        "annotations",
        [
            {
                "id": i,
                "generation": 1,
                "desc": [f"{XSS_TAG} {MARKUP}"],
                "neg_desc": [XSS_SINGLE],
                "tags": [MARKUP, "</td></tr></table><script>document.body.dataset.pwned=45</script>"],
                "neg_tags": [XSS_DOUBLE],
                "status": "ok",
                "attempts": 1,
            }
            for i in ids
        ],
    )
    state.mark_done(1, "annotate", "fp", outputs={"annotations_version": store.table("annotations").version})
    state.mark_done(1, "train", "fp", outputs={})
    return cfg.run_dir, ids


def test_hostile_ids_write_nothing_outside_and_run_no_script(hostile_run, tmp_path):
    run_dir, ids = hostile_run
    before = files_under(tmp_path)
    runner = CliRunner()

    res = runner.invoke(main, ["report", str(run_dir), "--gallery", "100"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["inspect", str(run_dir), "--where", "split = 'train'", "--image-out", str(tmp_path / "inspect-img")]
    )
    assert res.exit_code == 0, res.output
    assert MARKUP in res.output and "[b]bold" in res.output  # markup in data prints as is
    for fmt in ("json", "wds"):
        res = runner.invoke(
            main,
            [
                "export",
                str(run_dir),
                "--gen",
                "1",
                "--what",
                "data",
                "--data-format",
                fmt,
                "--out",
                str(tmp_path / f"export-{fmt}"),
            ],
        )
        assert res.exit_code == 0, res.output

    allowed = [run_dir / "report", tmp_path / "inspect-img", tmp_path / "export-json", tmp_path / "export-wds"]
    new = files_under(tmp_path) - before
    outside = [p for p in new if not any(p.is_relative_to(a) for a in allowed)]
    assert new and outside == []
    assert not (tmp_path / "abs_escape.png").exists() and not (tmp_path / "wds_abs.png").exists()

    # every id has its one file, named by safe_name, in each target folder
    assert {p.name for p in (run_dir / "report" / "img").iterdir()} == {safe_name(i, "png") for i in ids}
    assert {p.name for p in (tmp_path / "inspect-img").iterdir()} == {safe_name(i, "png") for i in ids}
    docs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "export-json" / "data-json").iterdir()}
    assert {name: doc["id"] for name, doc in docs.items()} == {safe_name(i, "json"): i for i in ids}
    with tarfile.open(next((tmp_path / "export-wds" / "data-wds").glob("shard-*.tar"))) as tar:
        members = tar.getnames()
        assert all("/" not in m and not m.startswith(".") for m in members)
        assert sorted(json.loads(tar.extractfile(m).read())["id"] for m in members if m.endswith(".json")) == ids
    # the export comes back through ingest, keyed by the safe names; the exact id travels in the .json
    back = Store(tmp_path / "reingest")
    assert ingest(tmp_path / "export-wds" / "data-wds", back, progress=False).ingested == len(ids)
    assert sorted(json.loads(m)["id"] for m in back.read("samples", ["meta"]).column("meta").to_pylist()) == ids

    page = run_dir / "report" / "index.html"
    text = page.read_text()
    assert XSS_SINGLE not in text and XSS_DOUBLE not in text and XSS_TAG not in text and "<script>document" not in text
    if shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed")
    dom = chromium_dom(page, tmp_path)
    assert "HQ-CLIP cycle: run hostile" in dom
    parser = Attributes()
    parser.feed(dom)
    names = {k for _, k, _ in parser.attrs}
    assert "data-pwned" not in names and "onerror" not in names and not any(k.startswith("on") for k in names)
    body = dict((k, v) for tag, k, v in parser.attrs if tag == "body")
    assert int(body["data-images"]) == len(ids) == int(body["data-images-loaded"])  # nested ids load too
    assert XSS_SINGLE in dom and MARKUP in dom  # shown as text


def test_nested_ids_report(tmp_path):
    """A folder source with subfolders gives ids such as `sub/inner`; the report used to fail on them."""
    cfg = load_config(None, [f"root={tmp_path}", "name=nested"])
    save_config(cfg, cfg.run_dir)
    store = Store(cfg.run_dir / "lance")
    folder = tmp_path / "pics"
    (folder / "sub" / "deeper").mkdir(parents=True)
    for i, rel in enumerate(("sub/inner", "sub/deeper/x", "top")):
        (folder / f"{rel}.png").write_bytes(png(i))
        (folder / f"{rel}.txt").write_text(f"caption {i}")
    assert ingest(folder, store, cfg=cfg.data, progress=False).ingested == 3
    RunState(cfg.run_dir).mark_done(0, "data", "fp", outputs={"samples_version": store.table("samples").version})
    res = CliRunner().invoke(main, ["report", str(cfg.run_dir)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (cfg.run_dir / "report" / "img").iterdir()} == {
        safe_name(i, "png") for i in ("sub/inner", "sub/deeper/x", "top")
    }
    assert 'alt="sub/inner"' in (cfg.run_dir / "report" / "index.html").read_text()


# ------------------------------------------------------------------------------------ one line, exit 2
def test_missing_emoji_font_is_one_line(tmp_path):
    # WARNING: the controller's "[gen 0] data ..." progress line is not part of the error
    res = CliRunner().invoke(
        main,
        ["--log-level", "WARNING", "run", str(TINY_YAML), f"root={tmp_path}", "name=f", "data.emoji.font=/nope.ttf"],
    )
    assert "emoji font not found at '/nope.ttf'" in one_error_line(res)


def test_run_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file where the run folder should go")
    res = CliRunner().invoke(main, ["run", str(TINY_YAML), f"root={tmp_path}", "name=taken"])
    assert f"cannot write the run folder {tmp_path / 'taken'}" in one_error_line(res)
    res = CliRunner().invoke(main, ["run", str(TINY_YAML), f"root={tmp_path / 'taken'}", "name=x"])
    assert "is a file, not a folder" in one_error_line(res)
    assert (tmp_path / "taken").read_text().startswith("a file")  # nothing written over it


def test_report_into_an_unwritable_place_is_one_line(hostile_run):
    run_dir, _ = hostile_run
    (run_dir / "report").write_text("a file where the report folder should go")
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert f"cannot write the report folder {run_dir / 'report' / 'img'}" in one_error_line(res)
    res = CliRunner().invoke(
        main, ["inspect", str(run_dir), "--id", "top", "--image-out", str(run_dir / "report" / "x")]
    )
    assert "cannot write the image folder" in one_error_line(res)


@pytest.mark.parametrize("where", ["split = ", "nosuch = 1", "1"])
def test_malformed_where_filter_is_one_line_naming_it(hostile_run, where):
    run_dir, _ = hostile_run
    res = CliRunner().invoke(main, ["inspect", str(run_dir), "--where", where])
    assert f"filter {where!r} on samples" in one_error_line(res)


# ------------------------------------------------------------------------------------------- config names
def test_unknown_clip_name_fails_before_anything_runs(tmp_path):
    res = CliRunner().invoke(main, ["run", str(TINY_YAML), f"root={tmp_path}", "name=n", "clip.name=hqclip-tinny"])
    line = one_error_line(res)
    assert "clip.name" in line and "unknown CLIP architecture 'hqclip-tinny'" in line and "hqclip-tiny" in line
    assert not (tmp_path / "n").exists()  # refused at the config, before the data stage
    with pytest.raises(ConfigError, match="open_clip.list_models"):
        load_config(TINY_YAML, ["clip.name=nosuchclip"])
    for name in ("hqclip-micro", "ViT-B-32", "ViT-B/32", "hf-hub:org/repo"):
        check_clip_name(name)  # ours, open_clip's (both spellings), and names open_clip resolves itself


# ----------------------------------------------------------------------------------------------- ingest
def test_multi_file_parquet_checked_before_anything_is_written(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [png(1)], "caption": ["fine"]}), src / "0-good.parquet")
    pq.write_table(
        pa.table({"id": ["b"], "picture_bytes": [png(2)], "caption": ["no image column"]}), src / "1-bad.parquet"
    )
    store = Store(tmp_path / "lance")
    with pytest.raises(ValueError, match="1-bad.parquet: no image column"):
        ingest(src, store, progress=False)
    assert not store.has("samples") or store.count("samples") == 0
    (src / "1-bad.parquet").write_bytes(b"not parquet at all")
    res = CliRunner().invoke(main, ["data", "ingest", str(src), "--run", str(tmp_path / "run"), "--no-progress"])
    assert "1-bad.parquet' cannot be read" in one_error_line(res)
    assert not Store(tmp_path / "run" / "lance").has("samples")


def test_duplicate_sidecar_caption_keeps_the_first_and_is_rejected(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    (root / "x.png").write_bytes(png(1))
    (root / "y.png").write_bytes(png(2))
    (root / "captions.jsonl").write_text(
        '{"file": "x.png", "text": "first"}\n{"file": "y.png", "text": "why"}\n{"file": "./x.png", "text": "second"}\n'
    )
    store = Store(tmp_path / "lance")
    report = ingest(root, store, progress=False)
    assert report.ingested == 2 and report.rejected == Counter({"duplicate_caption": 1})
    assert dict(zip(*store.read("samples", ["id", "alt_text"]).to_pydict().values())) == {"x": "first", "y": "why"}
    (reject,) = store.read("rejects").to_pylist()
    assert reject["key"] == "captions.jsonl:3" and reject["reason"] == "duplicate_caption"
    assert "captions.jsonl:1" in reject["detail"]


def test_reingest_stores_each_reject_once(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    (root / "ok.png").write_bytes(png(1))
    (root / "ok.txt").write_text("fine")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("bad image")
    (root / "orphan.txt").write_text("no image")
    store = Store(tmp_path / "lance")
    first = ingest(root, store, progress=False, write_batch=1)
    stored = sorted((r["key"], r["reason"]) for r in store.read("rejects").to_pylist())
    assert first.rejected_total == 2 and len(stored) == 2
    second = ingest(root, store, progress=False)
    assert second.rejected == Counter({"corrupt_image": 1, "missing_image": 1, "duplicate_id": 1})  # reported
    after_second = sorted((r["key"], r["reason"]) for r in store.read("rejects").to_pylist())
    assert after_second == sorted(stored + [("ok.png", "duplicate_id")])  # only what is new is stored
    ingest(root, store, progress=False)
    assert sorted((r["key"], r["reason"]) for r in store.read("rejects").to_pylist()) == after_second


def test_ingest_and_list_print_markup_in_data_as_is(tmp_path):
    """Source paths, splits and reasons reach rich tables as data: "[red]RED[/red]" prints literally."""
    root = tmp_path / "[red]RED :smile:"  # a folder name cannot hold the "/" of a closing tag
    root.mkdir()
    (root / "p.png").write_bytes(png(1))
    (root / "p.txt").write_text("fine")
    (root / "q.png").write_bytes(b"not an image")
    (root / "q.txt").write_text("broken")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["data", "ingest", str(root), "--run", str(run), "--split", MARKUP, "--no-progress"])
    assert res.exit_code == 0, res.output
    # Rich wraps (and folds) the table title, which holds tmp_path, at the table's width: compare without spaces
    assert f"[red]RED:smile:->split'{MARKUP}'" in "".join(res.output.split())
    res = CliRunner().invoke(main, ["data", "list", str(run)])
    assert res.exit_code == 0, res.output
    assert f"{MARKUP}: 1" in res.output and ":smile:" in res.output and "corrupt_image" in res.output
    res = CliRunner().invoke(main, ["inspect", str(run)])  # not a run (no state.json): still one line
    assert "is not a run directory" in one_error_line(res)
