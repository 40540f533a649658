"""Domain guard: how much an image looks like a run's training images, in the run's own feature space.

A model trained on one narrow kind of image (the demo: SD 1.5 ``style of <artist>`` tiles) carries no signal
on other images, and then a constant scores better than the model (issue 13). The guard:

- **score**: how far an image's pooled backbone features (the features the heads read), L2-normalised, lie
  outside the principal subspace of the training images' features: the norm of the residual after projecting
  (centred) onto the top ``DIMS`` principal components. Compared on the demo (EfficientNet-Lite2 and -Lite0)
  with k-NN cosine distance (k = 1, 5, 10) and Mahalanobis distance in 8-64 PCA dimensions, it separated
  scikit-image's photos from held-out SD images best (Lite2: 14 of 15 photos beyond every val image, where
  k-NN put at most 2 of 15 there);
- **calibration**: the median and MAD of in-domain scores of images the subspace was not fitted on give ``z``;
  ``in_domain = min(1, P(Z ≥ z) / ALPHA)`` for a normal ``Z``: images up to the (1 − ALPHA) quantile of
  in-domain images keep exactly 1 (prediction untouched), beyond it the weight falls smoothly to 0. With a
  frozen backbone, train and val features are alike (training never touched them): the subspace is fitted on
  train ∪ val and calibrated on their ``FOLDS``-fold out-of-fold scores, more reference and four times the
  calibration images of the val split alone (on the demo's seven runs: test split in domain 98.3 → 98.3-100 %,
  guard cost on the test cosine −0.0015..−0.0029 → −0.0003..−0.0018, the same photos out,
  ``bench/bench_guard_scores.py``). A fine-tuned backbone has seen its training images, whose features are then
  tighter than new images': the subspace is fitted on train and calibrated on val;
- **the files together** (:func:`shift_caps`, ``revsd predict``'s default; ``--each-alone`` turns it off): a folder
  can be shifted as a whole while each image alone looks ordinary. On 34 images by other generators (ComfyUI's
  templates: Flux, SDXL, Qwen-Image, ...; ``bench/bench_templates.py``) the per-image score put 10 out of domain
  and predict scored 0.37 where the bank's mean scores 0.50: their portraits and scenes look like the sample's
  styled portraits to an ImageNet network, and no single-image score of ``bench/bench_guard_scores.py`` (nor a
  union over every block's channel statistics, at a test cost of 0.012) separated them. Their p-values do: 3 of 34
  above ½ where an in-domain folder has half. A test on that count (level 10⁻³) and Storey's two-group estimate
  of the in-domain share then cap each image's ``in_domain``;
- **guard**: ``normalize(in_domain · model + (1 − in_domain) · prior)``, ``prior`` the mean embedding of the
  prompt bank (the constant that beats an out-of-domain model) or, in ``revsd predict``, each image's
  image-conditioned prior (``revsd.prior``); the vocabulary head's word probabilities move alike, towards each
  word's share of the bank's prompts (:class:`WordPrior`, :func:`guard_probs`).

Alternatives compared on every demo run (``bench/bench_guard_scores.py``): Q with 16 components, Hotelling T²,
k-NN, Ledoit-Wolf Mahalanobis, the ImageNet-logit view, their union and per-block channel statistics.

Saved in the run folder as ``domain.npz`` (training mean, principal components, calibration scores) and
``domain.json`` (calibration; the weights file it belongs to: size, mtime and SHA-256, so a run folder copied
elsewhere, e.g. attached to an offline Kaggle notebook, keeps its guard), written atomically; :func:`load_or_fit`
computes them on first use from the run's train/val rows (``revsd.targets``) and recomputes them when the weights
changed (a read-only folder: used unsaved).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from revsd import paths
from revsd.artifacts import atomic_path, file_sha256, read_json, write_json
from revsd.images import ImageError, open_rgb

DIMS = 64  # principal components kept (at most a third of the training images and half the feature size)
ALPHA = 0.005  # in-domain images beyond the calibration (1 - ALPHA) quantile start moving towards the prior
MAX_REF, MAX_VAL = 5000, 2000  # rows kept (seeded sample) from big training / validation splits
FOLDS = 5  # cross-fitting folds of the calibration (frozen backbones)
OUT_OF_DOMAIN = 0.5  # in_domain below this counts as "out of domain" in predict's summary
SHIFT_LEVEL = 1e-3  # the batch shift test's level (:func:`shift_caps`)
FILES = ("domain.npz", "domain.json")
VERSION = 3


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class DomainGuard:
    mean: np.ndarray  # (F,) mean of the unit-norm training features
    components: np.ndarray  # (d, F) their top principal directions
    median: float  # calibration scores: median
    scale: float  # and MAD-based standard deviation
    val_scores: np.ndarray | None = None  # the calibration scores (val, or out-of-fold train ∪ val)
    alpha: float = ALPHA
    calibration: str = "val"  # or "out-of-fold train+val" (cross-fitted)

    @classmethod
    def fit(cls, train_feats: np.ndarray, val_feats: np.ndarray, dims: int = DIMS, alpha: float = ALPHA,
            cross_fit: bool = False, folds: int = FOLDS) -> DomainGuard:
        """Subspace of ``train_feats``, calibrated on ``val_feats``; ``cross_fit``: subspace of both, calibrated
        on their out-of-fold scores (when train and val features are exchangeable: a frozen backbone)."""
        if len(train_feats) < 6 or len(val_feats) < 5:
            raise ValueError(f"the domain guard needs ≥ 6 training and ≥ 5 validation images, got "
                             f"{len(train_feats)} and {len(val_feats)}")
        if not cross_fit:
            g = cls._subspace(train_feats, dims, len(train_feats), alpha)
            return g._calibrated(g.score(val_feats))
        x = np.concatenate([train_feats, val_feats])
        n_fit = len(x) - -(-len(x) // folds)  # rows each fold's subspace is fitted on: the same dims everywhere
        fold = np.random.default_rng(0).permutation(len(x)) % folds
        oof = np.zeros(len(x), np.float32)
        for f in range(folds):
            oof[fold == f] = cls._subspace(x[fold != f], dims, n_fit, alpha).score(x[fold == f])
        g = cls._subspace(x, dims, n_fit, alpha)
        g.calibration = f"out-of-fold train+val ({folds} folds)"
        return g._calibrated(oof)

    @classmethod
    def _subspace(cls, feats: np.ndarray, dims: int, n_fit: int, alpha: float) -> DomainGuard:
        x = _unit(feats)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        keep = max(1, min(dims, n_fit // 3, x.shape[1] // 2))
        return cls(mean, vt[:keep].astype(np.float32), 0.0, 1.0, None, alpha)

    def _calibrated(self, s: np.ndarray) -> DomainGuard:
        self.median = float(np.median(s))
        self.scale = float(max(1.4826 * np.median(np.abs(s - self.median)), 1e-6))
        self.val_scores = np.asarray(s, dtype=np.float32)
        return self

    @property
    def n_calibration(self) -> int | None:
        return None if self.val_scores is None else len(self.val_scores)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Norm of the part of the (unit, centred) features outside the training subspace, (n,) float32."""
        y = _unit(feats) - self.mean
        return np.linalg.norm(y - (y @ self.components.T) @ self.components, axis=1).astype(np.float32)

    def p_values(self, s: np.ndarray) -> np.ndarray:
        """``P(Z ≥ z)`` per score (about uniform for training-like images; ½ at the calibration median)."""
        z = (np.asarray(s, dtype=np.float64) - self.median) / self.scale
        return np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z])

    def in_domain_from_scores(self, s: np.ndarray) -> np.ndarray:
        return np.minimum(1.0, self.p_values(s) / self.alpha).astype(np.float32)

    def in_domain(self, feats: np.ndarray) -> np.ndarray:
        """``min(1, P(Z ≥ z) / alpha)`` per image, (n,) in [0, 1]."""
        return self.in_domain_from_scores(self.score(feats)) if len(feats) else np.zeros(0, np.float32)

    def to_json(self) -> dict:
        val = self.val_scores
        return {"version": VERSION, "score": f"residual norm outside the top {len(self.components)} principal "
                "components of the unit-norm training features", "dims": len(self.components), "alpha": self.alpha,
                "calibration": self.calibration, "median": self.median, "scale": self.scale,
                "n_calibration": 0 if val is None else len(val),
                "calibration_fraction_untouched": None if val is None else
                float((self.in_domain_from_scores(val) >= 1).mean())}


