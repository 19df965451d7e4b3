"""The model registry, checkpoints and the shipped MNIST CNN (:mod:`invariance._models`, :mod:`invariance._zoo`).

Known answers:

* a model registered with :func:`invariance.register_model` is built by ``load_model(name)`` (a
  fresh instance each time, in eval mode), listed by :func:`invariance.builtin_models` after the
  built-ins and by the ``invariance models`` / ``layers`` commands; a ``"module:name"`` factory is
  imported only when built. Every test starts from, and leaves, the registry as it was (the
  autouse fixture ``registry``; ``test_registrations_never_leak_between_tests`` checks it);
* a checkpoint round-trips its weights, config and extras, and its checksum is
  :func:`invariance.tensor_checksum` of everything else; a registered builder (or a built-in one,
  under its old name too) rebuilds the same network;
* :func:`invariance.tensor_checksum` depends on every tensor's path, dtype, shape and bytes (a
  one-element change is seen; zeros of two dtypes with the same bytes differ) and on nothing
  else; :func:`invariance.non_finite_weight` names the first floating tensor holding NaN or inf;
* the paper's CNN: layer names and shapes follow :data:`invariance.MNIST_CNN_BLOCKS` (``same``
  padding, two 2x2 poolings: ``size / 4`` per side before ``fc``); the shipped weights were stored
  in float16 (so each weight is float16-representable) and classify the shipped digits.

Exact equality throughout except the accuracy bound (derived in its docstring).
"""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import invariance
from invariance import (
    BUILTIN_BUILDERS,
    CHECKPOINT_FORMAT,
    MNIST_CNN_BLOCKS,
    PRETRAINED_PATH,
    CheckpointError,
    ModelInfo,
    _models,
    build_from_checkpoint,
    builtin_models,
    load_checkpoint,
    load_digits,
    load_model,
    mnist_block,
    mnist_cnn,
    non_finite_weight,
    pretrained_mnist_cnn,
    random_mnist_cnn,
    register_builder,
    register_model,
    registered_builders,
    save_checkpoint,
    tensor_checksum,
)
from invariance._cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN_NAMES = ["toy-wm", "toy-scale", "toy-scale-channels", "toy-isotropic", "toy-p4", "toy-c8", "toy-circular",
                 "mnist-cnn", "mnist-cnn-random"]


@pytest.fixture(autouse=True)
def registry():
    """Every test starts with empty user registries (models and builders: registrations made
    elsewhere in the session, e.g. by the modules' doctests, do not count) and the registries are
    restored afterwards: registering is a module-level side effect that must not leak."""
    models, builders = dict(_models._REGISTRY), dict(_models._USER_BUILDERS)
    _models._REGISTRY.clear()
    _models._USER_BUILDERS.clear()
    yield
    _models._REGISTRY.clear()
    _models._REGISTRY.update(models)
    _models._USER_BUILDERS.clear()
    _models._USER_BUILDERS.update(builders)


