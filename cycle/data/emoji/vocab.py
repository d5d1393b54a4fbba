"""The vocabulary: concrete objects named and grouped by Unicode, described by CLDR keywords.

Candidates are the fully-qualified emoji of `SUBGROUPS` (animals, plants, food, drink, vehicles, sports
items, clothing, instruments, tools, household things) in the vendored `emoji-test.txt`, minus faces and
names the scene grammar could not say unambiguously (see `_usable`; names already plural, like
"grapes", are left out too: "a grapes" reads badly and hides the count). `load_vocab(n)` picks `n` of them by
a fixed rule that does not depend on the dataset seed, so every run with the same `vocab_size` shares one
vocabulary: subgroups take turns, two objects each on their first turn (so every object has a sibling),
one on later turns, groups interleaved (mammals, fruit, ground transport, sport, clothing, birds, ...), each
subgroup in Unicode's own order.
"""

from __future__ import annotations

import re
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path
from typing import Iterable

from cycle.config import ConfigError

from .language import COLORS, COUNT_WORDS, POSITIONS, plural

VENDOR = Path(__file__).resolve().parents[1] / "vendor"
EMOJI_TEST = VENDOR / "emoji-test.txt"
CLDR_ANNOTATIONS = VENDOR / "cldr-annotations-en.xml"

SUBGROUPS = (
    "animal-mammal",
    "animal-bird",
    "animal-amphibian",
    "animal-reptile",
    "animal-marine",
    "animal-bug",
    "plant-flower",
    "plant-other",
    "food-fruit",
    "food-vegetable",
    "food-prepared",
    "food-asian",
    "food-marine",
    "food-sweet",
    "drink",
    "dishware",
    "transport-ground",
    "transport-water",
    "transport-air",
    "sport",
    "clothing",
    "musical-instrument",
    "tool",
    "household",
    "writing",
)
# A plain category word per subgroup: the tag of an object that has no usable CLDR keyword.
CATEGORIES = {
    "animal": "animal",
    "plant": "plant",
    "food": "food",
    "drink": "drink",
    "dishware": "tableware",
    "transport": "vehicle",
    "sport": "sports equipment",
    "clothing": "clothing",
    "musical": "instrument",
    "tool": "tool",
    "household": "household item",
    "writing": "stationery",
}
# Names that are scenes, signs or actions rather than one depictable object.
NOT_OBJECTS = {
    "cooking",
    "construction",
    "motorway",
    "railway track",
    "station",
    "bus stop",
    "airplane departure",
    "airplane arrival",
    "clinking beer mugs",
    "clinking glasses",
    "pouring liquid",
    "steaming bowl",
    "pig nose",
    "suspension railway",
    "mountain cableway",
    "aerial tramway",
    "police car light",
    "horizontal traffic light",
    "vertical traffic light",
    "stop sign",
    "flag in hole",
    "goal net",
}
_WORD_LIMIT = 3
# Keywords that would clash with the scene grammar (colours, counts, positions) or describe a face.
_NOT_KEYWORDS = {*COLORS, *COUNT_WORDS, *POSITIONS, "face", "image", "background", "shows"}


@dataclass(frozen=True)
class EmojiObject:
    name: str  # lower-case ASCII, as written in descriptions: "red apple"
    emoji: str  # the fully-qualified sequence the font renders
    group: str
    subgroup: str
    keywords: tuple[str, ...]  # CLDR keywords usable as tags (none of them names another candidate)

    @property
    def plural(self) -> str:
        return plural(self.name)

    @property
    def category(self) -> str:
        return CATEGORIES[re.split(r"[-\s]", self.subgroup)[0]]


@dataclass
class Vocab:
    objects: list[EmojiObject]
    by_name: dict[str, EmojiObject] = field(init=False)

    def __post_init__(self):
        self.by_name = {o.name: o for o in self.objects}

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def siblings(self, name: str) -> list[str]:
        """Same subgroup, else same group, else everything else: never empty for a vocabulary of >= 2."""
        me = self.by_name[name]
        for same in (lambda o: o.subgroup == me.subgroup, lambda o: o.group == me.group, lambda o: True):
            found = [o.name for o in self.objects if o.name != name and same(o)]
            if found:
                return found
        return []


def _ascii_name(name: str) -> str:
    name = name.replace("\u2019", "'")
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return name.lower().strip()


def _usable(name: str) -> bool:
    words = name.split()
    return (
        "face" not in words  # animal faces duplicate the animal; faces are left out
        and " and " not in name  # "and" joins objects in descriptions
        and "oncoming" not in name
        and name not in NOT_OBJECTS
        and len(words) <= _WORD_LIMIT
        and re.fullmatch(r"[a-z][a-z' -]*", name) is not None
    )


