"""Robust image reading shared by feature extraction, training and ``revsd predict``.

Every failure becomes an :class:`ImageError` whose message names the file and what is wrong, so callers can
report the image and go on with the batch (never drop it silently). ``open_rgb(path, min_side=...)`` decodes no
larger than a model needs (JPEG: DCT-domain draft; other formats: an integer box reduce right after decoding), so
memory per image stays bounded whatever the file's size. Pixels come out as a viewer shows them: upright as the EXIF
Orientation says, and in sRGB when the file embeds another colour profile (Adobe RGB, Display P3, grey; CMYK
profiles take the same path, untested: none ships offline). :func:`scan_images` expands folders (following
symlinked sub-folders with loop protection) and names everything it skips.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.init()
IMAGE_EXTENSIONS |= {".avif"} & set(Image.registered_extensions())  # Pillow ≥ 11.3 reads AVIF
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard: ~67 MP; SD images are ≤ 1 MP
DECODE_MARGIN = 3  # min_side keeps the shorter side ≥ 3 × min_side: the margin the final resize's reducing_gap keeps
DECODE_BUDGET = 512 * 2**20  # bytes of full-size pixels that threads may decode at once (one bigger image at a time)
_budget = threading.Condition()
_in_use = [0]


@contextmanager
def decode_budget(nbytes: int):
    """Wait until ``nbytes`` of full-size pixels fit in :data:`DECODE_BUDGET` next to other threads' decodes,
    so that memory stays bounded whatever the number of decoding threads."""
    nbytes = min(nbytes, DECODE_BUDGET)
    with _budget:
        _budget.wait_for(lambda: _in_use[0] + nbytes <= DECODE_BUDGET)
        _in_use[0] += nbytes
    try:
        yield
    finally:
        with _budget:
            _in_use[0] -= nbytes
            _budget.notify_all()


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


DECODE_VERSION = 2  # bumped when open_rgb gives other pixels for the same file (2: EXIF Orientation, ICC profiles)


def image_key(image_id: str, path: str | Path) -> str:
    """``image_id|size|mtime_ns|d<DECODE_VERSION>`` of the file (``image_id|missing`` when it cannot be stat'ed):
    the key of every per-image cache (features, pixels, captions, latents), so an edited file, or a file that
    :func:`open_rgb` now decodes differently, is computed again (entries under older keys are never read)."""
    try:
        st = os.stat(path)
        return f"{image_id}|{st.st_size}|{st.st_mtime_ns}|d{DECODE_VERSION}"
    except OSError:
        return f"{image_id}|missing"


def return_big_buffers_to_os() -> None:
    """glibc only: serve allocations of 1 MiB and more with mmap, so a decoded image's pixels go back to the OS
    as soon as they are freed instead of staying in a thread's malloc arena (bounds a long batch's peak RSS).
    A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, no longer adaptive)
    except (OSError, AttributeError):
        pass


def shrink_factor(size: tuple[int, int], min_side: int | None) -> int:
    """Largest integer reduction that keeps the shorter side ≥ ``DECODE_MARGIN × min_side`` (1: keep as is)."""
    return max(1, min(size) // (DECODE_MARGIN * min_side)) if min_side else 1


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str):
    """LittleCMS transform from the embedded profile ``icc`` to sRGB for an image of ``mode`` (RGB, CMYK, L → RGB;
    RGBA → RGBA); ``None`` when the profile is sRGB already (nothing to do) or cannot be used with ``mode``."""
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(src).strip().lower().startswith("srgb"):
            return None
        nocache = getattr(getattr(ImageCms, "Flags", None), "NOCACHE", 0x0040)  # shared by decoding threads
        return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGBA" if mode == "RGBA" else "RGB",
                                       flags=nocache)
    except Exception:  # no LittleCMS, a malformed profile or one for another colour space: pixels as stored
        return None


