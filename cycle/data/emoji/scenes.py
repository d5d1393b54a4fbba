"""Scene graphs: which objects, how many, where, how big, on what background; pixel boxes included.

A scene graph is plain JSON (it is stored in `samples.meta["scene"]`):

    {"background": "blue", "rgb": [58, 112, 207], "plain": false, "layout": "row",
     "objects": [{"name": "dog", "emoji": "🐕", "subgroup": "animal-mammal", "count": 2,
                  "position": "left", "size": "small", "boxes": [[x, y, side], ...]}, ...]}

Layouts. `row`: 2 or 3 objects side by side (left/right, or left/center/right), `column`: the same
stacked (top/bottom, top/center/bottom), `single`: one object in the left/right/top/bottom half or in the
center. Copies of an object share its region, lined up along the region's long side. `plain` scenes are
the bare emoji: one object, count 1, large, centered on the whole canvas. `boxes` hold the exact square
(top-left x, y, side in pixels) of every copy, so rendering is a pure function of the graph.
Object order in the graph is random: descriptions follow it, so word order says nothing about place.
"""

from __future__ import annotations

import random
from itertools import combinations
from typing import Callable, Iterable, Optional

from cycle.config import ConfigError

from .language import COLORS, POSITIONS
from .vocab import Vocab

MAX_OBJECTS = 3  # the row/column layouts have three slots
MAX_COUNT = 9  # the count words the grammar has
_SLOTS = {2: ("left", "right"), 3: ("left", "center", "right")}
_VERTICAL = {"left": "top", "right": "bottom", "center": "center"}
_COLOR_JITTER = 12  # per channel, so two renderings of one graph key are still different images


def pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def scene_pairs(scene: dict) -> set[tuple[str, str]]:
    return {pair(a["name"], b["name"]) for a, b in combinations(scene["objects"], 2)}


def scene_key(scene: dict) -> tuple:
    """What a scene says (background, objects, counts, positions), ignoring sizes and exact boxes."""
    return (scene["background"], tuple(sorted((o["name"], o["count"], o["position"]) for o in scene["objects"])))


def render_signature(scene: dict) -> tuple:
    """Everything the pixels depend on: equal signatures make identical images."""
    return (tuple(scene["rgb"]), tuple((o["name"], tuple(map(tuple, o["boxes"]))) for o in scene["objects"]))


def region(layout: str, position: str, n: int, plain: bool) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in unit coordinates of an object's region."""
    if plain:
        return (0.0, 0.0, 1.0, 1.0)
    if layout == "single":
        return {
            "left": (0, 0, 0.5, 1),
            "right": (0.5, 0, 1, 1),
            "top": (0, 0, 1, 0.5),
            "bottom": (0, 0.5, 1, 1),
            "center": (0.15, 0.15, 0.85, 0.85),
        }[position]
    slots = _SLOTS[n] if layout == "row" else tuple(_VERTICAL[s] for s in _SLOTS[n])
    i = slots.index(position)
    a, b = i / n, (i + 1) / n
    return (a, 0.0, b, 1.0) if layout == "row" else (0.0, a, 1.0, b)


def place(obj: dict, box: tuple[float, float, float, float], size_px: int, rng: random.Random) -> list[list[int]]:
    """Boxes of `obj["count"]` copies lined up along the long side of `box`, scaled by `obj["size"]`."""
    x0, y0, x1, y1 = (v * size_px for v in box)
    w, h = x1 - x0, y1 - y0
    horizontal = w >= h
    count = obj["count"]
    cell_long = (w if horizontal else h) / count
    cell_short = h if horizontal else w
    lo, hi = (0.8, 0.95) if obj["size"] == "large" else (0.55, 0.7)
    boxes = []
    for k in range(count):
        side = max(2, int(min(cell_long, cell_short) * rng.uniform(lo, hi)))
        slack_long, slack_short = cell_long - side, cell_short - side
        # A little jitter, kept near the middle of the cell: a "left" object never looks "top left".
        along = k * cell_long + slack_long / 2 + rng.uniform(-0.2, 0.2) * slack_long
        across = slack_short / 2 + rng.uniform(-0.2, 0.2) * slack_short
        x, y = (x0 + along, y0 + across) if horizontal else (x0 + across, y0 + along)
        boxes.append([int(round(x)), int(round(y)), side])
    return boxes


