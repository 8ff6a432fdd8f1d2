"""Model zoo: shapes, feature taps, rebuild from config, errors, export-friendliness, real pretrained weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from edgekd.errors import EdgekdError
from edgekd.models import MODELS, check_input_size, create_model, get_model_info, list_models
from edgekd.models.layers import InvertedResidual
from edgekd.models.pretrained import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, weights_path

EXPECTED = {
    *(f"mobilenetv2_{w}" for w in ("035", "050", "075", "100")),
    *(f"mobilenetv3_small_{w}" for w in ("035", "050", "075", "100")),
    *(f"mobilenetv3_large_{w}" for w in ("035", "050", "075", "100")),
    "efficientnet_b0", "efficientnet_lite0", "mcunet_tiny", "resnet18", "resnet34", "resnet50",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny 32-224 px batches gain nothing from intra-op threads, and on a busy 2-core box OpenMP barriers
    # made this module 25x slower (71 s vs 2.7 s of forwards). The default is restored for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spatial(size: int, reduction: int) -> int:
    # every stride-2 layer in the zoo maps h -> ceil(h / 2)
    for _ in range(int(math.log2(reduction))):
        size = (size + 1) // 2
    return size


def check_model(name: str, size: int, **options) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_size=size, **options).eval()
    assert model.num_classes == 10
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    for info in model.feature_info:
        assert info.module in modules, f"{name}: feature tap {info.module} is not a module"
        modules[info.module].register_forward_hook(lambda m, i, o, key=info.module: captured.__setitem__(key, o))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), logits)
    assert logits.shape == (2, 10)
    for info in model.feature_info:
        h = spatial(size, info.reduction)
        assert captured[info.module].shape == (2, info.channels, h, h), (name, info)
    assert features.shape == captured[model.feature_info[-1].module].shape
    # exported models must avoid RELU_0_TO_1, which TFLite Micro lacks
    assert not any(isinstance(m, (nn.Hardsigmoid, nn.Hardswish)) for m in model.modules())
    # model_config rebuilds the same architecture (on the meta device: structure only, no init cost)
    with torch.device("meta"):
        rebuilt = create_model(**model.model_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_registered_names():
    assert set(list_models()) == EXPECTED
    assert set(list_models(role="teacher")) == {"resnet18", "resnet34", "resnet50"}
    assert get_model_info("mobilenetv3_small_050").defaults["width_mult"] == 0.5


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_at_32px_low_res(name):
    check_model(name, 32, low_res_stem=True)


@pytest.mark.parametrize("name,size", [
    ("mobilenetv3_small_050", 64), ("mcunet_tiny", 64), ("mobilenetv2_035", 96), ("efficientnet_lite0", 96),
    ("resnet18", 64),
])
def test_default_stem(name, size):
    check_model(name, size)


def test_options_merge_and_config():
    model = create_model("mobilenetv2_050", 5, in_chans=1, width_mult=0.75, dropout=0.1)
    assert model.model_config == {
        "name": "mobilenetv2_050", "num_classes": 5, "in_chans": 1, "width_mult": 0.75, "low_res_stem": False,
        "dropout": 0.1,
    }
    assert model.stem.conv.in_channels == 1
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("resnet18", get_model_info("resnet18"))


def test_unknown_model_suggests():
    with pytest.raises(EdgekdError, match=r"unknown model 'mobilenet_v2_100'; did you mean 'mobilenetv2_100'\?"):
        create_model("mobilenet_v2_100", 10)


def test_unknown_option():
    with pytest.raises(EdgekdError) as err:
        create_model("resnet18", 10, width=0.5)
    assert str(err.value) == "resnet18: unknown model option 'width'; did you mean 'width_mult'?"
    with pytest.raises(EdgekdError) as err:
        create_model("resnet18", 10, zzz=1)
    assert str(err.value) == "resnet18: unknown model option 'zzz'; remove it (allowed: width_mult, low_res_stem, dropout)"


def test_bad_values():
    with pytest.raises(EdgekdError, match="num_classes >= 2"):
        create_model("mcunet_tiny", 1)
    with pytest.raises(EdgekdError, match="width_mult"):
        create_model("mcunet_tiny", 10, width_mult=0)


def test_too_small_input():
    with pytest.raises(EdgekdError) as err:
        create_model("mobilenetv2_100", 10, input_size=16)
    msg = str(err.value)
    assert "'mobilenetv2_100'" in msg and "at least 32 px" in msg and "low_res_stem=True" in msg
    check_input_size("resnet18", 16, low_res_stem=True)  # CIFAR stem: total stride 8
    with pytest.raises(EdgekdError, match="at least 32 px"):
        check_input_size("resnet18", 16, low_res_stem=False)
    with pytest.raises(EdgekdError, match="at least 16 px"):
        check_input_size(create_model("mcunet_tiny", 10, low_res_stem=True), 8)


def test_param_counts_match_torchvision():
    with torch.device("meta"):  # counts only: no weight init
        pairs = [
            (create_model("mobilenetv2_100", 1000), torchvision.models.mobilenet_v2(weights=None)),
            (create_model("resnet18", 1000), torchvision.models.resnet18(weights=None)),
            (create_model("mobilenetv3_small_100", 1000), torchvision.models.mobilenet_v3_small(weights=None)),
            (create_model("efficientnet_b0", 1000), torchvision.models.efficientnet_b0(weights=None)),
        ]
    for ours, ref in pairs:
        assert abs(n_params(ours) - n_params(ref)) <= 0.01 * n_params(ref)
    assert n_params(pairs[0][0]) == 3_504_872 and n_params(pairs[1][0]) == 11_689_512
    # torchvision state_dict names for the ResNet teachers
    assert pairs[1][0].state_dict().keys() == pairs[1][1].state_dict().keys()


def test_mcunet_fits_256kb_sram_at_64px():
    model = create_model("mcunet_tiny", 10, input_size=64).eval()
    live_skip = [0]
    peak = [0]

    def block_pre(m, inputs):
        live_skip[0] = inputs[0].numel() if m.has_skip else 0

    def leaf(m, inputs, output):
        # int8: one byte per element; a skip block also keeps its input alive
        peak[0] = max(peak[0], inputs[0].numel() + output.numel() + live_skip[0])

    for m in model.modules():
        if isinstance(m, InvertedResidual):
            m.register_forward_pre_hook(block_pre)
        elif not list(m.children()):
            m.register_forward_hook(leaf)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert peak[0] < 128 * 1024  # leaves room in 256 KB for the interpreter's arena overhead
    assert n_params(model) < 1024 * 1024  # int8 weights fit 1 MB flash


# ---------------------------------------------------------------- pretrained EfficientNet-Lite0

def _tf_same_conv(x, w, stride, groups=1):
    # TF "SAME": output ceil(i / s), extra padding after - computed from the actual input size
    k, (ih, iw) = w.shape[-1], x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, None, stride, 0, 1, groups)


def reference_lite0(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 forward straight from the package's own keys (its model class is not a dependency)."""

    def bn(y, p):
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-3)

    strides = [s for s, r in zip([1, 2, 2, 2, 1, 2, 1], [1, 2, 2, 3, 3, 4, 1]) for s in [s] + [1] * (r - 1)]
    x = F.relu6(bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    for i, stride in enumerate(strides):
        p, inp = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(bn(_tf_same_conv(x, sd[f"{p}._expand_conv.weight"], 1), f"{p}._bn0"))
        w = sd[f"{p}._depthwise_conv.weight"]
        x = F.relu6(bn(_tf_same_conv(x, w, stride, groups=w.shape[0]), f"{p}._bn1"))
        x = bn(_tf_same_conv(x, sd[f"{p}._project_conv.weight"], 1), f"{p}._bn2")
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
    x = F.relu6(bn(_tf_same_conv(x, sd["_conv_head.weight"], 1), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _photo(name: str, size: int = 224) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(EFFICIENTNET_LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE0_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", 1000, pretrained=True).eval()


@pytest.fixture(scope="module")
def photos():
    return torch.cat([_photo("chelsea"), _photo("coffee")])


def test_pretrained_classifies_photos(lite0, photos):
    with torch.no_grad():
        top5 = lite0(photos).topk(5).indices.tolist()
    assert set(top5[0]) & set(range(281, 286)), top5[0]  # tabby/tiger/Persian/Siamese/Egyptian cat
    assert set(top5[1]) & {967, 968, 504}, top5[1]  # espresso / cup / coffee mug


def test_pretrained_matches_reference(lite0, photos):
    sd = torch.load(weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    x = torch.cat([photos, torch.randn(1, 3, 224, 224)])
    with torch.no_grad():
        assert (lite0(x) - reference_lite0(sd, x)).abs().max() < 1e-3
        small = torch.randn(2, 3, 96, 96)  # any size divisible by the total stride is exact
        assert (lite0(small) - reference_lite0(sd, small)).abs().max() < 1e-3


def test_pretrained_config_and_new_classes(lite0, photos):
    assert lite0.model_config["same_padding"] is True and "pretrained" not in lite0.model_config
    assert lite0.pretrained_cfg["mean"] == EFFICIENTNET_LITE0_MEAN
    assert lite0.pretrained_cfg["classifier_reinitialised"] is False
    ten = create_model("efficientnet_lite0", 10, pretrained=True).eval()
    assert ten.pretrained_cfg["classifier_reinitialised"] is True
    gray = create_model("efficientnet_lite0", 10, in_chans=1, pretrained=True).eval()
    g = photos.mean(1, keepdim=True)
    with torch.no_grad():
        assert torch.allclose(ten.forward_features(photos), lite0.forward_features(photos))  # backbone kept
        assert ten(photos).shape == (2, 10)
        # summed RGB filters on one channel == the RGB model on the gray image replicated
        assert (gray.forward_features(g) - ten.forward_features(g.expand(-1, 3, -1, -1))).abs().max() < 1e-4


def test_pretrained_errors():
    msg = r"'mobilenetv2_100' has no pretrained weights \(models with weights: efficientnet_lite0\)"
    with pytest.raises(EdgekdError, match=msg):
        create_model("mobilenetv2_100", 10, pretrained=True)
    with pytest.raises(EdgekdError, match="width_mult=1.0"):
        create_model("efficientnet_lite0", 10, pretrained=True, width_mult=0.5)


def test_pretrained_mismatch_loads_nothing():
    from edgekd.models.pretrained import load_pretrained

    for options in ({"width_mult": 0.5}, {"depth_mult": 1.2}):  # wrong shapes / extra blocks
        model = create_model("efficientnet_lite0", 1000, same_padding=True, **options)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(EdgekdError, match="shape mismatch|key map"):
            load_pretrained(model, "efficientnet_lite0")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_student_init_schemes_set_conv_and_linear_layers_only():
    from edgekd.models.init import init_weights

    torch.manual_seed(0)
    model = init_weights(create_model("mobilenetv3_small_050", 10), "constant:1")
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(bool((m.weight == 1).all()) for m in convs)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    model = init_weights(create_model("mobilenetv3_small_050", 10), "normal:1,1")
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.mean().item() - 1) < 0.05 and abs(weights.std().item() - 1) < 0.05
    torch.manual_seed(0)
    a = init_weights(create_model("mobilenetv3_small_050", 10), "default")
    torch.manual_seed(0)
    b = create_model("mobilenetv3_small_050", 10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("spec, message", [("uniform", "unknown student init 'uniform'"),
                                           ("normal:0", "takes 2 number"), ("constant:x", "non-number")])
def test_bad_student_init_is_a_one_line_error(spec, message):
    from edgekd.config import TrainConfig
    from edgekd.errors import EdgekdError

    with pytest.raises(EdgekdError, match=message):
        TrainConfig(student_init=spec)
