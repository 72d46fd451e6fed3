"""Two-view augmentation in batch form on the images' own device (GPU in the fast path).

The reference path augments one PIL image at a time in DataLoader workers; at 32x32 that caps
training near 6,000 pairs/s. Here every random parameter of a batch is drawn at once from a
``torch.Generator`` on the device, then applied as a handful of batched tensor ops: no Python
loop over samples, no host sync (no ``.item()``, no boolean-mask indexing).

Sampling follows torchvision's transforms exactly, so the two paths train the same model:

- ``RandomResizedCrop``: 10 attempts of (scale, log-ratio), integer-rounded box, first valid
  attempt, else torchvision's central fallback; the crop is resized like
  ``F.resized_crop(antialias=True)`` (bilinear with half-pixel centres, the filter widened
  when the crop shrinks), as per-sample filter matrices.
- ``RandomApply(ColorJitter(b, c, s, h), p)``: factors uniform in ``[1-b, 1+b]`` ... and hue in
  ``[-h, h]``, applied in a random order per sample (a random permutation, like
  ``ColorJitter.get_params``); each op has torchvision's tensor formula.
- ``RandomGrayscale(p)``, ``RandomApply(GaussianBlur(k, sigma), p)`` with reflect padding,
  ``RandomHorizontalFlip`` (folded into the crop's sampling grid; it commutes with the rest).

Sampling (random) and applying (deterministic, ``apply_view``) are separate so that the
application can be compared op by op with torchvision and compiled on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ascl.training.augment import VIEWS, AugmentConfig, blur_kernel_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale for tensors
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


@dataclass(frozen=True)
class ViewSpec:
    """The random transforms of one view, in torchvision's terms (what ``AugmentConfig`` says)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation jitter must be >= 0")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd number, got {self.blur_kernel}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")


def view_spec(view: str, cfg: AugmentConfig, image_size: int) -> ViewSpec:
    """The ``strong`` or ``weak`` (crop + flip) view of ``cfg``, as ``augment.view_transform`` builds it."""
    crop = {"scale": tuple(cfg.crop_scale), "ratio": tuple(cfg.crop_ratio), "flip_p": float(cfg.flip_p)}
    if view == "weak":
        return ViewSpec(**crop)  # type: ignore[arg-type]
    if view != "strong":
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    return ViewSpec(
        **crop,  # type: ignore[arg-type]
        jitter_p=float(cfg.jitter_p),
        brightness=float(cfg.jitter_brightness),
        contrast=float(cfg.jitter_contrast),
        saturation=float(cfg.jitter_saturation),
        hue=float(cfg.jitter_hue),
        grayscale_p=float(cfg.grayscale_p),
        blur_p=float(cfg.blur_p),
        blur_sigma=(float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1])),
        blur_kernel=blur_kernel_size(image_size, cfg.blur_kernel_fraction),
    )


def view_specs(augment: AugmentConfig | None, image_size: int) -> tuple[ViewSpec, ViewSpec]:
    """(query view, key view) of an ``AugmentConfig``; None means the paper's default
    (strong query, weak key)."""
    cfg = augment if augment is not None else AugmentConfig()
    return view_spec(cfg.query_view, cfg, image_size), view_spec(cfg.key_view, cfg, image_size)