class Deck:
    """Draws names evenly: a shuffled copy of the vocabulary, refilled when spent, so every object
    appears about equally often; `accept` lets a draw skip names that would break a constraint."""

    def __init__(self, items: Iterable, rng: random.Random):
        self.items, self.rng, self.cards = list(items), rng, []

    def draw(self, accept: Callable = lambda item: True):
        for refill in (False, True):
            if refill or not self.cards:
                fresh = self.items[:]
                self.rng.shuffle(fresh)
                self.cards += fresh
            for i, item in enumerate(self.cards):
                if accept(item):
                    return self.cards.pop(i)
        return None


class SceneSampler:
    """Draws scene graphs for one split. `forbidden` pairs never co-occur in its scenes."""

    def __init__(
        self,
        vocab: Vocab,
        image_size: int,
        max_objects: int,
        max_count: int,
        rng: random.Random,
        forbidden: Optional[set[tuple[str, str]]] = None,
    ):
        check_limits(max_objects, max_count)
        self.vocab, self.image_size, self.rng = vocab, image_size, rng
        self.max_objects, self.max_count = max_objects, max_count
        self.forbidden = forbidden or set()
        self.deck = Deck(vocab.names, rng)

    def _background(self) -> tuple[str, list[int]]:
        name = self.rng.choice(sorted(COLORS))
        rgb = [min(255, max(0, c + self.rng.randint(-_COLOR_JITTER, _COLOR_JITTER))) for c in COLORS[name]]
        return name, rgb

    def _names(self, n: int) -> list[str]:
        names: list[str] = []
        for _ in range(n):
            name = self.deck.draw(lambda c: c not in names and all(pair(c, o) not in self.forbidden for o in names))
            if name is None:
                break
            names.append(name)
        return names

    def scene(self, plain: bool = False, names: Optional[list[str]] = None) -> dict:
        """A random scene; `plain`: the bare emoji; `names`: these objects (in this order)."""
        if names is None:
            names = self._names(1 if plain else self.rng.randint(1, self.max_objects))
        n = len(names)
        if plain:
            layout, positions = "single", ["center"]
        elif n == 1:
            layout, positions = "single", [self.rng.choice(POSITIONS)]
        else:
            layout = self.rng.choice(("row", "column"))
            slots = list(_SLOTS[n]) if layout == "row" else [_VERTICAL[s] for s in _SLOTS[n]]
            self.rng.shuffle(slots)
            positions = slots
        background, rgb = self._background()
        objects = []
        for name, position in zip(names, positions):
            obj = self.vocab.by_name[name]
            entry = {
                "name": name,
                "emoji": obj.emoji,
                "subgroup": obj.subgroup,
                "count": 1 if plain else self.rng.randint(1, self.max_count),
                "position": position,
                "size": "large" if plain else self.rng.choice(("large", "small")),
            }
            entry["boxes"] = place(entry, region(layout, position, n, plain), self.image_size, self.rng)
            objects.append(entry)
        return {"background": background, "rgb": rgb, "plain": plain, "layout": layout, "objects": objects}


def check_limits(max_objects: int, max_count: int) -> None:
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ConfigError(
            f"config key 'data.emoji.max_objects': got {max_objects}, expected 1..{MAX_OBJECTS} "
            "(the scene layouts have three slots)"
        )
    if not 1 <= max_count <= MAX_COUNT:
        raise ConfigError(f"config key 'data.emoji.max_count': got {max_count}, expected 1..{MAX_COUNT}")


def heldout_pairs(names: list[str], share: float, rng: random.Random, at_least_one: bool) -> set[tuple[str, str]]:
    """A `share` of all object pairs, kept out of train/val for the compositional test."""
    pairs = sorted(pair(a, b) for a, b in combinations(sorted(names), 2))
    rng.shuffle(pairs)
    k = round(share * len(pairs))
    if at_least_one and share > 0:
        k = max(k, 1)
    return set(pairs[:k])
