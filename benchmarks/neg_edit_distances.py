"""How far is a true minimal edit? Word-level edit distances of the teacher's negatives (issue 10).

    python benchmarks/neg_edit_distances.py [--config configs/emoji.yaml]
                                            [--out benchmarks/results/neg_edit_distances.md]

The scene-graph teacher of emoji-scenes writes exact minimal edits (object, relation, count; a swapped tag),
so its distances say how large `loss.neg_max_edit_words` must be to keep every true minimal edit: the
bound exists to drop user/annotator negatives that are rewrites (possibly true), not edits. Text only (the
dataset plan, no images): seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cycle.clip.negatives import negative_part_stats, word_edit_distance  # noqa: E402
from cycle.config import load_config  # noqa: E402
from cycle.data.emoji.plan import plan_emoji_scenes  # noqa: E402


def distances(seeds: list[dict]) -> dict[str, Counter]:
    out = {"desc": Counter(), "tags": Counter()}
    for s in seeds:
        for pk, nk in (("desc", "neg_desc"), ("tags", "neg_tags")):
            out[pk].update(word_edit_distance(p, q) for p, q in zip(s[pk], s[nk]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "emoji.yaml"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "neg_edit_distances.md"))
    args = ap.parse_args()
    cfg = load_config(args.config, ["data.emoji.seed_share=1.0"])
    seeds = plan_emoji_scenes(cfg.data.emoji).seeds
    dist = distances(seeds)
    bound = cfg.loss.neg_max_edit_words
    lines = [
        "# Word edit distance of the teacher's minimal edits",
        "",
        f"Command: `python benchmarks/neg_edit_distances.py --config {args.config}` "
        f"({len(seeds)} teacher annotations of the config's training scenes, `data.emoji.seed_share=1.0`).",
        "",
        "| parts | n | " + " | ".join(f"d={d}" for d in range(0, 11)) + " | d>10 | max |",
        "|" + "---|" * 15,
    ]
    for kind, c in dist.items():
        n = sum(c.values())
        cells = [f"{c.get(d, 0) / n:.3f}" for d in range(0, 11)]
        over = sum(v for d, v in c.items() if d > 10) / n
        lines.append(f"| {kind} | {n} | " + " | ".join(cells) + f" | {over:.3f} | {max(c)} |")
    stats = negative_part_stats(seeds, bound)
    lines += [
        "",
        f"With the config's `loss.neg_max_edit_words={bound}`: identical parts "
        f"{stats['identical_negative_share']:.4f}, parts beyond the bound {stats['too_far_negative_share']:.4f} "
        "(true minimal edits the bound would drop).",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