def to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """``img`` (RGB, CMYK, L or RGBA) converted from its embedded colour profile ``icc`` to sRGB, as viewers show it
    and as generated images are stored (unchanged without a profile, with an sRGB one or an unusable one)."""
    if not icc or img.mode not in ("RGB", "CMYK", "L", "RGBA"):
        return img
    t = _icc_transform(bytes(icc), img.mode)
    if t is None:
        return img
    try:
        from PIL import ImageCms

        return ImageCms.applyTransform(img, t)
    except Exception:
        return img


def _shrink(img: Image.Image, factor: int, icc: bytes | None = None) -> Image.Image:
    """Box-reduce by ``factor`` (transparency premultiplied so that hidden colours do not bleed), convert the
    embedded colour profile ``icc`` to sRGB (after reducing: fewer pixels), then RGB."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        if factor >= 2:
            img = img.convert("RGBA").convert("RGBa").reduce(factor).convert("RGBA")
    elif img.mode in ("RGB", "L", "CMYK"):
        if factor >= 2:
            img = img.reduce(factor)
    else:
        img = to_rgb(img)
        img = img.reduce(factor) if factor >= 2 else img
    return to_rgb(to_srgb(img, icc))


# EXIF Orientation (tag 0x0112) → the transpose that shows the image upright, as viewers do (PIL's exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose a camera's or editor's EXIF Orientation asks for (``None``: upright, absent or unreadable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": handled below
            return _UPRIGHT.get(int(im.getexif().get(0x0112, 1)))
    except Exception:  # malformed EXIF: show the pixels as stored
        return None


def _missing(path: Path) -> str:
    """Why ``path`` cannot be opened although it was named: symlink loop, dangling symlink or not found."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{path}: symlink loop (the link points back at itself)"
        return f"{path}: dangling symlink (its target {os.readlink(path)} does not exist)"
    return f"{path}: file not found"


def open_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open, decode and convert an image to RGB, upright as its EXIF Orientation says and in sRGB when it embeds
    another colour profile, or raise :class:`ImageError`.

    ``min_side`` (e.g. the model's input size): decode at most what is needed, keeping the shorter side
    ≥ ``DECODE_MARGIN × min_side`` (never below the image's own size); ``None`` decodes at full size.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(_missing(path))
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
                if min_side and im.format == "JPEG":  # DCT scaling by 1/2, 1/4 or 1/8 while decoding
                    s = DECODE_MARGIN * min_side / min(w, h)
                    if s < 0.5:
                        im.draft(im.mode, (math.ceil(w * s), math.ceil(h * s)))
                with decode_budget(im.size[0] * im.size[1] * max(len(im.getbands()), 3) * 2):
                    im.load()
                    turn = _orientation(im)  # after load: a PNG's getexif() would decode outside the budget
                    out = _shrink(im, shrink_factor(im.size, min_side), im.info.get("icc_profile"))
                    return out.transpose(turn) if turn is not None else out
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


def _walk(folder: Path, recursive: bool, files: list[Path], skipped: list[tuple[Path, str]]) -> None:
    """Files of ``folder`` by extension; sub-folders (symlinked ones too) once each when ``recursive``."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                skipped.append((d, "folder already listed (symlink loop or second link to it)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(d.iterdir())
        except OSError as e:
            skipped.append((d, f"folder not readable ({e.strerror or e})"))
            continue
        for q in entries:
            if q.is_dir():
                if recursive:
                    stack.append(q)
                else:
                    skipped.append((q, "sub-folder (--recursive descends into it)"))
            elif q.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(q)  # dangling links and loops too: open_rgb then says which
            elif q.is_symlink() and not q.exists():
                skipped.append((q, _missing(q).split(": ", 1)[1]))
            else:
                skipped.append((q, "not an image file extension"))


def scan_images(paths, recursive: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into ``(images, skipped)``: images sorted per folder (named files kept as
    given), ``skipped`` = ``(path, why)`` for every folder entry left out."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found: list[Path] = []
            _walk(p, recursive, found, skipped)
            files.extend(sorted(found))
        else:
            files.append(p)
    return files, skipped


def list_images(paths, recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted list of candidate image files (folders: by extension)."""
    return scan_images(paths, recursive)[0]
