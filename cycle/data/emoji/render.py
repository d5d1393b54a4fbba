"""Pixels: Noto Color Emoji glyphs composed onto a background, exactly as a scene graph's boxes say.

The colour font is a bitmap font with one strike: Pillow draws it at size 109 only (136 x 128 px), with
the RAQM layout so that ZWJ sequences ("black cat") become one glyph. Each glyph is drawn once, cropped
to its visible pixels, padded square, and cached; scaled copies are cached per side length.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from cycle.errors import HQClipError

FONT_SIZE = 109  # the only size Noto Color Emoji's bitmap strike offers
INSTALL_HINT = (
    "install it (Debian/Ubuntu: apt-get install fonts-noto-color-emoji) or point "
    "data.emoji.font at a copy of NotoColorEmoji.ttf"
)


class EmojiFontError(HQClipError, RuntimeError):
    """The emoji font is missing, unreadable, or does not draw the glyphs the vocabulary needs."""


def load_font(path: str) -> ImageFont.FreeTypeFont:
    if not Path(path).is_file():
        raise EmojiFontError(f"emoji font not found at '{path}': {INSTALL_HINT}")
    if not features.check("raqm"):
        raise EmojiFontError(
            "Pillow was built without libraqm, which emoji sequences need: install "
            "libraqm (apt-get install libraqm0) and reinstall Pillow"
        )
    try:
        return ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    except OSError as err:
        raise EmojiFontError(
            f"cannot use '{path}' as the emoji font at size {FONT_SIZE} ({err}): {INSTALL_HINT}"
        ) from None


class GlyphCache:
    """Glyphs of one font: drawn once each, then scaled copies cached by side length."""

    def __init__(self, font_path: str):
        self.font_path = font_path
        self.font = load_font(font_path)
        self._base: dict[str, Image.Image] = {}
        self._scaled: dict[tuple[str, int], Image.Image] = {}

    def base(self, emoji: str) -> Image.Image:
        """The glyph cropped to its visible pixels, centered on a transparent square (premultiplied)."""
        if emoji not in self._base:
            left, top, right, bottom = self.font.getbbox(emoji)
            canvas = Image.new("RGBA", (right + 2, bottom + 2), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), emoji, font=self.font, embedded_color=True)
            box = canvas.getchannel("A").getbbox()
            if box is None:
                raise EmojiFontError(
                    f"the font '{self.font_path}' draws nothing for {emoji!r} "
                    f"(U+{'-'.join(f'{ord(c):04X}' for c in emoji)}): {INSTALL_HINT}"
                )
            glyph = canvas.crop(box)
            side = max(glyph.size)
            square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
            self._base[emoji] = square.convert("RGBa")  # premultiplied: no dark fringes when scaled
        return self._base[emoji]

    def scaled(self, emoji: str, side: int) -> Image.Image:
        key = (emoji, side)
        if key not in self._scaled:
            self._scaled[key] = self.base(emoji).resize((side, side), Image.Resampling.LANCZOS).convert("RGBA")
        return self._scaled[key]


def render_scene(scene: dict, glyphs: GlyphCache, image_size: int) -> Image.Image:
    """The RGB image of a scene graph (a pure function of the graph and the font)."""
    canvas = Image.new("RGBA", (image_size, image_size), (*scene["rgb"], 255))
    for obj in scene["objects"]:
        for x, y, side in obj["boxes"]:
            layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
            layer.paste(glyphs.scaled(obj["emoji"], side), (x, y))
            canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """PNG without metadata, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