def small_net() -> nn.Module:
    """A one-conv network with fixed weights, in training mode (as a factory returns it)."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(18, dtype=torch.float32).reshape(2, 1, 3, 3) / 18)
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
    return net.train()


# ----------------------------------------------------------------------------- register_model


def test_a_registered_model_is_built_by_load_model_in_eval_mode():
    calls = []

    def factory():
        calls.append(1)
        return small_net()

    register_model("tests-net", ModelInfo(factory, "a one-conv test network"))
    a, b = load_model("tests-net"), load_model("tests-net")
    assert len(calls) == 2 and a is not b  # a fresh instance per call
    assert isinstance(a, nn.Sequential) and not a.training and not a[0].training
    assert torch.equal(a[0].weight, small_net()[0].weight)


def test_a_registered_model_is_listed_after_the_builtins():
    """``builtin_models()`` is the built-in table, then the registered models, in order; the entry
    is the object registered (a second registration under the same name replaces it)."""
    first = ModelInfo(small_net, "first", default_images="blobs", default_layers="0")
    register_model("tests-b", first)
    register_model("tests-a", ModelInfo(small_net, "second"))
    models = builtin_models()
    assert list(models) == [*BUILTIN_NAMES, "tests-b", "tests-a"]
    assert models["tests-b"] is first
    again = ModelInfo(small_net, "replaced")
    register_model("tests-b", again)
    assert builtin_models()["tests-b"] is again and list(builtin_models())[-2:] == ["tests-b", "tests-a"]


def test_the_models_command_lists_a_registered_model(capsys):
    """``invariance models``: one line per model, ``NAME (20 wide) DESCRIPTION  [images: IMAGES]``."""
    register_model("tests-net", ModelInfo(small_net, "a one-conv test network", default_images="blobs"))
    assert cli(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(BUILTIN_NAMES) + 1
    assert lines[-1] == f"{'tests-net':20s} a one-conv test network  [images: blobs]"
    assert [line.split()[0] for line in lines] == [*BUILTIN_NAMES, "tests-net"]


def test_the_layers_command_knows_a_registered_model(capsys):
    """``invariance layers --model NAME`` builds the registered model and probes it with its default
    images (the shipped 28 x 28 digits): the conv's map is 2 x 28 x 28 at stride 1 (``padding=1``),
    its frame traced."""
    register_model("tests-net", ModelInfo(small_net, "a one-conv test network"))
    assert cli(["layers", "--model", "tests-net"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:-1]]
    # a 3x3 conv (receptive-field radius 1): 26 x 26 positions see only the image
    assert rows == [["0", "(2,", "28,", "28)", "(1.0,", "1.0)", "(0.0,", "0.0)", "676", "traced"]]


@pytest.mark.parametrize("probe", [0, 1])
def test_registrations_never_leak_between_tests(probe):
    """Whichever of the two runs second finds the registries as they were before the first."""
    assert "tests-leak-probe" not in builtin_models()
    assert "tests:leak-probe" not in registered_builders()
    register_model("tests-leak-probe", ModelInfo(small_net, f"probe {probe}"))
    register_builder("tests:leak-probe", small_net)
    assert "tests-leak-probe" in builtin_models() and "tests:leak-probe" in registered_builders()


def test_a_string_factory_is_imported_only_when_the_model_is_built():
    """``ModelInfo("module:name")`` keeps the registry free of imports: a module that does not exist
    is registered and listed, and fails (one line naming the module) only when built."""
    register_model("tests-missing", ModelInfo("tests_no_such_module_xyz:Net", "not importable"))
    assert "tests-missing" in builtin_models()
    with pytest.raises(ValueError, match=r"^model: cannot import module 'tests_no_such_module_xyz'"):
        load_model("tests-missing")
    register_model("tests-identity", ModelInfo("torch.nn:Identity", "identity"))
    assert type(load_model("tests-identity")) is nn.Identity


def test_register_model_refuses_anything_but_a_model_info():
    with pytest.raises(TypeError, match="^info: expected a ModelInfo, got function"):
        register_model("tests-net", small_net)
    assert "tests-net" not in builtin_models()


def test_every_builtin_model_builds_its_named_class():
    """The table's ``invariance.toys:CLASS`` factories build that class; the MNIST entries the
    paper's CNN (an ``nn.Sequential`` with ``fc`` last); every model comes back in eval mode."""
    for name, info in builtin_models().items():
        model = load_model(name)
        assert isinstance(model, nn.Module) and not model.training, name
        if isinstance(info.factory, str) and info.factory.startswith("invariance.toys:"):
            assert type(model).__name__ == info.factory.rpartition(":")[2]
        else:
            assert isinstance(model, nn.Sequential) and list(dict(model.named_children()))[-1] == "fc"


# ----------------------------------------------------------------------------- builders


def test_a_registered_builder_is_listed_after_the_builtin_ones_and_rebuilds_its_checkpoint(tmp_path):
    """``registered_builders()`` = the package's builders, then the registered ones. A checkpoint
    naming a registered builder is rebuilt by calling it with the checkpoint's config."""
    seen = []

    def builder(**config):
        seen.append(config)
        return nn.Conv2d(**config)

    register_builder("tests:conv", builder)
    assert registered_builders() == [*BUILTIN_BUILDERS, "tests:conv"]
    config = {"in_channels": 1, "out_channels": 3, "kernel_size": 3}
    net = nn.Conv2d(**config)
    path = save_checkpoint(tmp_path / "conv.pt", net, "tests:conv", config)
    rebuilt = build_from_checkpoint(path)
    assert seen[-1] == config
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(rebuilt.weight, net.weight) and torch.equal(rebuilt(x), net(x))


