"""Small, buffer-free model families used in the influence-function experiments.

Every model returned here is a plain :class:`torch.nn.Module` without batch-norm,
dropout or registered buffers, so its output is a pure function of its
parameters.  That lets callers use :func:`torch.func.functional_call` together
with :func:`torch.func.vmap`, both over per-sample inputs and over stacked
parameter sets.

Shape conventions
-----------------
* Tabular models (``linear``, ``mlp``) map ``[n, d] -> [n, out_dim]``.  When
  built through :func:`build_model` with an image ``in_shape`` ``(C, H, W)``
  they start with ``nn.Flatten(start_dim=-3)`` and map ``[n, C, H, W] -> [n, k]``.
* Convolutional models map ``[n, C, H, W] -> [n, n_classes]``.
* All flattening/pooling acts on the *trailing* dimensions, so every model also
  accepts a single unbatched sample (``[d]`` or ``[C, H, W]`` -> ``[k]``).  This
  is what :func:`torch.func.vmap` over single inputs sees.

Initialisation
--------------
With ``seed=None`` PyTorch's default initialisation (global RNG) is used.  With
an integer ``seed`` every ``Linear``/``Conv2d`` weight and bias is drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (the same distribution as PyTorch's
default) using a private :class:`torch.Generator`; the global RNG state is left
untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "mlp",
    "linear_model",
    "small_cnn",
    "vgg_style",
    "resnet_style",
    "build_model",
    "count_params",
    "last_layer_params",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}

MODELS: tuple[str, ...] = ("linear", "mlp", "small_cnn", "vgg", "resnet")

# Spatial pooling stops once the feature map is this small (or smaller).
_MIN_POOL_SIZE = 4


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_activation(activation: str) -> type[nn.Module]:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )
    return ACTIVATIONS[activation]


def _check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be None or an integer, got {seed!r}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _finalise(model: nn.Module, seed: int | None, dtype: torch.dtype) -> nn.Module:
    """Seeded re-initialisation (if requested), dtype cast and buffer check."""
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    module.weight.uniform_(-bound, bound, generator=gen)
                    if module.bias is not None:
                        module.bias.uniform_(-bound, bound, generator=gen)
    model = model.to(dtype=dtype)
    assert not list(model.buffers()), "models must not register buffers"
    return model


def _build(seed: int | None, dtype: torch.dtype, factory) -> nn.Module:
    """Call ``factory()`` without consuming the global RNG when ``seed`` is given."""
    _check_seed(seed)
    _check_dtype(dtype)
    if seed is None:
        return _finalise(factory(), None, dtype)
    with torch.random.fork_rng(devices=[]):
        model = factory()
    return _finalise(model, seed, dtype)


def _pooled_size(size: int) -> int:
    return size // 2 if size > _MIN_POOL_SIZE else size


# --------------------------------------------------------------------------- #
# tabular models
# --------------------------------------------------------------------------- #
def linear_model(
    in_dim: int,
    out_dim: int,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Linear:
    """A single affine layer ``[n, in_dim] -> [n, out_dim]``.

    Used for logistic/softmax regression (cross-entropy loss) or ridge
    regression (squared loss).
    """
    _check_int("in_dim", in_dim)
    _check_int("out_dim", out_dim)
    return _build(seed, dtype, lambda: nn.Linear(in_dim, out_dim))


def mlp(
    in_dim: int,
    out_dim: int,
    *,
    depth: int,
    width: int,
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Fully connected network ``[n, in_dim] -> [n, out_dim]``.

    ``depth`` hidden layers, each ``Linear(width)`` followed by the activation,
    then a final ``Linear(width, out_dim)``.
    """
    _check_int("in_dim", in_dim)
    _check_int("out_dim", out_dim)
    _check_int("depth", depth)
    _check_int("width", width)
    act = _check_activation(activation)

    def factory() -> nn.Sequential:
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, out_dim))
        return nn.Sequential(*layers)

    return _build(seed, dtype, factory)


