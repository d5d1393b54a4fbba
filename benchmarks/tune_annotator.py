"""Tune the emoji demo's tiny annotator on the VALIDATION split: one setting per call.

For one list of config overrides (on top of configs/emoji.yaml) this builds the emoji-scenes data,
trains CLIP_0 on the raw alt-text (a plain open_clip contrastive loop: the quantity tuned here is the
annotator, not the CLIP trainer), then runs the real LVLM stages (prepare_lm, build_lvlm,
align_projector, sft), annotates the val images greedily and scores facts against the scene graph:
fact-F1 of the annotation (desc + tags) next to fact-F1 of the alt-text the annotator was given.

Data and CLIP_0 are cached per (data, CLIP epochs) setting under --root, so settings that only change
the LVLM reuse them. Each call appends one JSON line to <root>/results.jsonl; --table prints the
markdown table of all lines so far. With --gen0-run DIR the data, config and CLIP_0 come from a run whose
generation 0 is done (the real DeepSpeed trainer's CLIP, e.g. a run of benchmarks/tune_clip0.py); the
overrides then apply on top of that run's config.

    python benchmarks/tune_annotator.py --gen0-run generations/tune-clip0/p16-ep40 --label x -- lvlm.sft.epochs=8
    python benchmarks/tune_annotator.py --label base -- lvlm.lora.enabled=false lvlm.sft.lr=2e-3
    python benchmarks/tune_annotator.py --table
"""

import argparse
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

import torch

from cycle.config import load_config
from cycle.store import Store

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "emoji.yaml"


def train_clip0(store: Store, epochs: int, out: Path) -> None:
    """CLIP_0 on alt-text with a plain loop (batch 128, AdamW 5e-4), saved as a cycle checkpoint."""
    import open_clip
    from PIL import Image
    from tqdm import tqdm

    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    torch.manual_seed(0)
    model, preprocess, _, tokenizer = create_clip("hqclip-tiny")
    rows = store.read("samples", ["image", "alt_text"], "split = 'train'").to_pylist()
    images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    texts = tokenizer([r["alt_text"] for r in rows])
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2)
    for _ in tqdm(range(epochs), desc="CLIP_0 epochs"):
        perm = torch.randperm(len(rows))
        for s in range(0, len(rows) - 127, 128):
            i = perm[s : s + 128]
            img_f, txt_f, scale = model(images[i], texts[i])[:3]
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_clip(model, "hqclip-tiny", out)


def evaluate(merged: Path, store: Store, cfg, limit: int) -> dict:
    """Greedy annotation of val images; valid-JSON share and mean fact-F1 (annotation vs alt-text)."""
    from cycle.annotate.parse import parse_output
    from cycle.annotate.schema import build_prompt, model_input
    from cycle.data.emoji import fact_prf, load_vocab, scene_facts, text_facts
    from cycle.lvlm import load_lvlm
    from cycle.lvlm.data import decode

    vocab = load_vocab(cfg.data.emoji.vocab_size)
    model, proc = load_lvlm(merged)
    proc.tokenizer.padding_side = "left"
    rows = store.read("samples", ["id", "image", "alt_text", "meta"], "split = 'val'").to_pylist()[:limit]
    outs = []
    with torch.no_grad():
        for s in range(0, len(rows), 64):
            b = rows[s : s + 64]
            inp = proc(
                images=[decode(r["image"]) for r in b],
                text=[model_input(build_prompt(r["alt_text"])) for r in b],
                return_tensors="pt",
                padding=True,
            )
            o = model.generate(**inp, max_new_tokens=cfg.annotate.max_new_tokens, do_sample=False)
            outs += proc.batch_decode(o[:, inp.input_ids.shape[1] :], skip_special_tokens=True)
    f_ann, f_alt, ok = [], [], 0
    by_kind: dict = {}
    for r, o in zip(rows, outs):
        meta = json.loads(r["meta"])
        true = scene_facts(meta["scene"])
        parsed = parse_output(o)
        ok += parsed.record is not None  # valid after the lenient repair
        rec = parsed.record or {"desc": [], "tags": []}
        f_ann.append(fact_prf(text_facts(list(rec["desc"]) + list(rec["tags"]), vocab), true)["f1"])
        f_alt.append(fact_prf(text_facts(r["alt_text"], vocab), true)["f1"])
        by_kind.setdefault(meta.get("alt_noise", "unknown"), []).append((f_ann[-1], f_alt[-1]))
    n = max(1, len(rows))
    # the alt-text of "generic"/"filename" names nothing: there the annotation's F1 is image reading alone
    image_only = [a for k in ("generic", "filename") for a, _ in by_kind.get(k, [])]
    return {
        "n_val": len(rows),
        "valid_json": ok / n,
        "f1_annotation": sum(f_ann) / n,
        "f1_alt_text": sum(f_alt) / n,
        "f1_image_only": sum(image_only) / max(1, len(image_only)),
        "by_alt_noise": {
            k: [round(sum(a for a, _ in v) / len(v), 3), round(sum(b for _, b in v) / len(v), 3), len(v)]
            for k, v in sorted(by_kind.items())
        },
        "example": outs[0] if outs else "",
    }


