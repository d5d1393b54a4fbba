"""The dataset as text: every row's scene graph, alt-text and meta, and the teacher seeds; no pixels.

Everything is drawn from `random.Random` streams named by (seed, purpose), so the plan is a pure function
of the config, and changing one part (say the alt-text rates) leaves the others (the scenes) as they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cycle.config import ConfigError, EmojiScenesConfig, check_emoji

from .altnoise import corrupt
from .edits import EDITS, apply_edit
from .language import describe
from .reword import reworded_captions, reworded_negatives
from .scenes import Deck, SceneSampler, check_limits, heldout_pairs, render_signature, scene_key, scene_pairs
from .seeds import seed_annotation
from .vocab import Vocab, load_vocab

SPLITS = ("train", "val", "test_zeroshot", "test_retrieval", "test_negatives", "test_compositional")
_TRIES = 2000  # draws per held-out scene before giving up on finding an unseen one


@dataclass
class PlannedRow:
    id: str
    split: str
    scene: dict
    alt_text: str
    meta: dict


@dataclass
class Plan:
    vocab: Vocab
    heldout: set[tuple[str, str]]
    rows: list[PlannedRow] = field(default_factory=list)
    seeds: list[dict] = field(default_factory=list)  # rows of the `seed` table (without origin)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in SPLITS}
        for row in self.rows:
            out[row.split] += 1
        return out


def row_id(split: str, index: int) -> str:
    return f"emoji-{split}-{index:06d}"


def check_config(cfg: EmojiScenesConfig) -> None:
    """The layout's limits, then the config's own checks (`cycle.config.check_emoji`, which `load_config`
    runs too: the builder may be handed a config that never went through it)."""
    check_limits(cfg.max_objects, cfg.max_count)
    check_emoji(cfg)


class _Planner:
    def __init__(self, cfg: EmojiScenesConfig):
        check_config(cfg)
        self.cfg = cfg
        self.vocab = load_vocab(cfg.vocab_size)
        heldout = heldout_pairs(
            self.vocab.names, cfg.heldout_pair_share, self.rng("pairs"), at_least_one=cfg.n_test_compositional > 0
        )
        self.plan = Plan(self.vocab, heldout)
        self.seen_keys: set[tuple] = set()  # train/val scene keys, then every held-out scene's
        self.train_signatures: set[tuple] = set()

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"emoji-scenes:{self.cfg.seed}:{purpose}")

    def sampler(self, split: str, forbidden: set) -> SceneSampler:
        c = self.cfg
        return SceneSampler(self.vocab, c.image_size, c.max_objects, c.max_count, self.rng(split), forbidden)

    def add(self, split: str, index: int, scene: dict, alt_rng: random.Random, **meta) -> PlannedRow:
        alt_text, kind = corrupt(scene, self.vocab, self.cfg.alt_noise, alt_rng, self.cfg.max_count)
        row = PlannedRow(
            row_id(split, index),
            split,
            scene,
            alt_text,
            {"scene": scene, "clean": describe(scene), "alt_noise": kind, **meta},
        )
        self.plan.rows.append(row)
        return row

    def edited(self, scene: dict, rng: random.Random) -> list[tuple[str, dict]]:
        """(edit, edited scene) per edit kind: the minimal-edit negatives of a scene."""
        return [(kind, apply_edit(kind, scene, self.vocab, rng, self.cfg.max_count)[0]) for kind in EDITS]

    def negatives(self, edited: list[tuple[str, dict]]) -> list[dict]:
        return [{"text": describe(s), "edit": kind} for kind, s in edited]

    def reword_rng(self, split: str, index: int) -> random.Random:
        """A row's own stream for its other wordings: they change no other stream, so train, val and the
        template captions stay as they were, and the wordings follow the seed and the row alone."""
        return self.rng(f"reword:{row_id(split, index)}")

    def plain_flags(self, n: int, rng: random.Random) -> list[bool]:
        k = round(self.cfg.single_object_share * n)
        flags = [True] * k + [False] * (n - k)
        rng.shuffle(flags)
        return flags

    def seen_split(self, split: str, n: int) -> list[dict]:
        """Train or val scenes: the training distribution (plain share, no held-out pair)."""
        sampler, rng = self.sampler(split, self.plan.heldout), self.rng(f"{split}:plain")
        scenes = [sampler.scene(plain=flag) for flag in self.plain_flags(n, rng)]
        self.seen_keys |= {scene_key(s) for s in scenes}
        self.train_signatures |= {render_signature(s) for s in scenes}
        return scenes

    def unseen(self, split: str, draw) -> dict:
        """A scene whose key no earlier split has (train, val, other held-out sets)."""
        for _ in range(_TRIES):
            scene = draw()
            if scene is not None and scene_key(scene) not in self.seen_keys:
                self.seen_keys.add(scene_key(scene))
                return scene
        raise ConfigError(
            f"config key 'data.emoji.n_{split}': could not draw enough scenes unlike those of "
            "the other splits; raise vocab_size, max_objects or max_count, or lower n_" + split
        )

    def build(self) -> Plan:
        c, plan = self.cfg, self.plan
        train = self.seen_split("train", c.n_train)
        alt = self.rng("train:alt")
        rows = [self.add("train", i, s, alt) for i, s in enumerate(train)]
        seeded = sorted(self.rng("seeds").sample(range(len(rows)), round(c.seed_share * len(rows))))
        seed_rng = self.rng("seeds:text")
        for i in seeded:
            ann = seed_annotation(rows[i].scene, self.vocab, seed_rng, c.max_count)
            rows[i].meta["seed_edits"] = ann.pop("edits")
            plan.seeds.append({"id": rows[i].id, **ann})

        val, alt, neg = self.seen_split("val", c.n_val), self.rng("val:alt"), self.rng("val:neg")
        for i, s in enumerate(val):
            clean = describe(s)
            self.add("val", i, s, alt, captions=[clean], positive=clean, negatives=self.negatives(self.edited(s, neg)))

        for split in ("test_retrieval", "test_negatives"):
            sampler, alt, neg = self.sampler(split, plan.heldout), self.rng(f"{split}:alt"), self.rng(f"{split}:neg")
            for i in range(getattr(c, f"n_{split}")):
                s = self.unseen(split, sampler.scene)
                clean, reword = describe(s), self.reword_rng(split, i)
                if split == "test_retrieval":
                    extra = {"captions": [clean], "reworded": reworded_captions(s, reword)}
                else:
                    edited = self.edited(s, neg)
                    extra = {
                        "positive": clean,
                        "negatives": self.negatives(edited),
                        "reworded": reworded_negatives(s, edited, reword),
                    }
                self.add(split, i, s, alt, **extra)

        self.compositional()
        self.zeroshot()
        return plan

    def compositional(self) -> None:
        c, plan = self.cfg, self.plan
        sampler, rng = self.sampler("test_compositional", set()), self.rng("compositional")
        alt = self.rng("test_compositional:alt")
        pairs = Deck(sorted(plan.heldout), rng)

        def draw() -> dict:
            names = list(pairs.draw())
            if c.max_objects >= 3 and rng.random() < 0.5:
                third = [
                    n
                    for n in self.vocab.names
                    if n not in names and all(tuple(sorted((n, m))) in plan.heldout for m in names)
                ]
                if third:
                    names.append(rng.choice(third))
            rng.shuffle(names)
            return sampler.scene(names=names)

        for i in range(c.n_test_compositional):
            s = self.unseen("test_compositional", draw)
            self.add(
                "test_compositional",
                i,
                s,
                alt,
                captions=[describe(s)],
                heldout_pairs=sorted(map(list, scene_pairs(s))),
                reworded=reworded_captions(s, self.reword_rng("test_compositional", i)),
            )

    def zeroshot(self) -> None:
        sampler, alt = self.sampler("test_zeroshot", set()), self.rng("test_zeroshot:alt")
        index = 0
        for name in self.vocab.names:
            for _ in range(self.cfg.n_test_zeroshot_per_object):
                scene = sampler.scene(plain=True, names=[name])
                while render_signature(scene) in self.train_signatures:  # a new rendering, never a copy
                    scene = sampler.scene(plain=True, names=[name])
                self.add("test_zeroshot", index, scene, alt, label=name)
                index += 1


def plan_emoji_scenes(cfg: EmojiScenesConfig) -> Plan:
    """Every row of the dataset as text (scene graph, alt-text, meta) plus the teacher seeds."""
    return _Planner(cfg).build()
