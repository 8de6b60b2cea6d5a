"""Fast tests for influence_lib.models and influence_lib.data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from influence_lib.data import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    Dataset,
    DatasetUnavailableError,
    load_dataset,
)
from influence_lib.models import (
    ACTIVATIONS,
    MODELS,
    build_model,
    count_params,
    last_layer_params,
    linear_model,
    mlp,
    resnet_style,
    small_cnn,
    vgg_style,
)

HAVE_FASHION = (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")

# (name, in_shape, n_classes, kwargs) -- small configurations of every family.
CONFIGS = [
    ("linear", (4,), 3, {}),
    ("linear", (1, 8, 8), 10, {}),
    ("mlp", (4,), 3, {"depth": 2, "width": 8, "activation": "tanh"}),
    ("mlp", (1, 8, 8), 10, {"depth": 1, "width": 16, "activation": "softplus"}),
    ("small_cnn", (1, 28, 28), 10, {"depth": 1, "width": 4}),
    ("small_cnn", (3, 16, 16), 5, {"depth": 3, "width": 4, "activation": "gelu"}),
    ("vgg", (1, 16, 16), 10, {"width": 4, "stages": 2, "convs_per_stage": 1}),
    ("resnet", (3, 16, 16), 10, {"width": 4, "blocks": 2, "activation": "sigmoid"}),
]
IDS = [f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CONFIGS]


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name,in_shape,k,kwargs", CONFIGS, ids=IDS)
def test_shapes_no_buffers_and_last_layer(name, in_shape, k, kwargs):
    model = build_model(name, in_shape=in_shape, n_classes=k, seed=0, **kwargs)
    assert model(torch.randn(3, *in_shape)).shape == (3, k)
    assert list(model.buffers()) == []
    params = dict(model.named_parameters())
    last = last_layer_params(model)
    assert len(last) == 2 and all(n in params for n in last)
    assert params[last[0]].shape[0] == k and params[last[1]].shape == (k,)


@pytest.mark.parametrize("name,in_shape,k,kwargs", CONFIGS, ids=IDS)
def test_functional_call_vmap_per_sample_matches_batched(name, in_shape, k, kwargs):
    model = build_model(name, in_shape=in_shape, n_classes=k, seed=1, **kwargs)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(4, *in_shape)
    with torch.no_grad():
        batched = model(x)
    unbatched = vmap(lambda xi: functional_call(model, params, (xi,)))(x)
    singleton = vmap(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0))(x)
    torch.testing.assert_close(unbatched, batched)
    torch.testing.assert_close(singleton, batched)


def test_vmap_over_stacked_parameter_sets():
    models = [build_model("small_cnn", in_shape=(1, 12, 12), n_classes=3, seed=s) for s in range(3)]
    stacked, _ = stack_module_state(models)
    x = torch.randn(5, 1, 12, 12)
    out = vmap(lambda p: functional_call(models[0], p, (x,)))(stacked)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
    torch.testing.assert_close(out, expected)


def test_param_counts():
    assert count_params(linear_model(4, 3)) == 15
    assert count_params(mlp(4, 3, depth=2, width=8)) == (4 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    # depth=1, width=4 small CNN on 1x28x28: conv 40 + head (4*4*10 + 10) = 210
    assert count_params(build_model("small_cnn", in_shape=(1, 28, 28), n_classes=10, depth=1, width=4)) == 210
    assert count_params(build_model("small_cnn", in_shape=(1, 28, 28), n_classes=10)) < 2000
    assert count_params(build_model("linear", in_shape=(1, 28, 28), n_classes=10)) == 7850
    assert count_params(build_model("vgg", in_shape=(3, 32, 32), n_classes=10)) < 100_000
    assert count_params(build_model("resnet", in_shape=(1, 28, 28), n_classes=10)) < 20_000


@pytest.mark.parametrize("builder,args,kwargs", [
    (mlp, (4, 3), {"depth": 1, "width": 8}),
    (linear_model, (4, 3), {}),
    (small_cnn, (1, 10), {"image_size": 28}),
    (vgg_style, (3, 10), {"image_size": 16, "width": 4}),
    (resnet_style, (3, 10), {"image_size": 16, "width": 4}),
])
def test_seeded_init_deterministic_and_leaves_global_rng(builder, args, kwargs):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = builder(*args, seed=7, **kwargs)
    b = builder(*args, seed=7, **kwargs)
    c = builder(*args, seed=8, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    triples = zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True)
    for (na, pa), (nb, pb), (_, pc) in triples:
        assert na == nb and torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_dtype_and_activations():
    assert set(ACTIVATIONS) == {"relu", "tanh", "gelu", "sigmoid", "softplus"}
    model = build_model("mlp", in_shape=(4,), n_classes=2, depth=1, width=3, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("call,param", [
    (lambda: mlp(4, 3, depth=0, width=8), "depth"),
    (lambda: mlp(4, 3, depth=1, width=-2), "width"),
    (lambda: mlp(0, 3, depth=1, width=2), "in_dim"),
    (lambda: mlp(4, 3, depth=1, width=2, activation="swish"), "activation"),
    (lambda: linear_model(4, 3, seed=1.5), "seed"),
    (lambda: small_cnn(1, 10, image_size=28, depth=0), "depth"),
    (lambda: small_cnn(1, 0, image_size=28), "n_classes"),
    (lambda: vgg_style(1, 10, image_size=28, stages=0), "stages"),
    (lambda: vgg_style(1, 10, image_size=28, convs_per_stage=True), "convs_per_stage"),
    (lambda: resnet_style(1, 10, image_size=1), "image_size"),
    (lambda: resnet_style(1, 10, image_size=28, blocks=0), "blocks"),
    (lambda: build_model("transformer", in_shape=(4,), n_classes=2), "name"),
    (lambda: build_model("vgg", in_shape=(4,), n_classes=2), "in_shape"),
])
def test_bad_model_inputs(call, param):
    with pytest.raises(ValueError, match=param):
        call()


def test_unknown_model_lists_names():
    with pytest.raises(ValueError) as err:
        build_model("nope", in_shape=(4,), n_classes=2)
    assert all(n in str(err.value) for n in MODELS)


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def test_iris_split_standardisation_and_determinism():
    ds = load_dataset("iris", seed=0)
    assert isinstance(ds, Dataset) and not ds.is_substitute
    assert ds.X_train.shape == (120, 4) and ds.X_test.shape == (30, 4)
    assert ds.y_train.dtype == torch.int64 and ds.n_classes == 3 and ds.in_shape == (4,)
    assert torch.bincount(ds.y_train).tolist() == [40, 40, 40]
    assert torch.bincount(ds.y_test).tolist() == [10, 10, 10]
    assert ds.X_train.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(ds.X_train.std(0, unbiased=False), torch.ones(4))
    assert ds.X_test.mean(0).abs().max() > 1e-3  # test set uses train statistics
    assert "Iris" in ds.source

    again = load_dataset("iris", seed=0)
    assert torch.equal(ds.X_train, again.X_train) and torch.equal(ds.y_test, again.y_test)
    other = load_dataset("iris", seed=1)
    assert not torch.equal(ds.X_train, other.X_train)

    small = load_dataset("iris", n_train=10, n_test=5)
    assert len(small.y_train) == 10 and len(small.y_test) == 5
    assert load_dataset("iris", dtype=torch.float64).X_train.dtype == torch.float64
    assert ds.to(dtype=torch.float64).X_train.dtype == torch.float64
    assert ds.to(dtype=torch.float64).y_train.dtype == torch.int64


def test_mnist_small_shapes_and_ranges():
    ds = load_dataset("mnist-small", seed=0)
    assert ds.X_train.shape == (4000, 1, 28, 28) and ds.X_test.shape == (1000, 1, 28, 28)
    assert ds.in_shape == (1, 28, 28) and ds.n_classes == 10
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert abs(ds.X_train.mean().item()) < 1e-4 and abs(ds.X_train.std().item() - 1) < 1e-3
    # background pixels map to the single minimum value, well-bounded range
    lo, hi = ds.X_train.min().item(), ds.X_train.max().item()
    assert -1 < lo < 0 < 2 < hi < 6 and torch.isfinite(ds.X_test).all()
    assert ds.X_test.min().item() == pytest.approx(lo)
    # train and test are disjoint
    train_rows = {r.numpy().tobytes() for r in ds.X_train.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in ds.X_test.flatten(1))

    flat = load_dataset("mnist-small", seed=0, n_train=100, n_test=50, flatten=True)
    assert flat.X_train.shape == (100, 784) and flat.in_shape == (784,)
    assert not torch.equal(flat.y_train, load_dataset("mnist-small", seed=1, n_train=100).y_train)


@needs_fashion
def test_fashion_mnist_loads():
    ds = load_dataset("fashion-mnist", n_train=300, n_test=100, seed=3)
    assert ds.X_train.shape == (300, 1, 28, 28) and ds.X_test.shape == (100, 1, 28, 28)
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [30] * 10
    assert abs(ds.X_train.mean().item()) < 1e-4
    assert "dataset-fashion-mnist" in ds.source
    assert torch.equal(ds.X_test, load_dataset("fashion-mnist", n_train=300, n_test=100, seed=3).X_test)


def test_cifar10_unavailable_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset("cifar10", data_dir=str(missing), download=False)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value) and "download=True" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_dataset("imagenet-folder", data_dir=str(missing))


@needs_fashion
def test_cifar10_fallback_substitutes(tmp_path):
    with pytest.warns(UserWarning, match="substituted"):
        ds = load_dataset("cifar10", data_dir=str(tmp_path / "nope"), fallback="fashion-mnist",
                          n_train=50, n_test=20)
    assert ds.is_substitute and ds.requested == "cifar10" and ds.name == "fashion-mnist"
    assert "CIFAR-10" in ds.source and "Fashion-MNIST" in ds.source
    assert ds.X_train.shape == (50, 1, 28, 28)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "svhn"}, "name must be one of"),
    ({"name": "iris", "n_train": 0}, "n_train"),
    ({"name": "iris", "n_train": 500}, "n_train must be <= 120"),
    ({"name": "iris", "n_test": 200}, "n_test must be <= 149"),
    ({"name": "mnist-small", "n_train": 10_000}, "n_train must be <= 4000"),
    ({"name": "cifar10", "fallback": "svhn"}, "fallback"),
])
def test_bad_data_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(**kwargs)
    if kwargs["name"] == "svhn":
        assert all(n in str(err.value) for n in DATASETS)


def test_imagenet_style_folder_loads_and_feeds_a_noise_record(tmp_path):
    """An ImageNet-style folder (train/<class>/*.png, val/<class>/*.png) loads as a seeded, stratified sample
    and runs through the ground-truth chapter's record end to end."""
    from PIL import Image

    from influence_lib.experiments.noise import run_noise_setting

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for c, name in enumerate(("n01440764", "n01443537")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((20, 24, 3)) * 80 + 100 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    ds = load_dataset("imagenet-folder", data_dir=str(tmp_path), n_train=8, n_test=4, image_size=8,
                      dtype=torch.float64)
    assert ds.X_train.shape == (8, 3, 8, 8) and ds.X_test.shape == (4, 3, 8, 8) and ds.n_classes == 2
    assert sorted(ds.y_train.tolist()) == [0] * 4 + [1] * 4 and not ds.is_substitute
    again = load_dataset("imagenet-folder", data_dir=str(tmp_path), n_train=8, n_test=4, image_size=8,
                         dtype=torch.float64)
    assert torch.equal(ds.X_train, again.X_train)
    rec = run_noise_setting({"dataset": "imagenet-folder", "data_dir": str(tmp_path), "image_size": 8,
                             "n_train": 8, "n_test": 4, "model": "small_cnn", "depth": 1, "width": 2,
                             "steps": 20, "method": "exact", "k": 2, "params": "last",
                             "runs": [{"steps": 5, "batch_size": None, "seed": 0},
                                      {"steps": 5, "batch_size": 4, "seed": 1}]})
    assert rec["dataset"]["name"] == "imagenet-folder" and len(rec["runs"]) == 2