def shift_caps(p: np.ndarray, n_cal: int | None = None, level: float = SHIFT_LEVEL) -> tuple[np.ndarray, float | None]:
    """The batch view of the guard: caps on ``in_domain`` for images judged together (``p``: their p-values, in
    order), and the batch's estimated in-domain share (``None``: no shift found).

    ``p > ½`` means a score below the calibration median, so half of a batch of training-like images lies there,
    whatever the scores' distribution. Far fewer (one-sided test at ``level``; the count's variance is the
    binomial n/4 plus n²/(4 ``n_cal``) for the calibration median's own uncertainty, so a large in-domain batch
    does not trip it) means the batch as a whole comes from elsewhere, even where each image alone is unremarkable
    (another generator's portraits look like the demo's). Then, by Storey's two-group estimate (λ = ½), the
    batch's in-domain share is ``π = #{p > ½} / (n/2)``, and an image with ``p ≤ ½`` is in domain with probability
    ``π · (n/2) / #{p ≤ ½}`` (its cap); images above ½ keep theirs."""
    p = np.asarray(p, dtype=np.float64)
    n, above = len(p), int((p > 0.5).sum())
    caps = np.ones(n, np.float32)
    var = n / 4 + (n * n / (4 * n_cal) if n_cal else 0.0)
    if n == 0 or 0.5 * math.erfc(-(above + 0.5 - n / 2) / math.sqrt(2 * var)) >= level:
        return caps, None
    share = min(1.0, above / (n / 2))
    caps[p <= 0.5] = min(1.0, share * (n / 2) / max(n - above, 1))
    return caps, share


