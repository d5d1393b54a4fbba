"""Does a CLIP's image embedding know which objects an emoji scene holds? A linear probe, val split.

Trains a multi-label linear classifier (objects of the scene graph) on the train images' normalised
embeddings of a run's CLIP_g and reports how often its top-1 object is really in the image, on train and
val. The figure quoted in benchmarks/results/tune_annotator.md ("47% of val images") comes from here.

    python benchmarks/probe_clip_objects.py generations/tune-clip0/p16-n4000-ep20 [--gen 0]
"""

import argparse
import io
import json
from pathlib import Path

import open_clip
import torch
from PIL import Image

from cycle.store import Store


def features(model, preprocess, store: Store, split: str):
    rows = store.read("samples", ["image", "meta"], f"split = '{split}'").to_pylist()
    x = torch.stack([preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    with torch.no_grad():
        f = torch.cat([model.encode_image(x[i : i + 256], normalize=True) for i in range(0, len(x), 256)])
    return f, [[o["name"] for o in json.loads(r["meta"])["scene"]["objects"]] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--gen", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{args.run / f'gen-{args.gen:03d}/clip/model'}"
    )
    model.eval()
    store = Store(args.run / "lance")
    f_train, o_train = features(model, preprocess, store, "train")
    f_val, o_val = features(model, preprocess, store, "val")
    names = {n: i for i, n in enumerate(sorted({n for o in o_train for n in o}))}

    def targets(objs):
        y = torch.zeros(len(objs), len(names))
        for i, o in enumerate(objs):
            y[i, [names[n] for n in o if n in names]] = 1
        return y

    y_train, y_val = targets(o_train), targets(o_val)
    probe = torch.nn.Linear(f_train.shape[1], len(names))
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(500):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(f_train * 10), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for split, f, y in (("train", f_train, y_train), ("val", f_val, y_val)):
            top = probe(f * 10).argmax(1)
            print(f"{split}: top-1 object is in the image for {float(y[torch.arange(len(y)), top].mean()):.3f}")


if __name__ == "__main__":
    main()