# --------------------------------------------------------------------------- #
# convolutional models
# --------------------------------------------------------------------------- #
def small_cnn(
    in_channels: int,
    n_classes: int,
    *,
    image_size: int,
    depth: int = 2,
    width: int = 8,
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Tiny CNN ``[n, in_channels, S, S] -> [n, n_classes]`` for exact Hessians.

    ``depth`` blocks of ``Conv2d(3x3, padding=1) -> activation -> AvgPool2d(2)``
    with a constant ``width`` channels; the 2x2 pooling is only applied while
    the feature map is larger than 4x4.  The head average-pools the feature
    map to a 2x2 grid, flattens (``4 * width`` features) and applies a Linear
    classifier.  Parameter count:
    ``9*in_channels*width + width + (depth-1)*(9*width**2 + width)
    + (4*width + 1)*n_classes`` (e.g. 210 for depth=1, width=4 on 1x28x28
    with 10 classes).
    """
    _check_int("in_channels", in_channels)
    _check_int("n_classes", n_classes)
    _check_int("image_size", image_size, 2)
    _check_int("depth", depth)
    _check_int("width", width)
    act = _check_activation(activation)

    def factory() -> nn.Sequential:
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), act()]
            if s > _MIN_POOL_SIZE:
                layers.append(nn.AvgPool2d(2))
                s //= 2
            c = width
        layers += [
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(start_dim=-3),
            nn.Linear(4 * c, n_classes),
        ]
        return nn.Sequential(*layers)

    return _build(seed, dtype, factory)


def vgg_style(
    in_channels: int,
    n_classes: int,
    *,
    image_size: int,
    width: int = 16,
    stages: int = 3,
    convs_per_stage: int = 2,
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """VGG-like CNN ``[n, in_channels, S, S] -> [n, n_classes]``.

    Stage ``i`` (0-based) has ``convs_per_stage`` 3x3 convolutions with
    ``width * 2**i`` channels, each followed by the activation, then a 2x2
    average pool (skipped once the map is <= 4x4).  Head: global average pool
    and ``Linear(width * 2**(stages-1), n_classes)``.
    """
    _check_int("in_channels", in_channels)
    _check_int("n_classes", n_classes)
    _check_int("image_size", image_size, 2)
    _check_int("width", width)
    _check_int("stages", stages)
    _check_int("convs_per_stage", convs_per_stage)
    act = _check_activation(activation)

    def factory() -> nn.Sequential:
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for i in range(stages):
            out = width * 2**i
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c, out, 3, padding=1), act()]
                c = out
            if s > _MIN_POOL_SIZE:
                layers.append(nn.AvgPool2d(2))
                s //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(start_dim=-3), nn.Linear(c, n_classes)]
        return nn.Sequential(*layers)

    return _build(seed, dtype, factory)


class _ResidualBlock(nn.Module):
    """``x + scale * conv2(act(conv1(act(x))))`` with shape ``[.., C, H, W]`` kept.

    ``scale`` is a plain Python float (not a parameter or buffer); scaling the
    residual branch down keeps activations bounded without normalisation.
    """

    def __init__(self, channels: int, act: type[nn.Module], scale: float) -> None:
        super().__init__()
        self.act1 = act()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = act()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.conv2(self.act2(self.conv1(self.act1(x))))


def resnet_style(
    in_channels: int,
    n_classes: int,
    *,
    image_size: int,
    width: int = 16,
    blocks: int = 3,
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Normalisation-free residual CNN ``[n, in_channels, S, S] -> [n, n_classes]``.

    Stem ``Conv2d(in_channels, width, 3x3)``, then ``blocks`` stages of one
    :class:`_ResidualBlock` each (constant ``width`` channels, residual branch
    scaled by ``1/sqrt(blocks)``), with a 2x2 average pool between stages while
    the map is larger than 4x4.  Head: activation, global average pool,
    ``Linear(width, n_classes)``.
    """
    _check_int("in_channels", in_channels)
    _check_int("n_classes", n_classes)
    _check_int("image_size", image_size, 2)
    _check_int("width", width)
    _check_int("blocks", blocks)
    act = _check_activation(activation)
    scale = 1.0 / math.sqrt(blocks)

    def factory() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
        s = image_size
        for i in range(blocks):
            if i > 0 and s > _MIN_POOL_SIZE:
                layers.append(nn.AvgPool2d(2))
                s //= 2
            layers.append(_ResidualBlock(width, act, scale))
        layers += [
            act(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(start_dim=-3),
            nn.Linear(width, n_classes),
        ]
        return nn.Sequential(*layers)

    return _build(seed, dtype, factory)


# --------------------------------------------------------------------------- #
# registry and utilities
# --------------------------------------------------------------------------- #
def build_model(
    name: str, *, in_shape: tuple[int, ...], n_classes: int, **kwargs
) -> nn.Module:
    """Build a model by registry name (one of :data:`MODELS`).

    ``in_shape`` is the shape of one input without the batch dimension:
    ``(d,)`` for tabular data or ``(C, H, W)`` for images.  "linear" and "mlp"
    accept either (an image shape is flattened by a leading
    ``nn.Flatten(start_dim=-len(in_shape))``); "small_cnn", "vgg" and "resnet"
    need a square ``(C, S, S)`` shape.  ``kwargs`` go to the model builder.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {list(MODELS)}, got {name!r}")
    in_shape = tuple(in_shape)
    if not in_shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in in_shape):
        raise ValueError(f"in_shape must be a non-empty tuple of positive integers, got {in_shape!r}")

    if name in ("linear", "mlp"):
        in_dim = math.prod(in_shape)
        builder = linear_model if name == "linear" else mlp
        model = builder(in_dim, n_classes, **kwargs)
        if len(in_shape) == 1:
            return model
        flat = nn.Sequential(nn.Flatten(start_dim=-len(in_shape)))
        if isinstance(model, nn.Sequential):
            flat.extend(model)
        else:
            flat.append(model)
        return flat

    if len(in_shape) != 3 or in_shape[1] != in_shape[2]:
        raise ValueError(f"in_shape must be (C, S, S) for model {name!r}, got {in_shape!r}")
    builder = {"small_cnn": small_cnn, "vgg": vgg_style, "resnet": resnet_style}[name]
    return builder(in_shape[0], n_classes, image_size=in_shape[1], **kwargs)


def count_params(model: nn.Module) -> int:
    """Total number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def last_layer_params(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the final ``nn.Linear``'s parameters."""
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (mod_name, module)
    if last is None:
        raise ValueError("model has no nn.Linear layer")
    prefix = f"{last[0]}." if last[0] else ""
    return [prefix + p for p, _ in last[1].named_parameters()]