@dataclass
class ViewParams:
    """Per-sample random parameters of one view of a batch of B images (all on one device)."""

    boxes: torch.Tensor  # [B, 4] float (top, left, height, width) in source pixels, integers
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B, 4] float (brightness, contrast, saturation, hue); identity if not applied
    order: torch.Tensor  # [B, 4] long: order[:, t] is the op applied t-th (0 b, 1 c, 2 s, 3 h)
    gray: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float blur sigma; 0 means no blur


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device, cols: int = 0) -> torch.Tensor:
    shape = (n, cols) if cols else (n,)
    return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for n samples at once -> [n, 4] (i, j, h, w)."""
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * _uniform(n, scale[0], scale[1], gen, device, CROP_ATTEMPTS)  # [n, A]
    aspect = torch.exp(_uniform(n, log_lo, log_hi, gen, device, CROP_ATTEMPTS))  # [n, A]
    w = torch.round(torch.sqrt(target * aspect))  # [n, A]
    h = torch.round(torch.sqrt(target / aspect))  # [n, A]
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, A]
    first = valid.int().argmax(dim=1, keepdim=True)  # [n, 1]: first valid attempt (0 if none)
    w = w.gather(1, first).squeeze(1)  # [n]
    h = h.gather(1, first).squeeze(1)  # [n]
    i = torch.floor(torch.rand(n, generator=gen, device=device) * (height - h + 1))  # [n]
    j = torch.floor(torch.rand(n, generator=gen, device=device) * (width - w + 1))  # [n]
    ok = valid.any(dim=1)  # [n]
    # Python scalars in torch.where: no host-to-device copy (a copy from pageable memory syncs)
    fallback = _central_fallback(height, width, ratio)
    return torch.stack([torch.where(ok, v, float(f)) for v, f in zip((i, j, h, w), fallback, strict=True)], dim=1)


def _central_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's central crop when all 10 attempts fail (rare at scale >= 0.2)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(spec: ViewSpec, n: int, height: int, width: int, gen: torch.Generator, device: torch.device) -> ViewParams:
    """Draw every random parameter of one view for n images of size height x width."""
    boxes = sample_crop_boxes(n, height, width, spec.scale, spec.ratio, gen, device)
    flip = torch.rand(n, generator=gen, device=device) < spec.flip_p
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, gen, device),
            _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, gen, device),
            _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, gen, device),
            _uniform(n, -spec.hue, spec.hue, gen, device),
        ],
        dim=1,
    )  # [n, 4]
    order = torch.rand(n, 4, generator=gen, device=device).argsort(dim=1)  # [n, 4] random permutations
    jitter_on = torch.rand(n, generator=gen, device=device) < spec.jitter_p  # [n]
    identity = torch.ones_like(factors)
    identity[:, 3] = 0.0  # (1, 1, 1, 0): no change; filled on the device, no host copy
    jitter = torch.where(jitter_on.unsqueeze(1), factors, identity)  # [n, 4]
    gray = torch.rand(n, generator=gen, device=device) < spec.grayscale_p
    blur_on = torch.rand(n, generator=gen, device=device) < spec.blur_p
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], gen, device)
    sigma = torch.where(blur_on, sigma, 0.0)
    return ViewParams(boxes=boxes, flip=flip, jitter=jitter, order=order, gray=gray, sigma=sigma)


def resize_weights(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """Per-sample matrices that resize a crop along one axis: torchvision's (and PIL's)
    antialiased bilinear filter, as ``F.resized_crop(..., antialias=True)`` applies it.

    Output pixel i of a crop [start, start + length) is centred at start + (i + 0.5) * scale
    (scale = length / out); input pixel j (centre j + 0.5) weighs triangle((j + 0.5 - centre) /
    max(scale, 1)), only inside the crop, normalised to sum 1. Upscaling is plain bilinear with
    half-pixel centres; shrinking widens the triangle so that every input pixel counts.
    start, length: [B] (integers as floats) -> [B, out, size].
    """
    scale = (length / out).unsqueeze(1)  # [B, 1]
    centre = start.unsqueeze(1) + (torch.arange(out, device=start.device, dtype=start.dtype) + 0.5) * scale  # [B, out]
    pixel = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5  # [size] input pixel centres
    t = (pixel.view(1, 1, -1) - centre.unsqueeze(2)) / scale.clamp_min(1.0).unsqueeze(2)  # [B, out, size]
    weights = (1.0 - t.abs()).clamp_min(0.0)
    inside = (pixel.view(1, -1) > start.unsqueeze(1)) & (pixel.view(1, -1) < (start + length).unsqueeze(1))  # [B, size]
    weights = weights * inside.unsqueeze(1)
    return weights / weights.sum(dim=2, keepdim=True).clamp_min(1e-12)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop boxes, resize to size x size (antialiased bilinear, as torchvision's), flip.

    Two batched matrix products per image (rows, then columns) with per-sample filter
    matrices (``resize_weights``); a flip reverses the column matrix.
    images: [B, 3, H, W] float; boxes: [B, 4] (i, j, h, w); flip: [B] bool -> [B, 3, S, S].
    """
    _, _, height, width = images.shape
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, height).to(images.dtype)  # [B, S, H]
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, width).to(images.dtype)  # [B, S, W]
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    return torch.einsum("bsh,bchw,btw->bcst", rows, images, cols)  # [B, 3, S, S]


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB. [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns per sample (torchvision's RGB->HSV->RGB). [B,3,H,W], [B]."""
    maxc = x.amax(dim=1)  # [B, H, W]
    minc = x.amin(dim=1)
    r, g, b = x.unbind(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    sat = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    hue = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)  # [B, H, W]
    # HSV -> RGB in closed form: channel n uses k = (n + 6h) mod 6 with n = 5, 3, 1.
    chans = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue * 6.0, 6.0)
        chans.append(maxc - maxc * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(chans, dim=1)


def _blend_op(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) per sample in one pass: all three are
    torchvision blends of x with black, its mean luma or its luma. x: [B,3,H,W]; op, factor: [B]."""
    gray = grayscale(x)  # [B, 1, H, W]
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    sel = op.view(-1, 1, 1, 1)
    other = torch.where(sel == 0, torch.zeros_like(mean), torch.where(sel == 1, mean, gray))
    return _blend(x, other, factor)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with a per-sample random order. x: [B,3,H,W]; factors, order: [B, 4].

    The three blend ops before the hue rotation run as up to three slots, then one hue pass,
    then the blend ops after it: each slot is one batched blend with the identity factor for
    samples that have nothing to do there. No gathers of images, no host syncs.
    """
    hue_at = (order == 3).int().argmax(dim=1)  # [B] position of the hue op
    cheap_pos = torch.sort((order == 3).int(), dim=1, stable=True).indices[:, :3]  # [B, 3]
    cheap = order.gather(1, cheap_pos)  # [B, 3] blend ops in their order
    cheap_factor = factors.gather(1, cheap)  # [B, 3]
    ones = torch.ones_like(cheap_factor[:, 0])
    for slot in range(3):
        before = slot < hue_at
        x = _blend_op(x, cheap[:, slot], torch.where(before, cheap_factor[:, slot], ones))
    x = adjust_hue(x, factors[:, 3])
    for slot in range(3):
        after = slot >= hue_at
        x = _blend_op(x, cheap[:, slot], torch.where(after, cheap_factor[:, slot], ones))
    return x


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels per sample; sigma 0 gives the identity. [B] -> [B, size]."""
    half = (size - 1) * 0.5
    pos = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)  # [size]
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).unsqueeze(1)  # [B, 1]
    pdf = torch.exp(-0.5 * (pos / safe) ** 2)  # [B, size]
    kern = pdf / pdf.sum(dim=1, keepdim=True)
    delta = (pos == 0).to(sigma.dtype).expand_as(kern)
    return torch.where(sigma.unsqueeze(1) > 0, kern, delta)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma and reflect padding (torchvision's).

    x: [B, C, H, W]; sigma: [B] (0 = untouched) -> [B, C, H, W].
    """
    if size == 1:
        return x
    kern = gaussian_kernels(sigma, size).to(x.dtype)  # [B, size]
    pad = size // 2
    height, width = x.shape[-2:]
    if pad >= min(height, width):
        raise ValueError(f"blur kernel {size} is too large for {height}x{width} images (reflect padding)")
    xp = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    x = sum(kern[:, i].view(-1, 1, 1, 1) * xp[..., i : i + width] for i in range(size))  # type: ignore[assignment]
    xp = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return sum(kern[:, i].view(-1, 1, 1, 1) * xp[..., i : i + height, :] for i in range(size))  # type: ignore[return-value]


def apply_view(images: torch.Tensor, params: ViewParams, spec: ViewSpec, size: int) -> torch.Tensor:
    """Deterministic part of a view: [B, 3, H, W] float in [0, 1] -> [B, 3, S, S] in [0, 1].

    Same order as the reference pipeline: crop (+ flip), jitter, grayscale, blur.
    """
    x = resized_crop(images, params.boxes, params.flip, size)
    if spec.jitter_p > 0:
        x = color_jitter(x, params.jitter, params.order)
    if spec.grayscale_p > 0:
        x = torch.where(params.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if spec.blur_p > 0:
        x = gaussian_blur(x, params.sigma, spec.blur_kernel)
    return x
