"""SegmentationNet: the four backbones keep the input size, expose their features, round-trip
their config, reject bad sizes and names, fit the weights budget and learn a toy task."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from napari_retina.nets.segmentation import BACKBONES, SegmentationNet  # noqa: E402

# a model folder holds at most 15 MiB of weights: 3.5 M float32 parameters leave a margin
MAX_PARAMETERS = 3_500_000
SMALL = 8  # base channels for the behaviour tests: fast on 2 cores, same code paths as the default


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # one thread: on 64x64 inputs, a second one costs more in synchronisation than it saves
    # (about 10x slower on a busy 2-core machine), and the loss values stay reproducible
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _disc_task(h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc (the lesion) on a dark, slightly noisy background."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (((yy - h * 0.4) ** 2 + (xx - w * 0.55) ** 2) <= (h * 0.2) ** 2).float()
    image = 0.1 + 0.8 * disc + 0.05 * torch.randn(3, h, w)
    return image.unsqueeze(0), disc.view(1, 1, h, w)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("depth, shape", [(4, (64, 64)), (4, (64, 96)), (2, (12, 20))])
def test_logits_and_features_keep_the_input_size(backbone, depth, shape):
    net = SegmentationNet(backbone, base_channels=SMALL, depth=depth).eval()
    x = torch.randn(2, 3, *shape)
    with torch.no_grad():
        logits, features = net.forward_with_features(x)
        plain = net(x)
    assert logits.shape == (2, 1, *shape)
    assert features.shape == (2, net.feature_channels, *shape)
    # the features are the classifier's input: the penultimate map, nothing after it but the 1x1 conv
    assert torch.allclose(net.classifier(features), logits, atol=1e-6)
    assert torch.equal(plain, logits)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_round_trip_loads_strictly_and_gives_identical_outputs(backbone):
    # non-default values everywhere, so a from_config that drops a key builds a different net
    net = SegmentationNet(backbone, in_channels=4, base_channels=6, depth=3)
    x = torch.randn(2, 4, 32, 40)
    with torch.no_grad():
        net.train()(x)  # move the BN running statistics off their initial values
    cfg = json.loads(json.dumps(net.config()))  # must survive config.json
    assert cfg == {"backbone": backbone, "in_channels": 4, "base_channels": 6, "depth": 3}
    rebuilt = SegmentationNet.from_config({**cfg, "threshold": 0.5, "version": 7})  # unknown keys ignored
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    assert rebuilt.feature_channels == net.feature_channels


@pytest.mark.parametrize("backbone", BACKBONES)
def test_size_not_a_multiple_of_two_to_the_depth_is_refused_clearly(backbone):
    net = SegmentationNet(backbone, base_channels=SMALL, depth=4)
    with pytest.raises(ValueError, match=r"multiples of 16.*64x72.*pad it to 64x80"):
        net(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.randn(1, 1, 64, 64))


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError, match="resnet50") as info:
        SegmentationNet("resnet50")
    for name in BACKBONES:
        assert name in str(info.value)


def test_cenet_needs_its_two_fixed_downsamplings():
    with pytest.raises(ValueError, match="depth >= 2"):
        SegmentationNet("cenet", depth=1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_default_size_fits_the_weights_budget(backbone):
    net = SegmentationNet(backbone)
    n = sum(p.numel() for p in net.parameters())
    assert n == net.num_parameters()
    assert n < MAX_PARAMETERS, f"{backbone}: {n} parameters, {n * 4 / 2**20:.1f} MiB of float32 weights"
    # and the default is not a degenerate net: full-resolution features of 16 channels
    assert net.feature_channels == 16


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_few_adam_steps_learn_a_bright_disc(backbone):
    image, target = _disc_task()
    net = SegmentationNet(backbone, base_channels=SMALL, depth=4).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    bce = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = bce(net(image), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = bce(net(image), target).item()
    assert final < 0.7 * losses[0], f"{backbone}: loss {losses[0]:.3f} -> {final:.3f} ({[round(v, 3) for v in losses]})"
