"""Two views per batch on the CPU, one image at a time in OpenCV: the fast path's data on a CPU.

The batched tensor views (``gpu_augment``) suit a GPU, where ~100 elementwise kernels over a
batch cost little. On a CPU each of those kernels is a pass over memory: at 128 px they took
as long as the training step itself. Here every image is cropped, resized, blurred and
colour-mapped in uint8 by OpenCV (SIMD code that releases the GIL), and converted to
normalised float32 once, so both views of a batch cost a small fraction of a step.

The random parameters are drawn exactly as for the tensor views (``gpu_augment.sample_view``:
torchvision's crop boxes, flips, jitter factors in a random order, grayscale, blur sigma), from
a generator seeded by (run seed, epoch, batch), so a resumed run sees the same views. How they
are applied differs from torchvision in documented ways:

- crop: ``cv2.resize`` of the box, bilinear when it grows and area-averaging when it shrinks
  (torchvision: antialiased bilinear); flip after the resize.
- blur: ``cv2.GaussianBlur`` with torchvision's kernel size and sigma and reflect-101 borders
  (torchvision's "reflect"), applied before the colour map instead of after it: both are
  linear, so the order changes only where a value saturates and by uint8 rounding.
- colour: brightness, contrast, saturation and grayscale keep torchvision's formulas, composed
  in the sampled order into one affine map per image (``colour_twist``), applied by
  ``cv2.transform`` with one saturation to [0, 255] at the end instead of a clamp after every
  op; hue is a rotation of the chroma plane in YIQ (as NVIDIA DALI's colour twist does)
  instead of a shift in HSV: the same intent, linear, so it folds into the one map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ascl.training.augment import AugmentConfig
from ascl.training.gpu_augment import GRAY_WEIGHTS, ViewParams, ViewSpec, sample_view, view_specs
from ascl.training.gpu_data import SeededTwoViews, check_views_input

# RGB -> YIQ (NTSC); hue rotates (I, Q) and leaves luma Y alone.
T = TypeVar("T")
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _require_cv2() -> object:
    try:
        import cv2
    except ImportError as exc:  # the train extra declares it
        raise ImportError("the CPU fast path needs OpenCV: pip install 'ascl-hub[train]' "
                          "(opencv-python-headless), or set fast_path: off") from exc
    cv2.setNumThreads(1)  # one image per call; the step owns the cores
    return cv2


def hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """Per-sample RGB -> RGB hue rotation by ``shift`` turns, in YIQ. [B] -> [B, 3, 3].

    The chroma plane (I, Q) turns by -2 pi shift: in that direction the HSV hue of a saturated
    colour moves by about +shift (0.075 to 0.14 turns for 0.1), like torchvision's adjust_hue;
    luma is kept exactly.
    """
    yiq = torch.tensor(RGB_TO_YIQ, dtype=shift.dtype, device=shift.device)  # [3, 3]
    theta = -2 * math.pi * shift  # [B]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(shift.shape[0], 3, 3, dtype=shift.dtype, device=shift.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3]


def colour_twist(jitter: torch.Tensor, order: torch.Tensor, gray: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """One affine colour map per image: the jitter ops in their sampled order, then grayscale.

    jitter: [B, 4] (brightness, contrast, saturation factors, hue shift; (1, 1, 1, 0) is the
    identity); order: [B, 4], order[:, t] the op applied t-th (0 b, 1 c, 2 s, 3 h); gray: [B]
    bool; means: [B, 3] the image's mean RGB in [0, 1] (contrast blends with the mean luma of
    the image as it is at that point, which for an affine map is the map of the mean).
    Returns [B, 3, 4] = [A | o] acting on RGB in [0, 1]: x -> A x + o.
    """
    n, dtype, device = jitter.shape[0], jitter.dtype, jitter.device
    eye = torch.eye(3, dtype=dtype, device=device).expand(n, 3, 3)
    luma = torch.tensor(GRAY_WEIGHTS, dtype=dtype, device=device)  # [3]
    to_gray = luma.expand(3, 3).expand(n, 3, 3)  # [B, 3, 3]: every row the luma weights
    a = eye.clone()  # [B, 3, 3]
    o = torch.zeros(n, 3, dtype=dtype, device=device)  # [B, 3]
    hue = hue_matrix(jitter[:, 3])  # [B, 3, 3]
    for t in range(4):
        op = order[:, t].view(n, 1, 1)  # [B, 1, 1]
        f = jitter.gather(1, order[:, t : t + 1]).view(n, 1, 1)  # [B, 1, 1] this op's factor
        mean_luma = ((a @ means.unsqueeze(2)).squeeze(2) + o) @ luma  # [B] luma of the current mean
        step = torch.where(op == 2, f * eye + (1 - f) * to_gray, f * eye)  # b, c: f I; s: blend with luma
        step = torch.where(op == 3, hue, step)
        shift = torch.where(op.view(n, 1) == 1, (1 - f.view(n, 1)) * mean_luma.view(n, 1), torch.zeros_like(o))
        a = step @ a
        o = (step @ o.unsqueeze(2)).squeeze(2) + shift.expand(n, 3)
    g = gray.view(n, 1, 1)
    a = torch.where(g, to_gray @ a, a)
    o = torch.where(g.view(n, 1), (to_gray @ o.unsqueeze(2)).squeeze(2), o)
    return torch.cat([a, o.unsqueeze(2)], dim=2)


class CpuTwoViewLoader(SeededTwoViews):
    """Iterates (x_q, x_k) batches of normalised float32 views [B, 3, S, S] (channels_last) made by OpenCV.

    Same interface and seeding as ``gpu_data.GpuTwoViewLoader`` (``SeededTwoViews``):
    ``set_epoch(epoch, start_batch)`` before an epoch, one seed per batch, drop_last.

    Args:
        images_u8: [N, H, W, 3] uint8 on the CPU (decoded once, at any side >= S or smaller).
        batch_size, image_size, mean, std, augment, seed, rank, world_size: as for the tensor views.
    """

    def __init__(
        self,
        images_u8: torch.Tensor | np.ndarray,
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = images_u8.numpy() if isinstance(images_u8, torch.Tensor) else np.asarray(images_u8)
        check_views_input(images.dtype == np.uint8, tuple(images.shape), str(images.dtype), batch_size, rank,
                          world_size, True, mean, std)
        self.cv2 = _require_cv2()
        self.images = np.ascontiguousarray(images)
        self.n_images, self.drop_last = int(images.shape[0]), True
        self.batch_size, self.image_size, self.seed = int(batch_size), int(image_size), int(seed)
        self.rank, self.world_size = rank, world_size
        self.strong, self.weak = view_specs(augment, image_size)
        # normalisation (x / 255 - mean) / std as one per-channel affine map on 0..255 values
        scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float64))
        self._normalise = np.zeros((3, 4), dtype=np.float32)
        self._normalise[np.arange(3), np.arange(3)] = scale
        self._normalise[:, 3] = -np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)
        self.generator = torch.Generator()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def views(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (strong query, weak key) views of images ``idx``: two float32 [B, 3, S, S], channels_last."""
        picks = idx.tolist()
        _, height, width, _ = self.images.shape
        q = sample_view(self.strong, len(picks), height, width, self.generator, torch.device("cpu"))
        k = sample_view(self.weak, len(picks), height, width, self.generator, torch.device("cpu"))
        return self.make_view(picks, q, self.strong), self.make_view(picks, k, self.weak)

    def make_view(self, picks: list[int], params: ViewParams, spec: ViewSpec) -> torch.Tensor:
        """Crop + resize + flip (+ blur, colour map) each image in uint8, then normalise to float32.

        Per-image OpenCV calls release the GIL, so with more than one intra-op thread the images
        are spread over that many threads (the step is not running meanwhile).
        """
        size, n = self.image_size, len(picks)
        crops = np.empty((n, size, size, 3), dtype=np.uint8)  # [B, S, S, 3]
        out = np.empty((n, size, size, 3), dtype=np.float32)  # NHWC memory = channels_last [B, 3, S, S]
        boxes = params.boxes.long().tolist()
        flips = params.flip.tolist()
        sigmas = params.sigma.tolist() if spec.blur_p > 0 else [0.0] * n
        colour = spec.jitter_p > 0 or spec.grayscale_p > 0

        def crop(b: int) -> tuple[float, ...]:
            self._crop(self.images[picks[b]], boxes[b], flips[b], sigmas[b], spec.blur_kernel, crops[b])
            return tuple(self.cv2.mean(crops[b])[:3]) if colour else ()  # type: ignore[attr-defined]

        means = self._map(crop, n)
        maps_np = None
        if colour:
            maps = colour_twist(params.jitter.double(), params.order, params.gray,
                                torch.tensor(means, dtype=torch.float64) / 255.0)  # [B, 3, 4]
            maps[:, :, 3] *= 255.0  # offsets in 0..255 units
            maps_np = maps.float().numpy()

        def finish(b: int) -> None:
            cv2 = self.cv2
            if maps_np is not None:
                cv2.transform(crops[b], maps_np[b], dst=crops[b])  # type: ignore[attr-defined]  # saturates
            np.copyto(out[b], crops[b], casting="unsafe")
            cv2.transform(out[b], self._normalise, dst=out[b])  # type: ignore[attr-defined]

        self._map(finish, n)
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def _crop(self, image: np.ndarray, box: list[int], flip: bool, sigma: float, kernel: int, dst: np.ndarray) -> None:
        """One image's box resized to ``dst`` (uint8 [S, S, 3]), flipped and blurred as asked."""
        cv2 = self.cv2
        i, j, h, w = box
        size = dst.shape[0]
        shrink = h > size and w > size  # area averaging when shrinking; bilinear otherwise
        cv2.resize(image[i : i + h, j : j + w], (size, size), dst=dst,  # type: ignore[attr-defined]
                   interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)  # type: ignore[attr-defined]
        if flip:
            cv2.flip(dst, 1, dst=dst)  # type: ignore[attr-defined]
        if sigma > 0:
            cv2.GaussianBlur(dst, (kernel, kernel), sigma, dst=dst, sigmaY=sigma,  # type: ignore[attr-defined]
                             borderType=cv2.BORDER_REFLECT_101)  # type: ignore[attr-defined]

    def _map(self, fn: Callable[[int], T], n: int) -> list[T]:
        """``[fn(b) for b in range(n)]``, spread over the intra-op thread count."""
        threads = torch.get_num_threads()
        if threads <= 1 or n < 2 * threads:
            return [fn(b) for b in range(n)]
        if self._pool is None or self._pool_size != threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_size = ThreadPoolExecutor(threads, thread_name_prefix="views"), threads
        chunks = [range(c, n, threads) for c in range(threads)]
        parts = list(self._pool.map(lambda r: [(b, fn(b)) for b in r], chunks))
        return [value for _, value in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]