def run(label: str, overrides: list[str], clip_epochs: int, root: Path, limit: int, gen0_run: Path = None) -> dict:
    from cycle.lvlm import align_projector, build_lvlm, prepare_lm, run_texts, sft

    torch.set_num_threads(1)
    times = {}
    if gen0_run is not None:
        # data and CLIP_0 of a real run (e.g. one of benchmarks/tune_clip0.py): its config, its trainer's CLIP
        cfg = load_config(str(gen0_run / "config.yaml"), ["device=cpu", *overrides])
        base_dir = root / ("run-" + gen0_run.name)
        base_dir.mkdir(parents=True, exist_ok=True)
        store = Store(gen0_run / "lance")
        clip_dir = gen0_run / "gen-000" / "clip" / "model"
        times["clip_s"] = float("nan")
    else:
        cfg = load_config(str(CONFIG), ["device=cpu", *overrides])
        data_key = json.dumps(
            {"emoji": dataclasses.asdict(cfg.data.emoji), "clip_epochs": clip_epochs}, sort_keys=True, default=str
        )
        base_dir = root / ("data-" + hashlib.sha1(data_key.encode()).hexdigest()[:10])
        base_dir.mkdir(parents=True, exist_ok=True)
        store = Store(base_dir / "lance")
        if store.count("samples") == 0:
            from cycle.data.emoji import build_emoji_scenes

            build_emoji_scenes(cfg.data.emoji, store, progress=True)
        clip_dir = base_dir / "clip"
        t = time.time()
        if not clip_dir.exists():
            train_clip0(store, clip_epochs, clip_dir)
        times["clip_s"] = time.time() - t
    out = base_dir / ("lvlm-" + label)
    t = time.time()
    # the LM depends on the data and lvlm.lm only: shared by settings that differ elsewhere
    lm_key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg.lvlm.lm), sort_keys=True).encode()).hexdigest()[:10]
    lm = prepare_lm(cfg.lvlm.lm, run_texts(store, None, None, cfg), base_dir / ("lm-" + lm_key), progress=True)
    times["lm_s"] = time.time() - t
    t = time.time()
    base = build_lvlm(clip_dir, lm, cfg.lvlm, out / "base")
    from cycle.lvlm.data import alt_text_caption_ids

    extra = alt_text_caption_ids(store, None, None, cfg.lvlm.align_alt_text_share, cfg.seed)
    aligned, _ = align_projector(base, store, None, None, cfg, out / "aligned", extra_ids=extra, progress=True)
    times["align_s"] = time.time() - t
    t = time.time()
    _, merged, m_sft = sft(aligned, store, None, None, cfg, out / "sft", progress=True)
    times["sft_s"] = time.time() - t
    t = time.time()
    result = evaluate(merged, store, cfg, limit)
    times["annotate_s"] = time.time() - t
    return {
        "label": label,
        "overrides": overrides,
        "clip_epochs": clip_epochs,
        "gen0_run": str(gen0_run or ""),
        "n_seeds": m_sft["sft/examples"],
        "sft_loss": m_sft["sft/loss_after"],
        **result,
        **times,
    }


def table(lines: list[dict]) -> str:
    head = (
        "| setting | overrides | seeds | valid JSON | F1 annotation | F1 alt-text | F1 image only | SFT loss | "
        "CLIP s | LM s | align s | SFT s | annotate s |\n|" + "---|" * 13
    )
    rows = [
        f"| {r['label']} | `{' '.join(r['overrides'])}` "
        f"{('CLIP_0 of ' + Path(r['gen0_run']).name) if r.get('gen0_run') else 'clip_epochs=%d' % r['clip_epochs']} | "
        f"{r['n_seeds']} | {r['valid_json']:.2f} | {r['f1_annotation']:.3f} | {r['f1_alt_text']:.3f} | "
        f"{r.get('f1_image_only', float('nan')):.3f} | {r['sft_loss']:.3f} | "
        f"{r['clip_s']:.0f} | {r['lm_s']:.0f} | {r['align_s']:.0f} | {r['sft_s']:.0f} | {r['annotate_s']:.0f} |"
        for r in lines
    ]
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="run")
    ap.add_argument("--clip-epochs", type=int, default=6)
    ap.add_argument("--root", type=Path, default=Path("/tmp/tune_annotator"))
    ap.add_argument(
        "--gen0-run",
        type=Path,
        default=None,
        help="a run dir whose gen 0 is done: use its data, config and trained CLIP_0",
    )
    ap.add_argument("--val-limit", type=int, default=200, help="val images annotated and scored")
    ap.add_argument("--table", action="store_true", help="print the markdown table of results so far")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides on top of configs/emoji.yaml")
    a = ap.parse_args()
    results = a.root / "results.jsonl"
    if not a.table:
        r = run(a.label, a.overrides, a.clip_epochs, a.root, a.val_limit, a.gen0_run)
        a.root.mkdir(parents=True, exist_ok=True)
        with results.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r, indent=1))
    lines = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.exists() else []
    print(table(lines))


if __name__ == "__main__":
    main()
