"""Regenerate the vendored Unicode excerpts in this folder from full copies of the upstream files.

    python -m cycle.data.vendor.trim /usr/share/unicode/emoji/emoji-test.txt \
        /usr/share/unicode/cldr/common/annotations/en.xml

Only the groups where concrete objects live are kept (`GROUPS`), only fully-qualified emoji, and only the
CLDR annotations of those emoji: about a fifth of the full files. Each excerpt starts with a notice that
says it was modified, as the Unicode license asks (see LICENSE-UNICODE.txt). CLDR's
`annotationsDerived/en.xml` is not vendored: it covers skin-tone and gender variants, keycaps and flags,
none of which is in the kept groups (checked for CLDR 42 / Emoji 15.0: zero entries).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUPS = ("Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects")
NOTICE = (
    "Excerpt made by hqclip-cycle (cycle/data/vendor/trim.py): only the groups {groups}, only "
    "fully-qualified emoji (and, for CLDR, only their annotations). Otherwise unchanged."
)


def trim_emoji_test(src: Path) -> tuple[str, set[str]]:
    """Keep the header, the kept groups' group/subgroup lines and their fully-qualified entries."""
    out, kept, group, header = [], set(), None, True
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            header = False
            group = line.split(":", 1)[1].strip()
        if header:
            out.append(line)
            continue
        if group not in GROUPS:
            continue
        if line.startswith("# group:") or line.startswith("# subgroup:"):
            out.append(line)
        elif "; fully-qualified" in line:
            out.append(line)
            codepoints = line.split(";", 1)[0].split()
            kept.add("".join(chr(int(c, 16)) for c in codepoints if c != "FE0F"))
    notice = "# " + NOTICE.format(groups=", ".join(GROUPS))
    return "\n".join([out[0], notice, *out[1:]]) + "\n", kept


def trim_annotations(src: Path, kept: set[str]) -> str:
    """Keep the XML header comment and the <annotation> elements of kept emoji (FE0F removed, as CLDR does)."""
    text = src.read_text(encoding="utf-8")
    head = text[: text.index("<ldml>")]
    head = head.replace("-->", "\n" + NOTICE.format(groups=", ".join(GROUPS)) + "\n-->", 1)
    root = ET.fromstring(text.encode("utf-8"))
    lines = [head.rstrip("\n"), "<ldml>", "\t<annotations>"]
    for el in root.iter("annotation"):
        if el.get("cp") in kept:
            kind = f' type="{el.get("type")}"' if el.get("type") else ""
            body = (el.text or "").replace("&", "&amp;").replace("<", "&lt;")
            lines.append(f'\t\t<annotation cp="{el.get("cp")}"{kind}>{body}</annotation>')
    lines += ["\t</annotations>", "</ldml>"]
    return "\n".join(lines) + "\n"


def main(emoji_test: str, annotations: str) -> None:
    text, kept = trim_emoji_test(Path(emoji_test))
    (HERE / "emoji-test.txt").write_text(text, encoding="utf-8")
    (HERE / "cldr-annotations-en.xml").write_text(trim_annotations(Path(annotations), kept), encoding="utf-8")
    print(f"kept {len(kept)} emoji")


if __name__ == "__main__":
    main(*sys.argv[1:3])
