""""Stealth pnginfo": generation metadata hidden in the alpha channel's least significant bits.

NovelAI writes it into every image it makes, and the stealth-pnginfo extension of AUTOMATIC1111/Forge writes it on
request, so that the prompt survives sites and tools that strip PNG text chunks. The layout (the extension's):
the bits run column by column (x outer, y inner); the first 120 spell ``stealth_pnginfo`` (plain) or
``stealth_pngcomp`` (gzip), the next 32 give the payload's length in bits, then the payload, UTF-8 text:
A1111 ``parameters`` text, or NovelAI's text chunks as one JSON object.

Only the alpha variant is read: the rarer ``stealth_rgb*`` variant hides bits in every RGB image, so looking for it
would decode the pixels of every plain PNG. Looking decodes the whole image (PNG has no partial decoding), so images
over ``MAX_PIXELS`` (4096², 64 MB as RGBA; generators write far smaller files) are not searched: ``revsd predict``
decodes huge images no larger than the model needs and this must not undo it.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
from PIL import Image

SIGNATURES = {b"stealth_pnginfo": False, b"stealth_pngcomp": True}  # signature -> gzip-compressed
LIMIT = 1 << 22  # bytes of text at most (a gzip bomb stops here)
MAX_PIXELS = 1 << 24


def _bits(alpha: np.ndarray) -> np.ndarray:
    return alpha.T.reshape(-1) & 1  # column-major: x outer, y inner


def read(im: Image.Image) -> str | None:
    """The hidden text of an image with an alpha channel, or ``None`` when it carries none.

    Raises ``ValueError`` when the signature is there but the payload is cut short or does not decompress."""
    if "A" not in im.getbands() or not 152 <= im.width * im.height <= MAX_PIXELS:
        return None
    alpha = np.asarray(im.getchannel("A"))
    head = np.packbits(_bits(alpha[:, : max(1, -(-152 // im.height))])[:152]).tobytes()
    if head[:15] not in SIGNATURES:
        return None
    size = int.from_bytes(head[15:19], "big")
    bits = _bits(alpha)
    if size == 0 or size % 8 or 152 + size > bits.size:
        raise ValueError(f"stealth metadata of {size} bits does not fit the image")
    data = np.packbits(bits[152:152 + size]).tobytes()
    if SIGNATURES[head[:15]]:
        try:
            data = zlib.decompressobj(wbits=31).decompress(data, LIMIT)
        except zlib.error as e:
            raise ValueError(f"stealth metadata does not decompress ({e})") from None
    return data.decode("utf-8", "replace")


def as_chunks(text: str) -> dict[str, str]:
    """The hidden text as the text chunks it stands for: NovelAI hides its chunks (``Description``, ``Comment``,
    ``Software``, ...) as one JSON object; A1111's extension hides the ``parameters`` text."""
    try:
        obj = json.loads(text) if text.lstrip().startswith("{") else None
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and {"Description", "Comment"} & obj.keys():
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
    return {"parameters": text}


def write(im: Image.Image, text: str, compressed: bool = True) -> Image.Image:
    """``im`` as RGBA with ``text`` hidden the way the extension writes it (for tests and round trips)."""
    payload = text.encode("utf-8")
    payload = zlib.compress(payload, wbits=31) if compressed else payload
    sig = next(s for s, c in SIGNATURES.items() if c == compressed)
    bits = np.unpackbits(np.frombuffer(sig + (8 * len(payload)).to_bytes(4, "big") + payload, np.uint8))
    out = np.array(im.convert("RGBA"))
    alpha = out[:, :, 3].T.copy()  # column-major view of the alpha channel
    if bits.size > alpha.size:
        raise ValueError(f"{len(payload)} bytes do not fit a {im.width}x{im.height} image")
    flat = alpha.reshape(-1)
    flat[: bits.size] = (flat[: bits.size] & 0xFE) | bits
    out[:, :, 3] = flat.reshape(alpha.shape).T
    return Image.fromarray(out, "RGBA")
