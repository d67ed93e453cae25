"""LPIPS (AlexNet, v0.1) built once, without a download, and run in batches."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.definitions import MODES
from utils.hub import ALEXNET_FILE, hub_checkpoint_path


class LpipsUnavailable(RuntimeError):
    """The LPIPS network cannot be built here; ``str(err)`` says what to install or place where."""


def lpips_weights_path() -> Path:
    """Where the LPIPS AlexNet backbone must be: torchvision's ImageNet weights in the hub cache."""
    return hub_checkpoint_path(ALEXNET_FILE)


def lpips_unavailable_reason() -> str | None:
    """None when LPIPS (AlexNet, v0.1) can be built without a download, else why not (one line)."""
    try:
        import lpips
    except ImportError:
        return "the lpips package is not installed (pip install lpips==0.1.4)"
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not heads.is_file():
        return f"the lpips package has no linear-head weights at {heads}"
    path = lpips_weights_path()
    if not path.is_file():
        return (f"AlexNet weights not found: place {path.name} (torchvision AlexNet IMAGENET1K_V1) "
                f"in {path.parent}")
    return None


def build_lpips_net(random_backbone: bool = False):
    """``lpips.LPIPS(net='alex', version='0.1')`` in eval mode, without its set-up prints.

    Args:
        random_backbone: randomly initialised AlexNet (``pnet_rand=True``; the linear heads ship
            with the package), for tests: nothing is downloaded or read from the hub cache.
    Raises:
        LpipsUnavailable: weights missing (checked first, so no download is ever attempted) or
            unreadable.
    """
    reason = None if random_backbone else lpips_unavailable_reason()
    if reason:
        raise LpipsUnavailable(reason)
    import lpips

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # lpips 0.1.4 calls tv.alexnet(pretrained=...), deprecated in torchvision but equivalent.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=random_backbone, verbose=False)
    except Exception as e:  # a truncated or foreign file in the hub cache
        raise LpipsUnavailable(f"cannot build LPIPS from {lpips_weights_path()}: {type(e).__name__}: {e}") from None
    return net.eval()


class LpipsScorer:
    """LPIPS built once and run in batches, on the GPU when there is one.

    Args:
        net: a module called as ``net(x0, x1)`` on (B, C, H, W) float32 tensors, returning (B, 1, 1, 1)
            (default: ``build_lpips_net(random_backbone)``). Injectable for tests.
        random_backbone: see :func:`build_lpips_net`.
        device: "cuda", "cpu", ... (default: cuda if available).
        batch_size: image pairs per forward pass.
    """

    def __init__(self, net=None, random_backbone: bool = False, device: str | None = None, batch_size: int = 4):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = (net if net is not None else build_lpips_net(random_backbone)).to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size

    def __call__(self, gt: Sequence[np.ndarray] | np.ndarray, pred: Sequence[np.ndarray] | np.ndarray,
                 mode: str = "faithful") -> np.ndarray:
        """LPIPS distance of each pair.

        Args:
            gt, pred: N images each, (N, H, W) or a sequence of (H, W) arrays, in [0, 1], one size.
            mode: "faithful" feeds (B, 1, H, W) in [0, 1] as the reference did (LPIPS expects
                [-1, 1]; its per-channel scaling layer broadcasts the single channel to three);
                "corrected" feeds 2x - 1 repeated to (B, 3, H, W).
        Returns:
            float64 (N,).
        """
        import torch

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        gt, pred = np.asarray(gt, np.float32), np.asarray(pred, np.float32)
        if gt.shape != pred.shape or gt.ndim != 3:
            raise ValueError(f"expected two (N, H, W) stacks of one shape, got {gt.shape} and {pred.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(gt), self.batch_size):
                x0, x1 = (torch.from_numpy(a[i:i + self.batch_size, None]).to(self.device) for a in (gt, pred))
                if mode == "corrected":
                    x0, x1 = ((2 * x - 1).expand(-1, 3, -1, -1) for x in (x0, x1))
                out.append(self.net(x0, x1).reshape(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def lpips_scorer(device: str | None = None, batch_size: int = 4) -> tuple[LpipsScorer | None, str | None]:
    """(scorer, None) when LPIPS can be built here without a download, else (None, why not)."""
    reason = lpips_unavailable_reason()
    if reason is not None:
        return None, reason
    try:
        return LpipsScorer(device=device, batch_size=batch_size), None
    except LpipsUnavailable as e:
        return None, str(e)
