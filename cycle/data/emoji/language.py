"""The scene grammar: how a scene graph is said, in the lower-case style of the released annotations.

    the image shows two dogs on the left and a red apple on the right, on a blue background.

One sentence: each object as `<count> <name>` (a/an for one, plural names otherwise) followed by its
position phrase, objects listed ("x and y", "x, y and z") in the graph's order (random, so word order never gives away
where things are), then the background colour. `cycle.data.emoji.facts` reads the same phrases back.
"""

from __future__ import annotations

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COLORS = {  # named background colours, RGB
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "black": (25, 25, 25),
    "red": (215, 50, 45),
    "orange": (240, 145, 40),
    "yellow": (245, 220, 70),
    "green": (70, 170, 80),
    "blue": (60, 110, 210),
    "purple": (140, 80, 180),
    "pink": (240, 160, 200),
}

_IRREGULAR = {
    "mouse": "mice",
    "goose": "geese",
    "ox": "oxen",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "scarf": "scarves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "mango": "mangoes",
    "fish": "fish",
    "deer": "deer",
    "shrimp": "shrimp",
    "squid": "squid",
    "bison": "bison",
    "moose": "moose",
    "sheep": "sheep",
    "sushi": "sushi",
    "sake": "sake",
    "tamale": "tamales",
    "oden": "oden",
    "dango": "dango",
    "mate": "mate",
    "kimono": "kimonos",
    "skis": "skis",
    "tennis": "tennis",
    "jellyfish": "jellyfish",
    "blowfish": "blowfish",
}
_PREPOSITIONS = (" of ", " without ", " with ", " on ", " in ")


def _plural_word(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word  # already plural: "jeans", "grapes", "skis"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural(name: str) -> str:
    """Plural of an object name: the head noun changes ("ears of corn", "red apples", "hot dogs")."""
    for prep in _PREPOSITIONS:
        if prep in name:
            head, rest = name.split(prep, 1)
            return plural(head) + prep + rest
    words = name.split(" ")
    words[-1] = "-".join(words[-1].split("-")[:-1] + [_plural_word(words[-1].split("-")[-1])])
    return " ".join(words)


def article(name: str) -> str:
    return "an" if name[0] in "aeio" or (name[0] == "u" and not name.startswith(("uni", "use"))) else "a"


def count_phrase(name: str, count: int) -> str:
    """ "a dog", "an apple", "two dogs" """
    if count == 1:
        return f"{article(name)} {name}"
    return f"{COUNT_WORDS[count]} {plural(name)}"


def object_phrase(obj: dict) -> str:
    return f"{count_phrase(obj['name'], obj['count'])} {POSITION_PHRASES[obj['position']]}"


def describe(scene: dict) -> str:
    """The clean description of a scene graph (see the module doc for the grammar)."""
    phrases = [object_phrase(o) for o in scene["objects"]]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"the image shows {objects}, on {article(scene['background'])} {scene['background']} background."
