"""Does a LLaVA use the image? Teacher-forced loss on seed examples with their own image vs another's.

For the aligned model (captioning) and the SFT model (the four formulas, the alt-text replaced by the
word "image" so that only the pixels can tell), the mean loss on 192 seed examples with the true images
and with the images rolled by one inside each batch. Equal losses: the image is ignored; a large gap on
seeds with a val F1 of zero from the pixels alone (benchmarks/tune_annotator.py): the seeds are memorised.

    python benchmarks/lvlm_image_use.py RUN_DIR LVLM_DIR   # LVLM_DIR holds aligned/ and sft/merged/
"""

import argparse
from pathlib import Path

import torch

from cycle.annotate.schema import build_prompt, model_input
from cycle.lvlm.assemble import load_lvlm
from cycle.lvlm.data import align_examples, align_input, make_batches, sft_examples
from cycle.store import Store


def mean_loss(model, batches, roll: bool) -> float:
    losses = []
    with torch.no_grad():
        for batch in batches:
            if roll:
                batch["pixel_values"] = batch["pixel_values"].roll(1, 0)
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("lvlm", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = Store(args.run / "lance")
    for stage, examples_of, text in (
        ("aligned", align_examples, align_input),
        ("sft/merged", sft_examples, lambda e, epoch: model_input(build_prompt("image"))),
    ):
        model, processor = load_lvlm(args.lvlm / stage, torch.device("cpu"))
        model.eval()
        batches, _ = make_batches(examples_of(store, None, None)[:192], processor, 32, 0, 400, text)
        print(
            f"{stage}: loss with the true image {mean_loss(model, batches(0), False):.4f}, "
            f"with another seed's {mean_loss(model, batches(0), True):.4f}"
        )


if __name__ == "__main__":
    main()
