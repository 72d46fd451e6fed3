"""The CPU fast path's views (ascl.training.cpu_views): the colour map against torchvision's
formulas, each OpenCV step against an independent computation, seeding and resume."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from ascl.training.augment import AugmentConfig
from ascl.training.cpu_views import CpuTwoViewLoader, colour_twist, hue_matrix
from ascl.training.gpu_augment import GRAY_WEIGHTS, ViewParams, ViewSpec

MEAN, STD = (0.45, 0.43, 0.40), (0.25, 0.24, 0.26)


def _apply(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An affine colour map [B, 3, 4] on images [B, 3, H, W]."""
    return torch.einsum("bij,bjhw->bihw", maps[:, :, :3], x) + maps[:, :, 3].view(-1, 3, 1, 1)


def test_colour_twist_composes_torchvision_ops_in_their_order() -> None:
    """Brightness, contrast, saturation and grayscale in a random order per image: the one affine
    map equals torchvision's op-by-op formulas wherever no value saturates (mid-range images)."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    x = torch.rand(n, 3, 12, 12, generator=gen, dtype=torch.float64) * 0.4 + 0.3
    jitter = torch.cat([torch.rand(n, 3, generator=gen, dtype=torch.float64) * 0.6 + 0.7,
                        torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    gray = torch.rand(n, generator=gen) < 0.3
    got = _apply(colour_twist(jitter, order, gray, x.mean(dim=(2, 3))), x)
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    for b in range(n):
        ref = x[b]
        for op in order[b].tolist():
            if op in ops:
                ref = ops[op](ref, float(jitter[b, op]))
        if gray[b]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        assert float(ref.min()) > 0 and float(ref.max()) < 1  # no clamp was involved
        torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-9)


def test_identity_factors_give_the_identity_map() -> None:
    n = 4
    jitter = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n, dtype=torch.float64)
    order = torch.stack([torch.randperm(4) for _ in range(n)])
    maps = colour_twist(jitter, order, torch.zeros(n, dtype=torch.bool), torch.rand(n, 3, dtype=torch.float64))
    torch.testing.assert_close(maps[:, :, :3], torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    assert float(maps[:, :, 3].abs().max()) == 0.0


def test_hue_rotation_keeps_luma_and_moves_hsv_hue_like_torchvision() -> None:
    shift = torch.tensor([0.1, -0.1, 0.0, 0.25], dtype=torch.float64)
    h = hue_matrix(shift)
    yiq_luma = torch.tensor((0.299, 0.587, 0.114), dtype=torch.float64)
    torch.testing.assert_close(yiq_luma @ h, yiq_luma.expand(4, 3))  # Y row unchanged: luma kept exactly
    torch.testing.assert_close(h[2], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(h[0] @ h[1], torch.eye(3, dtype=torch.float64))  # +h then -h is the identity
    colours = [(0.8, 0.3, 0.3), (0.3, 0.7, 0.4), (0.3, 0.4, 0.8), (0.7, 0.6, 0.3)]
    for colour in colours:  # torchvision's adjust_hue(+0.1) turns the HSV hue by +0.1; ours by about that
        turned = np.clip(h[0].numpy() @ np.array(colour), 0, 1)
        moved = (colorsys.rgb_to_hsv(*turned)[0] - colorsys.rgb_to_hsv(*colour)[0] + 0.5) % 1 - 0.5
        assert 0.05 < moved < 0.16, (colour, moved)


def _photos(n: int = 40, size: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth random colour images (gradients + blobs), uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 0.8, (3, 3))
        img = np.stack([a[k] + 0.3 * np.sin(6 * b[k] * xx + 3 * c[k] * yy) for k in range(3)], axis=-1)
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def _params(n: int, size: int, *, flip: bool = False, sigma: float = 0.0,
            jitter: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0), gray: bool = False) -> ViewParams:
    return ViewParams(boxes=torch.tensor([[0.0, 0.0, size, size]] * n), flip=torch.tensor([flip] * n),
                      jitter=torch.tensor([jitter] * n), order=torch.tensor([[0, 1, 2, 3]] * n),
                      gray=torch.tensor([gray] * n), sigma=torch.tensor([sigma] * n))


def _normalised(u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 255
    return (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)


def test_view_of_the_whole_image_is_the_normalised_image_and_flips() -> None:
    images = _photos(8, 32)
    loader = CpuTwoViewLoader(images, 4, 32, MEAN, STD, None, seed=0)
    picks = [0, 1, 2, 3]
    view = loader.make_view(picks, _params(4, 32), ViewSpec())
    assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32
    assert view.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(view.double(), _normalised(images[picks]), rtol=0, atol=1e-5)
    flipped = loader.make_view(picks, _params(4, 32, flip=True), ViewSpec())
    torch.testing.assert_close(flipped.double(), _normalised(images[picks]).flip(-1), rtol=0, atol=1e-5)


def test_resize_of_a_crop_is_within_a_level_or_two_of_torchvision() -> None:
    """cv2 bilinear / area resize against torchvision's antialiased bilinear on smooth images
    (a crop one box off differs by 15-36 levels on average)."""
    images = _photos(4, 48)
    loader = CpuTwoViewLoader(images, 4, 32, MEAN, STD, None, seed=0)
    params = _params(4, 48)
    params.boxes = torch.tensor([[4.0, 6.0, 40.0, 36.0], [0.0, 0.0, 20.0, 24.0], [10.0, 2.0, 30.0, 30.0],
                                 [0.0, 0.0, 48.0, 48.0]])
    view = loader.make_view([0, 1, 2, 3], params, ViewSpec())
    for b, (i, j, h, w) in enumerate(params.boxes.long().tolist()):
        src = torch.from_numpy(images[b]).permute(2, 0, 1)
        ref = TF.resized_crop(src, i, j, h, w, [32, 32], antialias=True).unsqueeze(0).permute(0, 2, 3, 1).numpy()
        diff = (view[b : b + 1].double() - _normalised(ref)).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
        assert float(diff.mean()) < 0.5 and float(diff.max()) <= 2.01, (b, float(diff.mean()), float(diff.max()))


def test_blur_matches_torchvision_gaussian_blur() -> None:
    images = _photos(2, 32)
    loader = CpuTwoViewLoader(images, 2, 32, MEAN, STD, None, seed=0)
    spec = ViewSpec(blur_p=1.0, blur_kernel=5)
    view = loader.make_view([0, 1], _params(2, 32, sigma=1.3), spec)
    ref = TF.gaussian_blur(torch.from_numpy(images[:2]).permute(0, 3, 1, 2), [5, 5], [1.3, 1.3])
    diff = (view.double() - _normalised(ref.permute(0, 2, 3, 1).numpy())).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert float(diff.max()) <= 1.01  # uint8 rounding only


def test_colour_map_saturates_once_like_a_clamp() -> None:
    images = _photos(2, 16)
    loader = CpuTwoViewLoader(images, 2, 16, MEAN, STD, None, seed=0)
    spec = ViewSpec(jitter_p=1.0, brightness=0.5, grayscale_p=1.0)
    view = loader.make_view([0, 1], _params(2, 16, jitter=(1.5, 1.0, 1.0, 0.0), gray=True), spec)
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).double()
    luma = sum(w * x[:, c] for c, w in enumerate(GRAY_WEIGHTS)).unsqueeze(1).expand(-1, 3, -1, -1)
    ref = torch.round(torch.clamp(1.5 * luma, 0, 255)).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    diff = (view.double() - _normalised(ref)).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert float(diff.max()) <= 1.01
    assert bool((ref == 255).any())  # the test does reach the clamp


def test_batches_are_seeded_by_epoch_and_resume_exactly() -> None:
    images = _photos(40, 40)
    make = lambda: CpuTwoViewLoader(images, 8, 32, MEAN, STD, AugmentConfig(), seed=3)  # noqa: E731
    loader = make()
    assert len(loader) == 5
    loader.set_epoch(2)
    full = list(loader)
    again = make()
    again.set_epoch(2, start_batch=3)
    tail = list(again)
    assert len(tail) == 2
    for (q, k), (q2, k2) in zip(full[3:], tail, strict=True):
        assert torch.equal(q, q2) and torch.equal(k, k2)
    other = make()
    other.set_epoch(3)
    assert not torch.equal(next(iter(other))[0], full[0][0])  # a new epoch: new order and views
    q, k = full[0]
    assert q.shape == k.shape == (8, 3, 32, 32) and not torch.equal(q, k)


def test_views_over_threads_equal_views_on_one_thread() -> None:
    images = _photos(40, 40)
    batches = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        loader = CpuTwoViewLoader(images, 16, 32, MEAN, STD, AugmentConfig(), seed=1)
        loader.set_epoch(0)
        batches.append(next(iter(loader)))
    torch.set_num_threads(1)
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


@pytest.mark.parametrize(("images", "batch", "message"), [
    (np.zeros((4, 8, 8, 3), dtype=np.float32), 2, "uint8"),
    (np.zeros((4, 8, 8), dtype=np.uint8), 2, "uint8"),
    (np.zeros((4, 8, 8, 3), dtype=np.uint8), 5, "cannot fill one batch"),
])
def test_bad_inputs_are_refused_with_the_reason(images: np.ndarray, batch: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CpuTwoViewLoader(images, batch, 8, MEAN, STD, None, seed=0)
