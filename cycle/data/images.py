"""Checks and decoding for ingested images and alt-texts.

Accepted image formats: JPEG, PNG, WebP, BMP and GIF. Animated GIF / WebP / APNG are accepted and read
as their first frame. Anything else Pillow can identify (TIFF, ICO, PPM, ...) or that is recognisably
another image container (HEIC, AVIF, SVG) is `unsupported_format`; bytes nothing can identify are
`corrupt_image`.

Decompression bombs: `check_image` reads the dimensions from the header and rejects an image over
`max_pixels` before decoding a single pixel. The cap is per call; Pillow's process-wide
`Image.MAX_IMAGE_PIXELS` is never modified here. Its own hard cap (2 x MAX_IMAGE_PIXELS, ~179 MP by
default) still applies, and an image over it is `too_large` too.

`decode_image` returns RGB; transparency is composited on white (web images with alpha are mostly logos
and stickers drawn for a light page).
"""

from __future__ import annotations

import io
import re
import unicodedata
import warnings

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# Containers Pillow cannot open here but that are images all the same: say so rather than "corrupt".
_OTHER_IMAGE_SIGNATURES = (
    (4, b"ftypheic"),
    (4, b"ftypheix"),
    (4, b"ftypmif1"),
    (4, b"ftypavif"),
    (0, b"<svg"),
    (0, b"<?xml"),
)


class BadImage(ValueError):
    """An image that cannot be ingested; `reason` is the short class stored in `rejects`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadText(ValueError):
    """An alt-text that cannot be ingested; `reason` is the short class stored in `rejects`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _open_header(data: bytes) -> Image.Image:
    """Open without decoding pixels. Pillow's bomb warning is silenced: our own cap decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise BadImage("too_large", str(err)) from None
        except UnidentifiedImageError:
            head = data[:64].lstrip()
            if any(head[off : off + len(sig)] == sig for off, sig in _OTHER_IMAGE_SIGNATURES):
                raise BadImage("unsupported_format", "not one of " + ", ".join(ACCEPTED_FORMATS)) from None
            raise BadImage("corrupt_image", f"cannot identify an image in {len(data)} bytes") from None
        except Exception as err:  # malformed headers raise all sorts (SyntaxError, struct.error, ...)
            raise BadImage("corrupt_image", f"{type(err).__name__}: {err}") from None


def check_image(data: bytes, max_pixels: int, min_side: int) -> tuple[int, int, str]:
    """Validate encoded image bytes; return (width, height, format) or raise `BadImage`.

    Reasons: "empty_image", "unsupported_format", "too_large" (from the header, before decoding),
    "too_small" (shorter side under `min_side`), "corrupt_image" (anything that fails a full decode,
    truncated files included).
    """
    if not data:
        raise BadImage("empty_image", "zero bytes")
    im = _open_header(data)
    with im:
        fmt = (im.format or "").upper()
        if fmt not in ACCEPTED_FORMATS:
            raise BadImage("unsupported_format", f"{fmt or 'unknown'} is not one of {', '.join(ACCEPTED_FORMATS)}")
        width, height = im.size
        if width * height > max_pixels:
            raise BadImage("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
        if min(width, height) < min_side:
            raise BadImage("too_small", f"{width}x{height}: shorter side < min_side {min_side}")
        try:
            im.load()  # the full decode: truncated and damaged files fail here, not in a training worker
        except Exception as err:
            raise BadImage("corrupt_image", f"{type(err).__name__}: {err}") from None
    return width, height, fmt


def image_ext(data: bytes) -> str:
    """File extension for encoded image bytes ("png", "jpg", ...), from the bytes themselves."""
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def decode_image(data: bytes) -> Image.Image:
    """Decode to an RGB image (first frame; alpha composited on white). Raises `BadImage` if undecodable."""
    im = _open_header(data)
    try:
        im.seek(0)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")
    except Exception as err:
        raise BadImage("corrupt_image", f"{type(err).__name__}: {err}") from None


_WHITESPACE = re.compile(r"\s+")
_INVISIBLE = frozenset("\u00ad\u200b\u2060\ufeff\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_alt_text(raw: bytes | str) -> str:
    """Alt-text as stored: UTF-8, NFC, control and format characters removed, whitespace collapsed.

    Raises `BadText("non_utf8_text")` for bytes that are not UTF-8 (or a str with lone surrogates, which
    JSON can carry) and `BadText("empty_text")` when nothing but whitespace remains.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadText("non_utf8_text", f"byte {err.start}: {bytes(raw)[err.start : err.start + 4]!r}") from None
    elif isinstance(raw, str):
        text = raw
    elif raw is None:
        raise BadText("empty_text", "no text")
    else:
        raise BadText("empty_text", f"expected text, got {type(raw).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadText("non_utf8_text", f"unpaired surrogate at {err.start}") from None
    text = unicodedata.normalize("NFC", text)
    # Control characters (Cc) become spaces so "a\tb" stays two words; invisible formatting (zero-width
    # space, BOM, soft hyphen, bidi controls) vanishes. Other format characters stay: the zero-width
    # joiner and tag characters are parts of emoji sequences.
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text if c not in _INVISIBLE)
    text = _WHITESPACE.sub(" ", text).strip()
    if not text:
        raise BadText("empty_text", "nothing but whitespace")
    return text
