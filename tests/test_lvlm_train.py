"""LVLM training stages on a synthetic shapes store: projector alignment and SFT (LoRA and full LM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_YAML
from lvlm_fixtures import shapes_rows

from cycle.annotate.schema import build_prompt, model_input
from cycle.config import load_config

TOWER, PROJECTOR, LM = "model.vision_tower.", "model.multi_modal_projector.", ("model.language_model.", "lm_head.")


def run_cfg(*overrides: str):
    return load_config(
        TINY_YAML,
        [
            "device=cpu",
            "lvlm.lm.pretrain_epochs=12",
            "lvlm.lm.pretrain_lr=3e-3",
            "lvlm.lm.batch_size=16",
            "lvlm.align.epochs=2",
            "lvlm.align.lr=3e-3",
            "lvlm.sft.epochs=4",
            "lvlm.sft.lr=3e-3",
            "lvlm.sft.warmup_steps=2",
            "lvlm.lora.enabled=true",
            *overrides,
        ],
    )  # LoRA unless a test says otherwise


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Store with 32 shape samples (all seeded), a micro CLIP, the tiny LM and the base LLaVA."""
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip
    from cycle.lvlm import build_lvlm, prepare_lm, run_texts
    from cycle.store import Store

    root = tmp_path_factory.mktemp("lvlm-train")
    store = Store(root / "lance")
    samples, seeds = shapes_rows(32)
    store.append("samples", samples)
    store.insert_new("teacher", seeds)
    sv, teacher_v = store.version("samples"), store.version("teacher")
    torch.manual_seed(0)
    clip, _, _, _ = create_clip("hqclip-micro")
    clip_dir = save_clip(clip, "hqclip-micro", root / "clip")
    cfg = run_cfg()
    lm_dir = prepare_lm(cfg.lvlm.lm, run_texts(store, sv, teacher_v), root / "lm", progress=False)
    base = build_lvlm(clip_dir, lm_dir, cfg.lvlm, root / "base")
    return {"root": root, "store": store, "sv": sv, "teacher_v": teacher_v, "base": base, "samples": samples}


@pytest.fixture(scope="module")
def aligned(world):
    from cycle.lvlm import align_projector

    out, metrics = align_projector(
        world["base"],
        world["store"],
        world["sv"],
        world["teacher_v"],
        run_cfg(),
        world["root"] / "aligned",
        progress=False,
    )
    return out, metrics


@pytest.fixture(scope="module")
def lora_sft(world, aligned):
    from cycle.lvlm import sft

    return sft(
        aligned[0],
        world["store"],
        world["sv"],
        world["teacher_v"],
        run_cfg(),
        world["root"] / "sft-lora",
        progress=False,
    )


def state(directory):
    from cycle.lvlm import load_lvlm

    return {k: v.clone() for k, v in load_lvlm(directory)[0].state_dict().items()}


def changed(a: dict, b: dict, prefixes) -> list[str]:
    return [k for k in a if k.startswith(prefixes) and not torch.equal(a[k], b[k])]