@pytest.mark.parametrize("name, builder, match", [
    ("", lambda: None, "^name: expected a non-empty string"),
    (3, lambda: None, "^name: expected a non-empty string"),
    ("tests:x", "not callable", "^builder: expected a callable"),
])
def test_register_builder_refuses_bad_arguments(name, builder, match):
    before = registered_builders()
    with pytest.raises(TypeError, match=match):
        register_builder(name, builder)
    assert registered_builders() == before


@pytest.mark.parametrize("builder", ["invariance:mnist_cnn", "invariance.zoo:mnist_cnn"])
def test_the_builtin_cnn_builder_rebuilds_under_its_current_and_its_old_name(tmp_path, builder):
    """Checkpoints written before the implementation modules became private name
    ``invariance.zoo:mnist_cnn`` (the shipped one does): both names rebuild the same network."""
    torch.manual_seed(0)
    net = mnist_cnn(c1=4, c2=3, n_classes=5).eval()
    path = save_checkpoint(tmp_path / "cnn.pt", net, builder, {"c1": 4, "c2": 3, "n_classes": 5})
    rebuilt = build_from_checkpoint(path).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


# ----------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_round_trips_weights_config_and_extras(tmp_path):
    """What ``save_checkpoint`` writes is what ``load_checkpoint`` returns: the format, the builder,
    the config, the weights (bit for bit), the extras, and ``checksum = tensor_checksum(the rest)``."""
    net = small_net()
    extras = {"epoch": 3, "metrics": {"error": 0.25, "history": [1.0, 0.5]}, "optimizer": {"lr": torch.tensor(0.1)}}
    path = save_checkpoint(tmp_path / "sub" / "ck.pt", net, "tests:net", {"width": 2}, **extras)
    assert path == tmp_path / "sub" / "ck.pt" and path.is_file()
    ck = load_checkpoint(path)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["builder"] == "tests:net" and ck["config"] == {"width": 2}
    assert ck["epoch"] == 3 and ck["metrics"] == extras["metrics"] and torch.equal(ck["optimizer"]["lr"],
                                                                                     torch.tensor(0.1))
    assert list(ck["state_dict"]) == list(net.state_dict())
    assert all(torch.equal(ck["state_dict"][k], v) for k, v in net.state_dict().items())
    rest = {k: v for k, v in ck.items() if k != "checksum"}
    assert ck["checksum"] == tensor_checksum(rest)


def test_the_shipped_checkpoint_loads_with_a_builtin_builder():
    """The shipped file names the CNN's builder by its old name, a built-in one: it loads without
    trust (it was written before checksums existed; such files load without the check)."""
    with resources.as_file(PRETRAINED_PATH) as p:
        ck = load_checkpoint(p)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["builder"] in BUILTIN_BUILDERS and ck["config"] == {}


def test_a_checkpoint_whose_weights_were_recast_after_saving_is_refused(tmp_path):
    """The checksum covers dtypes: weights cast to float16 and written back without a new checksum
    (what a script storing half-precision weights after ``save_checkpoint`` does) are refused; with
    the checksum recomputed they load."""
    path = save_checkpoint(tmp_path / "ck.pt", small_net(), "tests:net", {})
    ck = torch.load(path, weights_only=True)
    ck["state_dict"] = {k: v.half() for k, v in ck["state_dict"].items()}
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(path)
    ck.pop("checksum")
    ck["checksum"] = tensor_checksum(ck)
    torch.save(ck, path)
    assert load_checkpoint(path)["state_dict"]["0.weight"].dtype == torch.float16


