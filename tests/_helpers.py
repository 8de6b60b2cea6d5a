"""Small float64 models and data shared by the tests."""

import torch
from torch import nn


def make_mlp(in_dim=3, width=4, out_dim=3, depth=1, seed=0, act=nn.Tanh):
    g = torch.Generator().manual_seed(seed)
    layers, d = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.8)
    return model


def make_classification(n=40, d=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64) * 1.5
    y = torch.arange(n) % classes
    X = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, y
