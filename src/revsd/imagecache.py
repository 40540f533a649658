"""One-time image cache: pixels decoded and resized once to a backbone's input size, read by index afterwards.

Fine-tuning at DiffusionDB scale otherwise decodes every 512-768 px PNG again at every epoch. The cache stores
the already preprocessed uint8 (H, W, 3) arrays in memory-mapped ``.npy`` shards, so an epoch only copies
bytes from the page cache / disk (random access, any shuffle order), in as many DataLoader workers as cores.

Layout of a cache folder (e.g. ``working/imagecache/<backbone>-<size>/``)::

    meta.json                    {"preprocess": <the caller's preprocess_id>, "shape": [H, W, 3]}
    shard-<hash>.npy             uint8 (n, H, W, 3), opened with mmap_mode="r"
    shard-<hash>.index.npz       keys (n,), valid (n,), errors (n,)  -- written last: a shard exists once it is

Keys are ``image_id|file size|mtime_ns|decode version`` (:func:`revsd.images.image_key`), so an edited file is
decoded again; an image that cannot be read is stored as zeros with ``valid=False`` and its error message (reported,
never dropped). Each :func:`build` call decodes only the images whose key is missing and adds one shard per
``shard_size`` images, each written atomically (temp file + rename).

API (integration into the training loop is left to 03_train)::

    from functools import partial
    from revsd import imagecache, transforms
    pp = backbone.preprocess                                       # a revsd.transforms.Preprocess
    cache = imagecache.build(directory, ids, paths, partial(transforms.pil_to_array, pp=pp),
                             preprocess_id=json.dumps(pp.to_dict()), shape=(pp.input_size, pp.input_size, 3))
    rows = cache.rows(ids, paths)                                  # cache row of each image (KeyError if absent)
    array, valid, error = cache[rows[0]]                           # uint8 (H, W, 3)
    loader = imagecache.create_loader(cache, rows, batch_size=64, shuffle=True, seed=0)
    for pixels, valid, index in loader:                            # uint8 (B, H, W, 3), bool (B,), int (B,)
        x = transforms.to_batch(pixels.numpy(), pp.mean, pp.std, device)   # or normalise on the GPU

``preprocess`` is any ``PIL.Image (RGB) -> uint8 (H, W, 3)`` callable; images are opened with
:func:`revsd.images.open_rgb`, so a cached array is byte-identical to ``preprocess(open_rgb(path))``.
``preprocess_id`` names that preprocessing; a folder made with another one is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from revsd.artifacts import atomic_path, read_json, write_json
from revsd.images import ImageError, image_key, open_rgb

Preprocessor = Callable[..., np.ndarray]


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ImageCache:
    """The shards of one cache folder; row ``i`` counts across shards in name order."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta = self.directory / "meta.json"
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found: not an image cache; build it with revsd.imagecache.build")
        m = read_json(meta)
        self.preprocess_id, self.shape = m["preprocess"], tuple(m["shape"])
        self.shards = [p for p in sorted(self.directory.glob("shard-*.index.npz"))
                       if p.with_name(p.name.replace(".index.npz", ".npy")).exists()]
        keys, valid, errors, sizes = [], [], [], []
        for p in self.shards:
            with np.load(p, allow_pickle=False) as z:
                keys += z["keys"].tolist()
                valid.append(z["valid"])
                errors += z["errors"].tolist()
                sizes.append(len(z["keys"]))
        self.keys, self.errors = keys, errors
        self.valid = np.concatenate(valid) if valid else np.zeros(0, bool)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.index = {k: i for i, k in enumerate(keys)}  # a key in two shards: the later one wins
        self._arrays: dict[int, np.ndarray] = {}  # shard -> memmap, opened lazily (also in each worker)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, image_ids: Sequence[str], image_paths: Sequence[str | Path]) -> np.ndarray:
        """Cache row of each image (current file size and mtime); KeyError naming the first image not cached."""
        keys = [image_key(str(i), p) for i, p in zip(image_ids, image_paths)]
        missing = [(i, p) for k, i, p in zip(keys, image_ids, image_paths) if k not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} image(s) not in the image cache {self.directory} (new or edited since, "
                           f"e.g. {missing[0][1]}): run revsd.imagecache.build for them first")
        return np.array([self.index[k] for k in keys], dtype=np.int64)

    def _shard(self, s: int) -> np.ndarray:
        arr = self._arrays.get(s)
        if arr is None:
            arr = self._arrays[s] = np.load(self.shards[s].with_name(self.shards[s].name.replace(".index.npz", ".npy")),
                                            mmap_mode="r", allow_pickle=False)
        return arr

    def __getitem__(self, row: int) -> tuple[np.ndarray, bool, str]:
        """``(uint8 (H, W, 3) array, valid, error)`` of a cache row (zeros where invalid)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for the image cache {self.directory} ({len(self)} rows)")
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return np.array(self._shard(s)[row - self.starts[s]]), bool(self.valid[row]), self.errors[row]

    def __getstate__(self):  # DataLoader workers re-open the memmaps themselves
        return {**self.__dict__, "_arrays": {}}


def _decode(path, preprocess: Preprocessor, shape: tuple) -> tuple[np.ndarray | None, str]:
    try:
        arr = preprocess(open_rgb(path))
    except ImageError as e:
        return None, str(e)
    if arr.dtype != np.uint8 or arr.shape != shape:
        raise ValueError(f"preprocess returned {arr.dtype} {arr.shape} for {path}, expected uint8 {shape}: "
                         "pass the shape the preprocessing produces")
    return arr, ""


def _write_shard(directory: Path, keys: list[str], paths: list, preprocess: Preprocessor, shape: tuple,
                 pool: ThreadPoolExecutor, bar) -> None:
    name = "shard-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    valid, errors = np.zeros(len(keys), bool), [""] * len(keys)
    with atomic_path(directory / f"{name}.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keys), *shape))
        for i, (arr, err) in enumerate(pool.map(lambda p: _decode(p, preprocess, shape), paths)):
            if arr is None:
                errors[i] = err
            else:
                out[i], valid[i] = arr, True
            bar.update(1)
        out.flush()
        del out
    with atomic_path(directory / f"{name}.index.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys, dtype=str), valid=valid, errors=np.array(errors, dtype=str))


def build(directory: str | Path, image_ids: Sequence[str], image_paths: Sequence[str | Path],
          preprocess: Preprocessor, preprocess_id: str, shape: tuple[int, int, int], num_workers: int = 0,
          shard_size: int = 4096, progress: bool = True) -> ImageCache:
    """Decode and preprocess the images not yet cached (by key) into new shards; returns the whole cache.

    ``num_workers`` decoding threads (0: all available cores). Unreadable images are stored invalid, with the
    reason (``cache.errors``), so a later build does not retry them until the file changes.
    """
    directory, shape = Path(directory), tuple(int(s) for s in shape)
    meta = directory / "meta.json"
    if meta.exists():
        saved = read_json(meta)
        if saved["preprocess"] != preprocess_id or tuple(saved["shape"]) != shape:
            raise ValueError(f"{directory} caches images preprocessed as {saved['preprocess']} {saved['shape']}, "
                             f"not {preprocess_id} {list(shape)}: use another folder or delete this one")
    else:
        write_json(meta, {"preprocess": preprocess_id, "shape": list(shape)})
    cache = ImageCache(directory)
    todo = {}
    for image_id, path in zip(image_ids, image_paths):
        key = image_key(str(image_id), path)
        if key not in cache.index:
            todo.setdefault(key, path)
    if not todo:
        return cache
    keys, paths = list(todo), list(todo.values())
    with ThreadPoolExecutor(num_workers or available_cores()) as pool, \
            tqdm(total=len(keys), desc="image cache", unit="img", disable=not progress) as bar:
        for s in range(0, len(keys), shard_size):
            _write_shard(directory, keys[s:s + shard_size], paths[s:s + shard_size], preprocess, shape, pool, bar)
    return ImageCache(directory)


class CachedImages(torch.utils.data.Dataset):
    """``(uint8 tensor (H, W, 3), valid, position)`` for each of ``rows`` of an :class:`ImageCache`."""

    def __init__(self, cache: ImageCache, rows: Sequence[int]):
        self.cache, self.rows = cache, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        arr, valid, _ = self.cache[int(self.rows[i])]
        return torch.from_numpy(arr), valid, i


def create_loader(cache: ImageCache, rows: Sequence[int], batch_size: int, shuffle: bool = False, seed: int = 0,
                  num_workers: int | None = None, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``rows`` of the cache; ``num_workers=None`` uses every available core."""
    workers = available_cores() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(CachedImages(cache, rows), batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed) if shuffle else None,
                                       num_workers=workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)