def guard(emb: np.ndarray, in_domain: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``normalize(w · emb + (1 − w) · prior)`` row-wise, ``w`` = in_domain (n,) or one weight for all rows;
    ``prior`` (D,) one for all images or (n, D) one per image (``revsd.prior``, which mixes with it too)."""
    w = np.asarray(in_domain, dtype=np.float32).reshape(-1, 1)
    p = _unit(prior)
    return _unit(w * _unit(emb) + (1.0 - w) * (p[None, :] if p.ndim == 1 else p))


def priors_for(prior, imgs, feats, ind) -> np.ndarray:
    """``prior`` itself (a vector), or the image prior (``revsd.prior.ImagePrior``) of each image the guard moves
    (in_domain < 1; zeros else)."""
    if not callable(prior):
        return prior
    out = np.zeros((len(imgs), len(prior.broad)), np.float32)
    need = np.flatnonzero(ind < 1)
    if len(need):
        out[need] = prior([imgs[i] for i in need], feats[need])
    return out


def bank_prior(bank_emb: np.ndarray) -> np.ndarray:
    """The broad prior: the normalised mean embedding of a prompt bank."""
    return _unit(np.asarray(bank_emb, dtype=np.float32).mean(0))


class WordPrior:
    """The vocabulary head's prior: the share of the prompt bank's prompts holding each word (the vocabulary's own
    lemmatisation, ``revsd.vocab.label_matrix``), i.e. what the head should say of an image it knows nothing of.
    Counted on first use, on a seeded sample of at most ``max_prompts`` prompts (standard error ≤ 0.011 at 2,000),
    and cached under ``working/cache/word_rates/`` (keyed by those prompts and words: the tagger then loads once)."""

    def __init__(self, prompts, words, max_prompts: int = 2000):
        self.prompts, self.words, self.max_prompts = list(prompts), list(words), max_prompts
        self._rates: np.ndarray | None = None

    @property
    def rates(self) -> np.ndarray:
        if self._rates is None:
            p = self.prompts
            if len(p) > self.max_prompts:
                p = [p[i] for i in np.sort(np.random.default_rng(0).choice(len(p), self.max_prompts, replace=False))]
            key = hashlib.sha256(json.dumps([VERSION, p, self.words]).encode()).hexdigest()[:24]
            cache = paths.working_dir() / "cache" / "word_rates" / f"{key}.npy"
            try:
                self._rates = np.load(cache)
            except (OSError, ValueError):
                self._rates = self._count(p)
                if self._rates is None:  # not cached: counted again once the tagger is there
                    self._rates = np.zeros(len(self.words), np.float32)
                else:
                    with contextlib.suppress(OSError), atomic_path(cache) as tmp, open(tmp, "wb") as f:
                        np.save(f, self._rates)
        return self._rates

    def _count(self, prompts: list[str]) -> np.ndarray | None:
        from revsd import vocab

        if not prompts or not self.words:
            return np.zeros(len(self.words), np.float32)
        try:
            return np.asarray(vocab.label_matrix(prompts, self.words).mean(0), np.float32).ravel()
        except Exception as e:  # e.g. no spaCy model here: words then fade with in_domain (rates 0)
            warnings.warn(f"word prior unavailable ({type(e).__name__}: {e}); out-of-domain word "
                          "probabilities move towards 0", stacklevel=3)
            return None


def guard_probs(probs: np.ndarray, in_domain: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Word probabilities moved as the embedding is: ``w · probs + (1 − w) · rates`` row-wise, ``w`` = in_domain."""
    w = np.asarray(in_domain, dtype=np.float32).reshape(-1, 1)
    return (w * np.asarray(probs, dtype=np.float32) + (1.0 - w) * np.asarray(rates, dtype=np.float32)[None, :])


# --- persistence ------------------------------------------------------------------------------------------------

def _weights_stamp(run_dir: Path, digest: bool = False) -> dict:
    f = run_dir / "model.safetensors"
    st = f.stat() if f.exists() else None
    stamp = {"file": f.name, "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None}
    if digest and st:
        stamp["sha256"] = file_sha256(f)
    return stamp


def _same_weights(saved: dict, run_dir: Path) -> bool:
    """Whether the guard was fitted on these weights: same size and mtime, or (a copied run folder, e.g. a Kaggle
    dataset, gets new mtimes) the same content hash."""
    now = _weights_stamp(run_dir)
    if not isinstance(saved, dict) or now["size"] is None or saved.get("size") != now["size"]:
        return False
    if saved.get("mtime_ns") == now["mtime_ns"]:
        return True
    return bool(saved.get("sha256")) and file_sha256(run_dir / now["file"]) == saved["sha256"]


def save(run_dir: str | Path, g: DomainGuard) -> None:
    run_dir = Path(run_dir)
    with atomic_path(run_dir / FILES[0]) as tmp, open(tmp, "wb") as f:
        np.savez(f, mean=g.mean, components=g.components, val_scores=g.val_scores)
    write_json(run_dir / FILES[1], {**g.to_json(), "weights": _weights_stamp(run_dir, digest=True)})


def load(run_dir: str | Path) -> DomainGuard | None:
    """The saved guard, or ``None`` when missing, unreadable, of another version or of other weights."""
    run_dir = Path(run_dir)
    try:
        meta = read_json(run_dir / FILES[1])
        if meta.get("version") != VERSION or not _same_weights(meta.get("weights"), run_dir):
            return None
        with np.load(run_dir / FILES[0]) as z:
            return DomainGuard(z["mean"], z["components"], float(meta["median"]), float(meta["scale"]),
                               z["val_scores"], float(meta["alpha"]), str(meta.get("calibration", "val")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None


def image_features(predictor, files, batch_size: int = 32, min_side: int | None = None, desc: str = "") -> np.ndarray:
    """Pooled features of the readable ``files`` (unreadable ones are left out)."""
    out = []
    for s in tqdm(range(0, len(files), batch_size), desc=desc or "features", unit="batch", leave=False):
        imgs = []
        for f in files[s:s + batch_size]:
            try:
                imgs.append(open_rgb(f, min_side=min_side))
            except ImageError:
                continue
        if imgs:
            out.append(predictor.predict(imgs, batch_size=batch_size, with_features=True)[2])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_for_run(run_dir: str | Path, predictor, exp: str | None = None, min_side: int | None = None) -> DomainGuard:
    """Fit on the run's train and val images from ``revsd.targets.load(exp)``, cross-fitted for a frozen backbone."""
    from revsd import targets

    run_dir = Path(run_dir)
    ts = targets.load(exp or run_dir.parent.name)
    paths = ts.table["image_path"].to_numpy()
    rng = random.Random(0)

    def rows(split, cap):
        r = ts.rows(split).tolist()
        return sorted(rng.sample(r, cap)) if len(r) > cap else r

    train = image_features(predictor, list(paths[rows("train", MAX_REF)]), min_side=min_side, desc="domain: train")
    val = image_features(predictor, list(paths[rows("val", MAX_VAL)]), min_side=min_side, desc="domain: val")
    spec = getattr(predictor, "spec", None)
    return DomainGuard.fit(train, val, cross_fit=getattr(spec, "mode", None) == "frozen")


def load_or_fit(run_dir: str | Path, predictor, min_side: int | None = None) -> DomainGuard:
    """The run's saved guard, or fit and save it (raises ``FileNotFoundError``/``ValueError`` when impossible)."""
    g = load(run_dir)
    if g is None:
        g = fit_for_run(run_dir, predictor, min_side=min_side)
        try:
            save(run_dir, g)
        except OSError as e:  # a read-only run folder (e.g. a Kaggle input): use it unsaved
            warnings.warn(f"domain guard not saved in {run_dir} ({e}); it is recomputed next time", stacklevel=2)
    return g
