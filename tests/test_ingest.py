"""Ingest: image checks, alt-text cleaning, the three source kinds, every bad-input class, the CLI."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from cycle.config import DataConfig
from cycle.data.images import BadImage, BadText, check_image, clean_alt_text, decode_image
from cycle.data.ingest import detect_kind, ingest, report_table
from cycle.store import Store

CFG = DataConfig(max_pixels=100_000, min_side=8)


def encode(fmt: str, i: int = 0, size=(24, 20), mode="RGB", **kw) -> bytes:
    color = ((40 * i) % 256, (90 * i) % 256, 200) + ((100,) if mode == "RGBA" else ())
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **kw)
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header that claims huge dimensions (a few bytes: the decompression-bomb shape)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_IMAGES = {  # file name -> (bytes, expected reason)
    "zero.png": (b"", "empty_image"),
    "truncated.png": (encode("PNG", 3)[:60], "corrupt_image"),
    "truncated.jpg": (noisy_jpeg()[:400], "corrupt_image"),
    "random.jpg": (os.urandom(300), "corrupt_image"),
    "bomb.png": (bomb_png(), "too_large"),
    "big.png": (encode("PNG", 1, size=(400, 300)), "too_large"),  # real, over max_pixels=100k
    "tiny.png": (encode("PNG", 1, size=(4, 30)), "too_small"),
    "scan.tiff": (encode("TIFF", 2), "unsupported_format"),
}
BAD_TEXTS = {
    "empty": (b"", "empty_text"),
    "blank": (b" \t\n  ", "empty_text"),
    "latin1": ("caf\xe9 au lait".encode("latin-1"), "non_utf8_text"),
}


# ---------------------------------------------------------------------------------------- unit checks
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_check_image_rejects_each_bad_class(name):
    data, reason = BAD_IMAGES[name]
    with pytest.raises(BadImage) as err:
        check_image(data, CFG.max_pixels, CFG.min_side)
    assert err.value.reason == reason and str(err.value)


def test_check_image_accepts_the_supported_formats_and_leaves_pillow_global_alone():
    before = Image.MAX_IMAGE_PIXELS
    for fmt, name in (("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP"), ("BMP", "BMP"), ("GIF", "GIF")):
        assert check_image(encode(fmt), CFG.max_pixels, CFG.min_side) == (24, 20, name)
    assert Image.MAX_IMAGE_PIXELS == before
    # Pillow's own hard cap (2 x MAX_IMAGE_PIXELS) still rejects, as too_large, under a looser limit of ours
    with pytest.raises(BadImage, match="too_large"):
        check_image(bomb_png(20_000, 20_000), 10**9, 8)
    assert Image.MAX_IMAGE_PIXELS == before


def test_decode_composites_alpha_on_white_and_takes_the_first_gif_frame():
    clear = encode("PNG", mode="RGBA", size=(10, 10))
    im = decode_image(clear)
    assert im.mode == "RGB" and im.size == (10, 10)
    r, g, b = im.getpixel((0, 0))  # (0, 0, 200) at alpha 100/255 over white: 155, 155, 233
    assert abs(r - 155) <= 1 and abs(g - 155) <= 1 and abs(b - 233) <= 1
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((0, 0))[0] > 200


def test_clean_alt_text():
    assert clean_alt_text(b"  A\tred\x00 cat\r\n on   a mat \xe2\x80\x8b") == "A red cat on a mat"
    assert clean_alt_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert clean_alt_text("family \U0001f468\u200d\U0001f469") == "family \U0001f468\u200d\U0001f469"  # ZWJ kept
    for raw, reason in [*BAD_TEXTS.values(), ("\ud800 lone surrogate", "non_utf8_text"), (None, "empty_text")]:
        with pytest.raises(BadText) as err:
            clean_alt_text(raw)
        assert err.value.reason == reason


# ------------------------------------------------------------------------------------- image folders
def rejects_by_key(store: Store) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in store.read("rejects").to_pylist()}


def test_folder_with_txt_captions_and_every_bad_input(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    good = {
        "a.png": encode("PNG", 1),
        "b.jpg": encode("JPEG", 2),
        "sub/c.webp": encode("WEBP", 3),
        "d.bmp": encode("BMP", 4),
    }
    for name, data in good.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
    for name, (data, _) in BAD_IMAGES.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("fine text")
    for stem, (text, _) in BAD_TEXTS.items():
        (root / f"{stem}.png").write_bytes(encode("PNG", 5))
        (root / f"{stem}.txt").write_bytes(text)
    (root / "a.jpg").write_bytes(encode("JPEG", 6))  # same stem as a.png: same id, second is a duplicate
    (root / "e.png").write_bytes(encode("PNG", 7))
    (root / "e.json").write_text(json.dumps({"caption": "from json", "url": "http://x/e.png"}))
    (root / "nocaption.png").write_bytes(encode("PNG", 8))
    (root / "orphan.txt").write_text("a caption whose image is gone")
    (root / ".DS_Store").write_bytes(b"\0\1")

    store = Store(tmp_path / "lance")
    report = ingest(root, store, kind="auto", split="train", cfg=CFG, progress=False, write_batch=3)
    assert report.kind == "folder"
    expected = Counter(reason for _, reason in BAD_IMAGES.values())
    expected.update(reason for _, reason in BAD_TEXTS.values())
    expected.update({"duplicate_id": 1, "missing_text": 1, "missing_image": 1})
    assert report.rejected == expected
    assert report.ingested == len(good) + 1  # + e.png
    keys = rejects_by_key(store)
    assert keys["a.png"] == "duplicate_id" or keys.get("a.jpg") == "duplicate_id"
    assert all(keys[name] == reason for name, (_, reason) in BAD_IMAGES.items())
    assert keys["latin1.png"] == "non_utf8_text" and keys["orphan.txt"] == "missing_image"
    assert store.count("rejects") == report.rejected_total
    rows = {r["id"]: r for r in store.read("samples").to_pylist()}
    assert set(rows) == {"a", "b", "sub/c", "d", "e"}
    assert rows["b"]["alt_text"] == "caption of b.jpg" and rows["b"]["split"] == "train"
    assert (rows["sub/c"]["width"], rows["sub/c"]["height"]) == (24, 20)
    assert rows["e"]["alt_text"] == "from json" and json.loads(rows["e"]["meta"])["url"] == "http://x/e.png"
    assert rows["d"]["image"] == good["d.bmp"] and len(rows["d"]["sha256"]) == 64
    assert report.samples_version == store.table("samples").version

    again = ingest(root, store, kind="folder", cfg=CFG, progress=False)
    assert again.ingested == 0 and again.rejected["duplicate_id"] == len(rows) + 1
    assert store.count("samples") == len(rows)
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(again))
    assert "rejected: duplicate_id" in console.file.getvalue()


def test_folder_file_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "names"
    root.mkdir()
    (root / "ok.png").write_bytes(encode("PNG", 1))
    (root / "ok.txt").write_text("fine")
    base = os.fsencode(root)
    with open(base + b"/caf\xe9.png", "wb") as f:
        f.write(encode("PNG", 2))
    with open(base + b"/caf\xe9.txt", "wb") as f:
        f.write(b"a latin-1 file name")
    store = Store(tmp_path / "lance")
    report = ingest(root, store, cfg=CFG, progress=False)
    assert report.ingested == 1 and report.rejected == Counter({"non_utf8_key": 1})
    assert rejects_by_key(store) == {"caf\\xe9.png": "non_utf8_key"}


def test_folder_with_csv_and_jsonl_sidecars(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    for i in range(3):
        (root / f"img{i}.png").write_bytes(encode("PNG", i))
    (root / "captions.csv").write_bytes(
        b'file,caption\nimg0.png,first one\nimg1.png,"second, quoted"\nimg2.png,caf\xe9\nmissing.png,no image here\n'
    )
    store = Store(tmp_path / "lance")
    report = ingest(root, store, kind="folder", cfg=CFG, progress=False)
    assert report.ingested == 2 and report.rejected == Counter({"non_utf8_text": 1, "missing_image": 1})
    assert store.read("samples", ["alt_text"]).column("alt_text").to_pylist() == ["first one", "second, quoted"]

    root2 = tmp_path / "jsonl"
    root2.mkdir()
    (root2 / "x.png").write_bytes(encode("PNG", 1))
    (root2 / "y.png").write_bytes(encode("PNG", 2))
    (root2 / "captions.jsonl").write_text(
        '{"file": "x.png", "text": "ex"}\n{not json\n{"path": "./y.png", "alt_text": "why"}\n'
    )
    report = ingest(root2, store, kind="folder", split="val", cfg=CFG, progress=False, id_prefix="j/")
    assert report.ingested == 2 and report.rejected == Counter({"bad_caption_record": 1})
    assert store.ids("samples", where="split = 'val'") == {"j/x", "j/y"}

    (root2 / "captions.csv").write_text("name,words\nx.png,hi\n")
    with pytest.raises(ValueError, match="no file column"):
        ingest(root2, store, kind="folder", cfg=CFG, progress=False)


# --------------------------------------------------------------------------------- webdataset shards
def write_shard(path, members: list[tuple[str, bytes]]) -> None:
    target = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": path}
    with tarfile.open(mode="w", **target) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_webdataset_shards_like_img2dataset(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(
        shards / "00000.tar",
        [
            ("000000000.jpg", encode("JPEG", 1)),
            ("000000000.json", b'{"caption": "json one", "key": "000000000"}'),
            ("000000000.txt", b"txt wins"),
            ("000000001.png", encode("PNG", 2)),
            ("000000001.json", b'{"caption": "only json"}'),
            ("000000002.webp", encode("WEBP", 3)),
            ("000000002.txt", b"\xff\xfe bad"),
            ("000000003.txt", b"no image"),
            ("000000004.jpg", BAD_IMAGES["truncated.jpg"][0]),
            ("000000004.txt", b"broken"),
        ],
    )
    write_shard(
        shards / "00001.tar",
        [
            ("000000000.png", encode("PNG", 9)),
            ("000000000.txt", b"duplicate key"),
            ("000010000.jpg", encode("JPEG", 4)),
            ("000010000.txt", b"second shard"),
            ("000010001.jpg", encode("JPEG", 5)),
        ],
    )
    good = io.BytesIO()
    write_shard(
        good,
        [
            (f"{i:09d}.{ext}", blob)
            for i in range(20, 40)
            for ext, blob in (("png", encode("PNG", i, size=(64, 64))), ("txt", b"x" * 10))
        ],
    )
    (shards / "00002.tar").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # cut mid-member

    assert detect_kind(shards) == "wds"
    store = Store(tmp_path / "lance")
    report = ingest(shards, store, cfg=CFG, progress=False)
    assert report.kind == "wds"
    ids = store.ids("samples")
    assert {"000000000", "000000001", "000010000"} <= ids
    assert report.rejected["non_utf8_text"] == 1 and report.rejected["missing_image"] == 1
    assert report.rejected["corrupt_image"] == 1 and report.rejected["duplicate_id"] == 1
    assert report.rejected["missing_text"] == 1 and report.rejected["corrupt_shard"] == 1
    # the cut shard gives what precedes the cut, then one corrupt_shard reject that names where it broke
    from_cut = {i for i in ids if "000000020" <= i <= "000000039"}
    assert 1 <= len(from_cut) < 20 and report.ingested == 3 + len(from_cut)
    text = dict(zip(*store.read("samples", ["id", "alt_text"]).to_pydict().values()))
    assert text["000000000"] == "txt wins" and text["000000001"] == "only json"
    assert store.count("rejects", "reason = 'corrupt_shard'") == 1

    # a brace pattern and a glob name the same shards: everything is a duplicate now
    for pattern in (str(shards / "0000{0..1}.tar"), str(shards / "0000[01].tar")):
        again = ingest(pattern, store, kind="auto", cfg=CFG, progress=False)
        assert again.ingested == 0 and again.rejected["duplicate_id"] == 4
    with pytest.raises(FileNotFoundError):
        ingest(str(tmp_path / "none-*.tar"), store, kind="wds", cfg=CFG, progress=False)


# ----------------------------------------------------------------------------------------- parquet
def test_parquet_with_bytes_paths_and_hf_image_structs(tmp_path):
    store = Store(tmp_path / "lance")
    pq.write_table(
        pa.table(
            {
                "uid": ["u1", "u2", "u3", "u1"],
                "jpg": [encode("JPEG", 1), b"", encode("PNG", 3), encode("JPEG", 4)],
                "caption": ["one", "two", "   ", "dup"],
            }
        ),
        tmp_path / "bytes.parquet",
        row_group_size=2,
    )
    report = ingest(tmp_path / "bytes.parquet", store, cfg=CFG, progress=False)
    assert report.kind == "parquet" and report.ingested == 1
    assert report.rejected == Counter({"empty_image": 1, "empty_text": 1, "duplicate_id": 1})

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(encode("PNG", 5))
    pq.write_table(
        pa.table({"image_path": ["imgs/p.png", "imgs/gone.png"], "TEXT": ["by path", "lost"]}),
        tmp_path / "paths.parquet",
    )
    report = ingest(tmp_path / "paths.parquet", store, cfg=CFG, progress=False)
    assert report.ingested == 1 and report.rejected == Counter({"missing_image": 1})
    assert "paths-000000000" in store.ids("samples")

    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(
        pa.table(
            {
                "picture": pa.array([{"bytes": encode("WEBP", 6), "path": None}], struct_type),
                "words": ["hf style"],
                "id": ["h1"],
            }
        ),
        tmp_path / "hf.parquet",
    )
    with pytest.raises(ValueError, match="no image column"):
        ingest(tmp_path / "hf.parquet", store, cfg=CFG, progress=False, text_column="words")
    report = ingest(
        tmp_path / "hf.parquet", store, cfg=CFG, progress=False, image_column="picture", text_column="words"
    )
    assert report.ingested == 1 and "h1" in store.ids("samples")
    with pytest.raises(ValueError, match="no column 'nope'"):
        ingest(tmp_path / "hf.parquet", store, kind="parquet", cfg=CFG, progress=False, text_column="nope")
    assert store.count("samples") == 3


def test_duplicate_ids_are_refused_the_same_with_tiny_batches_and_lookups(tmp_path, monkeypatch):
    """The duplicate check looks ids up per read-ahead chunk (no set of every id): with one-row chunks and
    two-row commits it refuses exactly what the defaults refuse, within a chunk, across chunks and commits,
    and against an earlier ingest, and a first copy that is rejected for its image does not shadow a later
    good copy."""
    ids = ["a", "b", "a", "c", "b", "d", "bad", "bad", "e", "a", "f'q", "f'q"]
    images = [encode("PNG", i) for i in range(len(ids))]
    images[6] = b""  # the first "bad" is an empty image: the second "bad" is the one that goes in
    pq.write_table(
        pa.table({"id": ids, "image": images, "text": [f"t{i}" for i in range(len(ids))]}), tmp_path / "a.parquet"
    )
    pq.write_table(
        pa.table({"id": ["d", "g", "g"], "image": images[:3], "text": ["x", "y", "z"]}), tmp_path / "b.parquet"
    )
    outcomes = []
    tiny = {"write_batch": 2, "lookup_rows": 1}  # every chunk a lookup, rows waiting for their commit
    mid = {"write_batch": 2, "lookup_rows": 5}  # commits in the middle of a chunk
    for name, knobs in (("default", {}), ("tiny", tiny), ("mid", mid), ("indexed", mid)):
        if name == "indexed":  # ids looked up in a BTREE index refreshed every 2 rows (a large table's path)
            monkeypatch.setattr("cycle.store.KEY_INDEX_MIN_ROWS", 2)
            monkeypatch.setattr("cycle.data.ingest.ID_INDEX_REFRESH_ROWS", 2)
        store = Store(tmp_path / name)
        first = ingest(tmp_path / "a.parquet", store, cfg=CFG, progress=False, **knobs)
        second = ingest(tmp_path / "b.parquet", store, cfg=CFG, progress=False, **knobs)
        again = ingest(tmp_path / "a.parquet", store, cfg=CFG, progress=False, **knobs)
        samples = store.read("samples", ["id", "alt_text"]).to_pylist()
        rejects = sorted(map(tuple, (r.values() for r in store.read("rejects").to_pylist())))
        outcomes.append(
            (first.ingested, first.rejected, second.ingested, second.rejected, again.rejected, samples, rejects)
        )
    assert outcomes[0] == outcomes[1] == outcomes[2] == outcomes[3]
    assert [list(i.field_names) for i in store.table("samples").to_lance().describe_indices()] == [["id"]]
    ingested, rejected, ingested2, rejected2, rejected_again, samples, rejects = outcomes[0]
    assert ingested == 7 and rejected == Counter({"duplicate_id": 4, "empty_image": 1})
    assert ingested2 == 1 and rejected2 == Counter({"duplicate_id": 2})
    assert rejected_again == Counter({"duplicate_id": 12})  # the id is checked before the image
    assert [r["id"] for r in samples] == ["a", "b", "c", "d", "bad", "e", "f'q", "g"]
    assert [r["alt_text"] for r in samples][:5] == ["t0", "t1", "t3", "t5", "t7"]  # the first good copy wins
    assert ("a.parquet#2", "duplicate_id") in {(r[1], r[2]) for r in rejects}


def test_store_present_looks_ids_up_in_chunks(tmp_path):
    store = Store(tmp_path / "lance")
    assert store.present("samples", ["x"]) == set() and not store.has("samples")  # no table made by a lookup
    store.append("samples", [{"id": f"s{i}", "split": "train"} for i in range(7)] + [{"id": "it's"}])
    assert store.present("samples", ["s1", "s6", "nope", "it's", "s1"]) == {"s1", "s6", "it's"}
    assert store.count_by("samples", ["split", "id"], batch_size=3)[("train", "s0")] == 1
    assert store.count_by("samples", "split", batch_size=3) == {"train": 7, None: 1}


# --------------------------------------------------------------------------------------------- CLI
def test_cli_ingest_and_list(tmp_path):
    from cycle.cli import main

    root = tmp_path / "pics"
    root.mkdir()
    for i in range(3):
        (root / f"p{i}.png").write_bytes(encode("PNG", i))
        (root / f"p{i}.txt").write_text(f"picture {i}" if i else "")
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["data", "ingest", str(root), "--run", str(run), "--split", "val", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "ingested" in result.output and "empty_text" in result.output
    assert Store(run / "lance").count("samples", "split = 'val'") == 2
    result = runner.invoke(main, ["data", "list", str(run)])
    assert result.exit_code == 0, result.output
    assert "samples" in result.output and "val" in result.output and "empty_text" in result.output
    result = runner.invoke(main, ["data", "ingest", str(tmp_path / "absent"), "--run", str(run)])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = runner.invoke(main, ["data", "list", str(tmp_path / "no-run")])
    assert result.exit_code != 0 and "no store" in result.output
