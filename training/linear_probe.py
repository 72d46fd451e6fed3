"""Linear probe on frozen, pre-extracted features: the standard linear evaluation protocol."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def train_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    *, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-6, seed: int = 0,
) -> dict[str, float]:
    """Fit a linear classifier on standardised features; returns train and val top-1 in [0, 1].

    train_x: [N, D] float, train_y: [N] (labels >= 0); val_x: [M, D], val_y: [M].
    Features are standardised with the train statistics; Adam with a cosine schedule.
    """
    keep_t, keep_v = train_y >= 0, val_y >= 0
    train_x, train_y, val_x, val_y = train_x[keep_t], train_y[keep_t], val_x[keep_v], val_y[keep_v]
    if train_x.shape[0] == 0 or val_x.shape[0] == 0:
        raise ValueError("the linear probe needs labelled images in both the train and the val split")
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)  # [1, D]
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(max(train_y.max().item(), val_y.max().item())) + 1
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the initial weights from ``seed`` too, not from the global RNG
        torch.manual_seed(seed)
        layer = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train_x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(train_x.shape[0], generator=g).to(train_x.device)
        for i in range(0, train_x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(layer(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        train_acc = (layer(train_x).argmax(1) == train_y).float().mean().item()
        val_acc = (layer(val_x).argmax(1) == val_y).float().mean().item()
    return {"train_top1": float(train_acc), "val_top1": float(val_acc)}
