"""Robust image reading shared by feature extraction and ``revsd predict``.

Every failure becomes an :class:`ImageError` whose message names the file and what is wrong, so callers can
report the image and go on with the batch (never drop it silently).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard: ~67 MP; SD images are ≤ 1 MP


class ImageError(RuntimeError):
    """An image that cannot be used; the message names the file and the reason."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (RGBA/LA composited on white, palette, 16-bit and grayscale handled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255.0).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def open_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image to RGB, or raise :class:`ImageError`."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} pixels exceeds the {max_pixels:,}-pixel limit "
                                     "(decompression-bomb guard); resize it first")
                im.load()
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image (unknown format or not an image file)") from e
    except PermissionError as e:
        raise ImageError(f"{path}: permission denied") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e


def list_images(paths, recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted list of candidate image files (folders: by extension)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            # dangling symlinks are kept so that open_rgb reports them instead of skipping them silently
            out.extend(sorted(q for q in it if (q.is_file() or q.is_symlink()) and q.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out