def unchanged(a: dict, b: dict, prefixes) -> list[str]:
    return [k for k in a if k.startswith(prefixes) and torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------------------- align
def test_align_trains_only_the_projector(world, aligned):
    before, after = state(world["base"]), state(aligned[0])
    assert not changed(before, after, (TOWER, *LM))
    assert not unchanged(before, after, PROJECTOR)  # every projector tensor moved
    metrics = aligned[1]
    assert metrics["align/examples"] == 32 and metrics["align/truncated"] == 0
    assert metrics["align/loss_after"] < metrics["align/loss_before"]
    # stored once: the aligned LLaVA's LM and tower files are hard links to the base's, its projector its own
    base, out = Path(world["base"]), Path(aligned[0])
    for part, shared in (("lm", True), ("tower", True), ("projector", False)):
        assert (out / f"{part}.safetensors").samefile(base / f"{part}.safetensors") is shared, part
    assert (out / "lm.safetensors").stat().st_nlink >= 2


def test_align_is_deterministic_and_records_its_metrics(world, aligned, tmp_path):
    from cycle.lvlm import align_projector

    again, metrics = align_projector(
        world["base"], world["store"], world["sv"], world["teacher_v"], run_cfg(), tmp_path / "again", progress=False
    )
    a, b = state(aligned[0]), state(again)
    assert all(torch.equal(a[k], b[k]) for k in a) and metrics == aligned[1]
    info = json.loads((again / "info.json").read_text())
    assert info["metrics"] == metrics and len(info["epoch_losses"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # staged aside, renamed whole


def test_the_loss_probe_changes_figures_never_weights(world, aligned, tmp_path, monkeypatch):
    import cycle.lvlm.align as align_stage

    # loss before/after on fewer batches (1 instead of up to LOSS_PROBE_BATCHES): other figures, same weights
    monkeypatch.setattr(align_stage, "LOSS_PROBE_BATCHES", 1)
    again, metrics = align_stage.align_projector(
        world["base"], world["store"], world["sv"], world["teacher_v"], run_cfg(), tmp_path / "probe", progress=False
    )
    a, b = state(aligned[0]), state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["align/loss_before"] != aligned[1]["align/loss_before"]
    assert metrics["align/epoch_loss_last"] == aligned[1]["align/epoch_loss_last"]


# ----------------------------------------------------------------------------------------------- SFT data
def test_sft_batches_put_the_loss_on_the_target_only(world, aligned):
    from cycle.lvlm import load_lvlm
    from cycle.lvlm.data import make_batches, sft_examples, sft_input

    _, processor = load_lvlm(aligned[0])
    examples = sft_examples(world["store"], world["sv"], world["teacher_v"])
    batches, steps = make_batches(examples, processor, 8, 0, 400, sft_input())
    batch = next(iter(batches(0)))
    tok = processor.tokenizer
    for row, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        target = labels[labels != -100]
        assert target[-1] == tok.eos_token_id
        text = tok.decode(target[:-1])
        assert text.startswith('{"desc":["the image shows') and text.endswith('"]}')
        assert torch.equal(row[n - len(target) : n], target)  # the target is the end of the sequence
        assert int((row == processor.image_token_id).sum()) == 17
    assert steps == 4
    orders = [[tok.decode(b["input_ids"][0][:40]) for b in batches(e)] for e in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]  # order is a function of (seed, epoch)


def test_fresh_alt_text_per_epoch_reaches_the_input(world, aligned):
    from cycle.lvlm import load_lvlm
    from cycle.lvlm.data import make_batches, sft_examples, sft_input

    _, processor = load_lvlm(aligned[0])
    examples = sft_examples(world["store"], world["sv"], world["teacher_v"])[:4]
    calls = []

    def fresh(example, epoch):
        calls.append((example.id, epoch))
        return f"noisy alt text number {epoch}"

    batches, _ = make_batches(examples, processor, 4, 0, 400, sft_input(fresh))
    text = processor.tokenizer.decode(next(iter(batches(3)))["input_ids"][0], skip_special_tokens=True)
    assert "reference: noisy alt text number 3" in text and len(calls) == 4 and calls[0][1] == 3


# ----------------------------------------------------------------------------------------------- SFT
def test_lora_touches_only_lm_projections(aligned):
    from cycle.lvlm import load_lvlm
    from cycle.lvlm.finetune import with_lora

    model, _ = load_lvlm(aligned[0])
    model.requires_grad_(False)
    peft_model = with_lora(model, run_cfg().lvlm.lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    wrapped = {n.rsplit(".lora_", 1)[0].split(".")[-1] for n in trainable}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lora_" in n for n, _ in peft_model.named_modules() if "vision_tower" in n or "projector" in n)


def test_lora_sft_lowers_loss_and_keeps_tower_and_projector(aligned, lora_sft):
    adapter, merged, metrics = lora_sft
    assert adapter is not None and (adapter / "adapter_config.json").is_file()
    assert metrics["sft/loss_after"] < metrics["sft/loss_before"] - 0.02, metrics  # LoRA: small steps
    before, after = state(aligned[0]), state(merged)
    assert not changed(before, after, (TOWER, PROJECTOR))
    assert changed(before, after, "model.language_model.layers.")
    assert not changed(before, after, ("model.language_model.embed_tokens.",))  # LoRA: projections only
    log = [json.loads(line) for line in (merged.parent / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 * 2 and log[0]["step"] == 1 and log[-1]["loss"] > 0


def test_merged_generates_what_model_plus_adapter_generates(world, aligned, lora_sft):
    from peft import PeftModel

    from cycle.lvlm import load_lvlm
    from cycle.lvlm.data import decode

    adapter, merged, _ = lora_sft
    base, processor = load_lvlm(aligned[0])
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged_model, _ = load_lvlm(merged)
    processor.tokenizer.padding_side = "left"
    rows = world["samples"][:4]
    inputs = processor(
        images=[decode(r["image"]) for r in rows],
        text=[model_input(build_prompt(r["alt_text"])) for r in rows],
        return_tensors="pt",
        padding=True,
    )
    kwargs = dict(max_new_tokens=16, do_sample=False)
    a = with_adapter.generate(**inputs, **kwargs)
    b = merged_model.generate(**inputs, **kwargs)
    assert torch.equal(a, b)
    assert (a[:, inputs.input_ids.shape[1] :] != processor.tokenizer.pad_token_id).any()


def test_full_sft_trains_the_lm_only(world, aligned, tmp_path):
    from cycle.lvlm import sft

    adapter, merged, metrics = sft(
        aligned[0],
        world["store"],
        world["sv"],
        world["teacher_v"],
        run_cfg("lvlm.lora.enabled=false"),
        tmp_path / "sft-full",
        progress=False,
    )
    assert adapter is None and not (tmp_path / "sft-full" / "adapter").exists()
    assert metrics["sft/loss_after"] < metrics["sft/loss_before"] - 0.2, metrics
    before, after = state(aligned[0]), state(merged)
    assert not changed(before, after, (TOWER, PROJECTOR))
    assert changed(before, after, ("model.language_model.embed_tokens.",))


def test_sft_output_is_whole_and_records_its_metrics(world, aligned, lora_sft):
    adapter, merged, metrics = lora_sft
    out = merged.parent
    assert adapter == out / "adapter" and (merged / "config.json").is_file()
    assert json.loads((out / "info.json").read_text())["metrics"] == metrics
    assert not list(out.rglob("fingerprint.json"))  # the controller's state.json is the only record
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".sft-lora")]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_seed_and_extra_records_are_refused(world, aligned, tmp_path):
    from cycle.errors import HQClipError
    from cycle.lvlm import sft
    from cycle.lvlm.data import sft_examples
    from cycle.store import Store

    cfg = run_cfg()
    good = {"id": "shape-000", "desc": ["a"], "neg_desc": ["b"], "tags": ["c"], "neg_tags": ["d"]}
    with pytest.raises(ValueError, match="extra SFT record 'shape-000' is invalid.*'neg_desc' has 2"):
        sft_examples(world["store"], world["sv"], world["teacher_v"], [{**good, "neg_desc": ["b", "e"]}])
    with pytest.raises(ValueError, match="'tags' is empty"):
        sft(
            aligned[0],
            world["store"],
            world["sv"],
            world["teacher_v"],
            cfg,
            tmp_path / "x",
            extra_records=[{**good, "tags": [], "neg_tags": []}],
            progress=False,
        )
    other = Store(tmp_path / "lance")  # a teacher table whose ids have no samples, and one invalid row
    other.insert_new("teacher", [{**good, "id": "nowhere", "origin": "t"}])
    other.append("samples", world["samples"][:2])
    with pytest.raises(ValueError, match="no SFT examples"):
        sft_examples(other, None, None)
    other.insert_new("teacher", [{**good, "id": "shape-001", "neg_tags": ["d", "e"], "origin": "t"}])
    with pytest.raises(HQClipError, match="teacher table has 1 invalid records, e.g. 'shape-001'"):
        sft_examples(other, None, None)
    broken = Store(tmp_path / "broken")  # a seed whose image bytes are not an image
    broken.append("samples", [{**world["samples"][0], "image": b"\x89PNG garbage"}])
    broken.insert_new("teacher", [{**good, "origin": "t"}])
    with pytest.raises(ValueError, match="SFT example 'shape-000': its image does not decode"):
        sft_examples(broken, None, None)
    assert not (tmp_path / "x").exists()


def test_bad_lora_targets_and_missing_gpu_are_refused(world, aligned, tmp_path):
    from cycle.config import ConfigError
    from cycle.errors import HQClipError
    from cycle.lvlm import sft

    with pytest.raises(HQClipError, match="lvlm.lora.target_modules.*match no module"):
        sft(
            aligned[0],
            world["store"],
            world["sv"],
            world["teacher_v"],
            run_cfg("lvlm.lora.target_modules=[qkv]"),
            tmp_path / "x",
            progress=False,
        )
    with pytest.raises(ConfigError, match="lvlm.lora.target_modules': empty"):
        run_cfg("lvlm.lora.target_modules=[]")
    run_cfg("lvlm.lora.target_modules=[]", "lvlm.lora.enabled=false")  # unused without LoRA
    if not torch.cuda.is_available():
        with pytest.raises(HQClipError, match="no CUDA GPU"):
            sft(
                aligned[0],
                world["store"],
                world["sv"],
                world["teacher_v"],
                run_cfg("device=cuda"),
                tmp_path / "y",
                progress=False,
            )


def test_best_previous_annotations_takes_the_top_share(tmp_path):
    from cycle.lvlm import best_previous_annotations
    from cycle.store import Store

    store = Store(tmp_path / "lance")
    rec = {
        "desc": ["a"],
        "neg_desc": ["b"],
        "tags": ["c"],
        "neg_tags": ["d"],
        "raw_output": "",
        "reason": "",
        "attempts": 1,
        "annotator": "t",
        "prompt_hash": "h",
        "score": 0.0,
    }
    rows = [{**rec, "id": f"s{i}", "generation": 1, "status": "repaired" if i == 8 else "ok"} for i in range(10)]
    rows += [
        {**rec, "id": "bad", "generation": 1, "status": "failed"},
        {**rec, "id": "s9", "generation": 2, "status": "ok"},
        {**rec, "id": "seed", "generation": 1, "status": "ok"},
        {**rec, "id": "s70", "generation": 1, "status": "ok", "desc": ["tie"]},
    ]
    store.insert_new("annotations", rows)
    rating = {**{f"s{i}": float(i) for i in range(10)}, "bad": 99.0, "seed": None, "s70": 7.0}
    seen: list[str] = []

    def fit(batch):
        seen.extend(r["id"] for r in batch)
        return [rating[r["id"]] for r in batch]

    best = best_previous_annotations(store, None, 1, 0.3, fit)
    # only generation 1's usable rows are rated; a None rating (a seed image) is never picked
    assert sorted(seen) == sorted([f"s{i}" for i in range(10)] + ["seed", "s70"])
    # rated a row at a time, the same answer (a heap of the best, not a sorted list of every row)
    assert best_previous_annotations(store, None, 1, 0.3, fit, batch_size=1) == best
    # 0.3 of the 12 usable rows -> 4, best first
    assert [r["id"] for r in best] == ["s9", "s8", "s7", "s70"] and set(best[0]) == {
        "id",
        "desc",
        "neg_desc",
        "tags",
        "neg_tags",
    }
    assert best[3]["desc"] == ["tie"] and best[2]["desc"] == ["a"]  # a tie in rating goes by id
    assert best_previous_annotations(store, None, 1, 0.0, fit) == []


def test_clip_fit_and_margin_equal_brute_force(tmp_path):
    """`ClipScorer.fit` (mean cos(image, desc sentence)) and `.score` (mean margin over desc/neg pairs)
    against the same cosines computed one text at a time; `clip_fit` skips seed images."""
    import io

    from PIL import Image

    from cycle.annotate.score import ClipScorer
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    clip_dir = save_clip(create_clip("hqclip-micro")[0], "hqclip-micro", tmp_path / "clip")
    scorer = ClipScorer(clip_dir)
    images = []
    for color in ("red", "blue", "green"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buf, format="PNG")
        images.append(buf.getvalue())
    images.append(b"not an image")
    records = [
        {"desc": ["a red square.", "it is big."], "neg_desc": ["a blue square.", "it is small."]},
        {"desc": ["a blue square."], "neg_desc": ["a red square."]},
        None,
        {"desc": ["anything."], "neg_desc": ["nothing."]},
    ]
    fit, margin = scorer.fit(images, records), scorer.score(images, records)
    assert fit[2] is None and fit[3] is None and margin[2] is None and margin[3] is None

    def cos(image, text):
        pixels = scorer.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        with torch.no_grad():
            x = torch.nn.functional.normalize(scorer.model.encode_image(pixels).float(), dim=-1)
            y = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer([text])).float(), dim=-1)
        return float((x * y).sum())

    for i in (0, 1):
        want = sum(cos(images[i], t) for t in records[i]["desc"]) / len(records[i]["desc"])
        assert fit[i] == pytest.approx(want, abs=1e-5)
        pairs = list(zip(records[i]["desc"], records[i]["neg_desc"]))
        want = sum(cos(images[i], p) - cos(images[i], n) for p, n in pairs) / len(pairs)
        assert margin[i] == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------------------------- emoji data
def test_emoji_seeds_get_fresh_alt_text_each_epoch(tiny_store, tiny_cfg):
    from cycle.lvlm import run_texts
    from cycle.lvlm.data import emoji_alt_text_fn, sft_examples

    examples = sft_examples(tiny_store, None, None)
    assert len(examples) == tiny_store.count("teacher") > 0
    fresh = emoji_alt_text_fn(tiny_cfg.data.emoji, seed=0)
    assert all(fresh(e, 0) is None for e in examples)  # epoch 0 shows the stored alt-text
    per_epoch = [[fresh(e, epoch) for e in examples] for epoch in (1, 2)]
    assert per_epoch[0] == [fresh(e, 1) for e in examples]  # a function of (seed, id, epoch)
    assert sum(a != b for a, b in zip(*per_epoch)) > len(examples) // 4
    assert all(isinstance(t, str) and t for t in per_epoch[0])
    texts = list(run_texts(tiny_store, None, None))
    n_train = tiny_store.count("samples", "split = 'train'")
    assert len(texts) == n_train + len(examples)
    with_variants = list(run_texts(tiny_store, None, None, tiny_cfg))  # + pretrain_seed_variants per seed
    variants = tiny_cfg.lvlm.lm.pretrain_seed_variants
    assert variants > 0 and len(with_variants) == n_train + len(examples) * (1 + variants)
    first = with_variants[n_train : n_train + 1 + variants]  # one seed: stored alt-text, then fresh ones
    assert len({t.split("answer:")[1] for t in first}) == 1  # the same answer ...
    assert len({t.split("answer:")[0] for t in first}) > 1  # ... after different references


def test_samples_by_id_fetches_in_chunks_and_quotes_ids(tmp_path):
    from cycle.lvlm.data import samples_by_id
    from cycle.store import Store

    store = Store(tmp_path / "lance")
    samples, _ = shapes_rows(5)
    samples[2]["id"] = 'it\'s "odd"'
    store.append("samples", samples)
    got = samples_by_id(store, None, [s["id"] for s in samples[1:]] + ["absent"], chunk=2)
    assert sorted(got) == sorted(s["id"] for s in samples[1:])
    assert got['it\'s "odd"']["image"] == samples[2]["image"]


def test_alignment_adds_a_seeded_share_of_alt_text_captions(tiny_store):
    from cycle.lvlm.data import align_examples, alt_text_caption_ids

    seeds = {r["id"] for r in tiny_store.read("teacher", ["id"]).to_pylist()}
    rows = tiny_store.read("samples", ["id", "alt_text", "split"]).to_pylist()
    alt = {r["id"]: r["alt_text"] for r in rows}
    eligible = {r["id"] for r in rows if r["split"] == "train" and r["id"] not in seeds and r["alt_text"].strip()}
    assert alt_text_caption_ids(tiny_store, None, None, 0.0, 0) == []
    assert alt_text_caption_ids(tiny_store, None, None, 1.0, 0) == sorted(eligible)
    half = alt_text_caption_ids(tiny_store, None, None, 0.5, 0)
    assert half == sorted(half) and set(half) <= eligible and 0.3 < len(half) / len(eligible) < 0.7
    assert half == alt_text_caption_ids(tiny_store, None, None, 0.5, 0)  # a pure function of the seed
    assert half != alt_text_caption_ids(tiny_store, None, None, 0.5, 1)
    # each id's draw is its own (no list of every id): a row at a time draws the same, a smaller share a subset
    assert alt_text_caption_ids(tiny_store, None, None, 0.5, 0, batch_size=1) == half
    assert set(alt_text_caption_ids(tiny_store, None, None, 0.25, 0)) <= set(half)
    examples = align_examples(tiny_store, None, None, half)
    extra = [e for e in examples if e.id not in seeds]
    assert len(examples) == len(seeds) + len(half) and all(e.target == alt[e.id] for e in extra)


def test_alignment_adds_the_previous_generations_best_annotations(tiny_store):
    from cycle.lvlm.data import align_examples

    seeds = {r["id"] for r in tiny_store.read("teacher", ["id"]).to_pylist()}
    others = sorted(
        r["id"] for r in tiny_store.read("samples", ["id"], "split = 'train'").to_pylist() if r["id"] not in seeds
    )
    best = [{"id": i, "desc": [f"the image shows thing {n}.", "more."]} for n, i in enumerate(others[:3])]
    best.append({"id": sorted(seeds)[0], "desc": ["a seed keeps its teacher caption."]})
    examples = {e.id: e for e in align_examples(tiny_store, None, None, extra_ids=others[:5], extra_records=best)}
    assert len(examples) == len(seeds) + 5  # 3 annotated + 2 alt-text captioned, seeds once each
    assert [examples[i].target for i in others[:3]] == [f"the image shows thing {n}. more." for n in range(3)]
    assert examples[sorted(seeds)[0]].target != "a seed keeps its teacher caption."
    sources = [e.source for e in examples.values()]
    assert (sources.count("seed"), sources.count("previous"), sources.count("alt_text")) == (len(seeds), 3, 2)


@pytest.mark.slow
def test_ray_sft_two_workers_train_to_the_one_process_weights(world, aligned, tmp_path):
    """`cluster.executor: ray`: SFT on two Ray Train workers (gloo), each on its rows of every batch with
    token-weighted gradients, ends where one process ends on the whole batches; rank 0 writes the output."""
    import ray

    from cycle.lvlm import sft
    from cycle.lvlm.ray_stage import run_lvlm_stage

    overrides = ("lvlm.lora.enabled=false", "lvlm.sft.epochs=2", "lvlm.sft.batch_size=5")
    args = dict(
        lvlm_dir=aligned[0],
        samples_version=world["sv"],
        teacher_version=world["teacher_v"],
        progress=False,
    )
    _, one, one_metrics = sft(cfg=run_cfg(*overrides), store=world["store"], out_dir=tmp_path / "one", **args)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        on_ray = run_cfg(*overrides, "cluster.executor=ray", "cluster.lvlm.workers=2")
        _, two, two_metrics = run_lvlm_stage("sft", on_ray, world["store"], out_dir=tmp_path / "two", **args)
    finally:
        ray.shutdown()
    assert two == tmp_path / "two" / "merged" and (tmp_path / "two" / "log.jsonl").is_file()
    assert set(one_metrics) == set(two_metrics)
    for key in ("sft/loss_before", "sft/loss_after", "sft/epoch_loss_first", "sft/epoch_loss_last"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=1e-5), key
    a, b = state(one), state(two)
    moved = changed(state(aligned[0]), a, LM)
    assert moved and not changed(a, b, (TOWER, PROJECTOR))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in moved)
    assert worst < 1e-4, worst