def parse_emoji_test(path: Path = EMOJI_TEST) -> list[tuple[str, str, str, str]]:
    """(emoji, name, group, subgroup) of every fully-qualified entry, in file order."""
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line:
            codepoints, comment = line.split(";", 1)[0].split(), line.split("#", 1)[1].strip()
            name = comment.split(" ", 2)[2]  # "<emoji> E<version> <name>"
            out.append(("".join(chr(int(c, 16)) for c in codepoints), name, group, subgroup))
    return out


def parse_cldr_keywords(path: Path = CLDR_ANNOTATIONS) -> dict[str, list[str]]:
    """Emoji (FE0F removed, as CLDR keys them) -> its keyword list."""
    root = ET.parse(path).getroot()
    return {
        el.get("cp"): [k.strip() for k in (el.text or "").split("|") if k.strip()]
        for el in root.iter("annotation")
        if el.get("type") is None
    }


@lru_cache(maxsize=1)
def candidates() -> tuple[EmojiObject, ...]:
    """Every usable object, in Unicode order, with its tag-safe keywords."""
    keywords = parse_cldr_keywords()
    rows, seen = [], set()
    for emoji, name, group, subgroup in parse_emoji_test():
        name = _ascii_name(name)
        if subgroup not in SUBGROUPS or not _usable(name):
            continue
        if name.endswith("s") and plural(name) == name:  # "grapes", "jeans": "a grapes" and counts misread
            continue
        forms = {name, plural(name)}
        if forms & seen:  # a surface form two objects share could not be read back from text
            continue
        seen |= forms
        rows.append((emoji, name, group, subgroup))
    names = {r[1] for r in rows}
    name_pattern = re.compile(
        r"\b("
        + "|".join(sorted((re.escape(n) for n in names | {plural(n) for n in names}), key=len, reverse=True))
        + r")\b"
    )
    out = []
    for emoji, name, group, subgroup in rows:
        words = keywords.get(emoji.replace("\ufe0f", ""), [])
        # A keyword that contains any object's name ("dog" for the poodle) would read as that object.
        usable = tuple(
            dict.fromkeys(
                k
                for k in (_ascii_name(w) for w in words)
                if k
                and k != name
                and k not in _NOT_KEYWORDS
                and re.fullmatch(r"[a-z][a-z' -]*", k)
                and not name_pattern.search(k)
            )
        )
        out.append(EmojiObject(name, emoji, group, subgroup, usable))
    return tuple(out)


def load_vocab(vocab_size: int) -> Vocab:
    """The first `vocab_size` objects of the fixed round-robin order over subgroups (see module doc)."""
    pool = candidates()
    if vocab_size < 2 or vocab_size > len(pool):
        raise ConfigError(
            f"config key 'data.emoji.vocab_size': got {vocab_size}, expected 2..{len(pool)} "
            f"(the usable concrete objects of {len(SUBGROUPS)} emoji subgroups)"
        )
    by_subgroup: dict[str, list[EmojiObject]] = {s: [] for s in SUBGROUPS}
    for obj in pool:
        by_subgroup[obj.subgroup].append(obj)
    # Turn order interleaves the groups, so even a small vocabulary spans animals, food, vehicles, ...
    by_group: dict[str, list[list[EmojiObject]]] = {}
    for queue in by_subgroup.values():
        if queue:
            by_group.setdefault(queue[0].group, []).append(queue)
    queues = [q for turn in zip_longest(*by_group.values()) for q in turn if q is not None]
    taken: list[EmojiObject] = []
    first_turn = True
    while len(taken) < vocab_size:
        progressed = False
        for queue in queues:
            want = 2 if first_turn else 1
            if first_turn and len(queue) < 2:
                want = len(queue)  # a lone member: siblings() falls back to its group
            want = min(want, len(queue), vocab_size - len(taken))
            if first_turn and want == 1 and len(queue) >= 2:
                continue  # would leave a subgroup with one member while others still have room
            taken += queue[:want]
            del queue[:want]
            progressed |= want > 0
        if not progressed and not first_turn:
            break
        first_turn = False
    order = {o.name: i for i, o in enumerate(pool)}
    return Vocab(sorted(taken, key=lambda o: order[o.name]))


def vocab_names(vocab: Vocab | Iterable[str]) -> list[str]:
    return vocab.names if isinstance(vocab, Vocab) else list(vocab)