def write_raw(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("obj, match", [
    ({"builder": "b", "config": {}, "state_dict": {}}, "not an invariance-checkpoint/1 checkpoint"),
    ([1, 2, 3], "not an invariance-checkpoint/1 checkpoint"),
    ({"format": CHECKPOINT_FORMAT, "builder": "b", "state_dict": {}}, "lacks the key 'config'"),
    ({"format": CHECKPOINT_FORMAT, "builder": "b", "config": {}, "state_dict": [torch.zeros(2)]},
     "state_dict is a list"),
])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_checkpoint_error(tmp_path, obj, match):
    path = write_raw(tmp_path / "x.pt", obj)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_a_missing_checkpoint_and_a_path_of_the_wrong_type(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(TypeError, match="^path: expected a checkpoint file path, got int"):
        load_checkpoint(3)


def test_rebuilding_fails_with_one_line_when_the_builder_or_the_weights_do_not_fit(tmp_path):
    register_builder("tests:conv", lambda **cfg: nn.Conv2d(**cfg))
    net = nn.Conv2d(1, 3, 3)
    wrong_shape = save_checkpoint(tmp_path / "a.pt", net, "tests:conv",
                                  {"in_channels": 1, "out_channels": 4, "kernel_size": 3})
    with pytest.raises(CheckpointError, match="weights do not fit the model") as info:
        build_from_checkpoint(wrong_shape)
    assert "\n" not in str(info.value)
    bad_config = save_checkpoint(tmp_path / "b.pt", net, "tests:conv", {"in_channels": 1, "colour": "red"})
    with pytest.raises(CheckpointError, match=r"rebuilding the model with tests:conv failed: TypeError"):
        build_from_checkpoint(bad_config)


# ----------------------------------------------------------------------------- checksum and finite weights


@settings(max_examples=25)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16), data=st.data())
def test_the_checksum_sees_a_change_of_any_one_element(shape, seed, data):
    """Equal content gives equal checksums; changing one element (by a power of two, exact in
    float32) changes it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    state = {"layer.weight": w, "layer.bias": torch.zeros(2)}
    assert tensor_checksum(state) == tensor_checksum({"layer.weight": w.clone(), "layer.bias": torch.zeros(2)})
    i = data.draw(st.integers(0, w.numel() - 1))
    changed = w.clone().reshape(-1)
    changed[i] += 0.5
    assert tensor_checksum({"layer.weight": changed.reshape(shape), "layer.bias": torch.zeros(2)}) \
        != tensor_checksum(state)


def test_the_checksum_covers_path_dtype_and_shape_and_nothing_else():
    """Zeros of int32 and float32 have the same bytes, zeros (2, 3) and (3, 2) too: the checksum
    still tells them apart (dtype and shape are hashed). A renamed key moves the tensor's path.
    Non-tensor values are not covered (documented); a non-contiguous view hashes as its values."""
    base = tensor_checksum({"w": torch.zeros(2, 3)})
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    assert tensor_checksum({"w": torch.zeros(2, 3, dtype=torch.int32)}) != base
    assert tensor_checksum({"w": torch.zeros(3, 2)}) != base
    assert tensor_checksum({"v": torch.zeros(2, 3)}) != base
    assert tensor_checksum({"w": torch.zeros(2, 3), "lr": 0.1}) == tensor_checksum({"w": torch.zeros(2, 3), "lr": 0.2})
    t = torch.arange(6.0).reshape(2, 3)
    assert tensor_checksum([t.T]) == tensor_checksum([t.T.contiguous()])
    assert tensor_checksum([t, (t,)]) == tensor_checksum([t.clone(), (t.clone(),)]) != tensor_checksum([t, [t + 1]])


def test_non_finite_weight_names_the_first_nan_or_inf():
    ok = torch.ones(3)
    assert non_finite_weight({"a": ok, "b": torch.zeros(2, dtype=torch.int64)}) is None
    assert non_finite_weight({"a": ok, "b": torch.tensor([1.0, math.nan]), "c": torch.tensor([math.inf])}) == "b"
    assert non_finite_weight({"a": ok, "c": torch.tensor([-math.inf], dtype=torch.float16)}) == "c"
    assert non_finite_weight({"z": torch.tensor([complex(1, math.inf)])}) == "z"
    assert non_finite_weight({"step": 3, "lr": math.nan, "w": ok}) is None  # only tensors are weights
    assert non_finite_weight({}) is None


# ----------------------------------------------------------------------------- the paper's CNN


def test_the_mnist_cnn_follows_its_block_table():
    """``MNIST_CNN_BLOCKS = ((64, 9), (64, 7))``: conv 9x9 and 7x7, ``same`` padding ``k // 2``; two
    2x2 poolings leave ``28 / 4 = 7`` per side, so ``fc`` takes ``64 * 7 * 7`` features."""
    assert MNIST_CNN_BLOCKS == ((64, 9), (64, 7))
    net = mnist_cnn()
    names = [n for n, _ in net.named_children()]
    assert names == ["conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "flatten", "fc"]
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size, net.conv1.padding) == \
        (1, 64, (9, 9), (4, 4))
    assert (net.conv2.in_channels, net.conv2.out_channels, net.conv2.kernel_size, net.conv2.padding) == \
        (64, 64, (7, 7), (3, 3))
    assert (net.fc.in_features, net.fc.out_features) == (64 * 7 * 7, 10)


def test_the_mnist_cnn_takes_widths_classes_and_size():
    """``c1 = 4, c2 = 3``, 5 classes on 32 x 32 images: ``fc`` takes ``3 * 8 * 8``; the maps keep their
    size through each conv (``same``) and halve at each pool."""
    net = mnist_cnn(c1=4, c2=3, n_classes=5, size=32)
    assert (net.fc.in_features, net.fc.out_features) == (3 * 8 * 8, 5)
    x = torch.rand(2, 1, 32, 32)
    shapes = []
    for m in net:
        x = m(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(4, 32, 32), (4, 16, 16), (4, 16, 16), (3, 16, 16), (3, 8, 8), (3, 8, 8), (192,), (5,)]


@pytest.mark.parametrize("kernel", [3, 7, 9])
def test_an_mnist_block_keeps_the_size_then_halves_it(kernel):
    conv, pool, relu = mnist_block(2, 5, kernel)
    assert (conv.padding, conv.kernel_size) == ((kernel // 2,) * 2, (kernel,) * 2)
    assert isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU)
    assert nn.Sequential(conv, pool, relu)(torch.rand(1, 2, 12, 12)).shape == (1, 5, 6, 6)


def test_random_mnist_cnn_is_the_cnn_drawn_from_its_seed_and_leaves_the_global_rng_alone():
    """``random_mnist_cnn(seed)`` = ``mnist_cnn()`` built right after ``torch.manual_seed(seed)``, in a
    forked RNG: the global RNG state is the same before and after."""
    state = torch.get_rng_state()
    a, b, c = random_mnist_cnn(3), random_mnist_cnn(3), random_mnist_cnn(4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    want = mnist_cnn()
    torch.set_rng_state(state)
    for k, v in want.state_dict().items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b.state_dict()[k], v)
    assert not torch.equal(c.conv1.weight, a.conv1.weight)


def test_the_pretrained_cnn_has_float16_weights_and_classifies_the_shipped_digits():
    """The shipped weights were stored in float16 (scripts/train_demo_cnn.py) and cast back: every
    weight is float16-representable. The digits were never seen in training; the checkpoint records
    the test error ``e`` on rotated digits (angles in [-90, 90]); upright digits are no harder, so on
    the 500 shipped digits the accuracy is at least ``1 - e - 4 sigma`` with ``sigma = sqrt(e (1 - e) /
    500)`` the binomial standard error (``e = 0.074``: 0.879; chance is 0.1)."""
    net = pretrained_mnist_cnn()
    assert not net.training
    shapes = {k: v.shape for k, v in mnist_cnn().state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
    assert all(torch.equal(v, v.half().float()) for v in net.state_dict().values())
    with resources.as_file(PRETRAINED_PATH) as p:
        e = float(load_checkpoint(p)["test_error"])
    images, labels = load_digits()
    with torch.no_grad():
        accuracy = float((net(images[:, None].float() / 255).argmax(1) == labels).double().mean())
    assert accuracy >= 1 - e - 4 * math.sqrt(e * (1 - e) / len(labels)), (accuracy, e)


def test_load_digits_gives_50_uint8_digits_per_class_each_call_a_fresh_copy():
    images, labels = load_digits()
    assert images.shape == (500, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (500,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [50] * 10
    assert int(images.max()) > 0 and int(images.min()) == 0
    images[:] = 0
    assert int(load_digits()[0].max()) > 0  # the caller's copy, not the package's


def test_the_models_api_is_public():
    from invariance import _zoo

    for module in (_models, _zoo):
        for name in module.__all__:
            assert getattr(invariance, name) is getattr(module, name)
