"""What every annotation backend offers, and the small pieces they share.

A backend turns a batch of (image, prompt) pairs into one output text each:

    backend.generate(batch, seed=None, temperature=None, keys=None) -> list[str]

`seed` and `temperature` are set for retries (sampling with another seed); `keys` are the sample ids,
used by backends that keep a request log. An item that cannot be generated at all (an unreadable image,
a request the server refuses) comes back as a `FailedGeneration`: a str (empty) that carries the reason,
so the row is kept as failed rather than the whole pass stopping. `backend.fingerprint` names the
annotator (model and weights) and is stored with every row. `make_backend` (in the package) picks one.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from PIL import Image

from ...errors import HQClipError

ImageLike = Union[bytes, "Image.Image"]
BatchItem = tuple[ImageLike, str]


class BackendError(HQClipError):
    """The backend cannot work at all (server down after all retries, bad credentials, missing model)."""


class FailedGeneration(str):
    """An output that could not be produced for one item; `reason` says why, `retryable` whether to retry."""

    reason: str
    retryable: bool

    def __new__(cls, reason: str, retryable: bool = False):
        obj = super().__new__(cls, "")
        obj.reason, obj.retryable = reason, retryable
        return obj


class Backend(Protocol):
    fingerprint: str

    def generate(
        self,
        batch: Sequence[BatchItem],
        seed: Optional[int] = None,
        temperature: Optional[float] = None,
        keys: Optional[Sequence[str]] = None,
    ) -> list[str]: ...

    def close(self) -> None: ...


def to_pil(image: ImageLike) -> Image.Image:
    """RGB PIL image from encoded bytes or a PIL image; raises ValueError naming the problem."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as err:  # PIL raises many kinds for corrupt data
        raise ValueError(f"unreadable image: {type(err).__name__}: {err}") from None


def to_png_bytes(image: ImageLike) -> tuple[bytes, str]:
    """Encoded bytes and their MIME type; encoded bytes pass through when their format is known."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif")):
            if data.startswith(magic):
                return data, mime
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return data, "image/webp"
        image = to_pil(data)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png"


WHOLE_FILE_CHUNKS = 64  # files up to 64 chunks (64 MiB) are hashed whole; bigger ones by head and tail


def dir_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content fingerprint of a model directory. Small files are hashed whole; big weight files by size,
    head and tail (hashing tens of GB per annotation pass would cost minutes)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE_CHUNKS * chunk:
                h.update(fh.read())
            else:
                h.update(fh.read(chunk))
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]
