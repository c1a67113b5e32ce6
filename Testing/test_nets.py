"""Registration U-Net: shapes, size against the seed-004 spec, identity start, input checks, learning."""

import pytest
import torch
from torch.nn import functional as F

from JointRegSegLib import spatial
from JointRegSegLib.errors import InputError
from JointRegSegLib.nets import RegistrationUNet, count_parameters, student_unet, teacher_unet
from JointRegSegLib.nets.layout import Conv3d, Head, fast_layout

pytestmark = pytest.mark.usefixtures("one_thread")


# Seed 004, sections 2.1.1 and 2.2: "lowers the parameter count from 0.6M to 0.23M".
TEACHER_PARAMS_PAPER = 0.6e6
STUDENT_PARAMS_PAPER = 0.23e6


@pytest.mark.parametrize("factory", [teacher_unet, student_unet])
def test_output_is_a_3_channel_field_on_the_input_grid(factory):
    torch.manual_seed(0)
    net = factory()
    x = torch.rand(2, 2, 32, 16, 48)
    out = net(x)
    assert out.shape == (2, 3, 32, 16, 48)


@pytest.mark.parametrize(
    "factory, target", [(teacher_unet, TEACHER_PARAMS_PAPER), (student_unet, STUDENT_PARAMS_PAPER)]
)
def test_parameter_count_matches_the_paper(factory, target):
    count = count_parameters(factory())
    assert abs(count - target) <= 0.15 * target, f"{factory.__name__}: {count} parameters, paper {target:.0f}"


def test_student_has_the_papers_channels():
    net = student_unet()
    assert [b.conv.out_channels for b in net.encoder] == [16, 24, 24, 32]
    assert net.bottleneck.conv.out_channels == 32
    assert [b.conv.conv.out_channels for b in net.decoder] == [32, 24, 24, 16]
    assert [b.conv.out_channels for b in net.final] == [16, 16, 16]


@pytest.mark.parametrize("factory", [teacher_unet, student_unet])
def test_untrained_network_predicts_almost_the_identity(factory):
    torch.manual_seed(0)
    net = factory()
    out = net(torch.rand(1, 2, 32, 32, 32))
    assert out.abs().max() < 1e-2
    assert torch.count_nonzero(net.head.bias) == 0
    assert net.head.weight.std() < 1e-4


@pytest.mark.parametrize("shape", [(40, 32, 32), (32, 32, 24), (8, 16, 16)])
def test_size_not_divisible_by_16_is_refused(shape):
    net = student_unet()
    with pytest.raises(InputError, match=r"divisible by 16"):
        net(torch.rand(1, 2, *shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(InputError, match=r"\(B, 2, I, J, K\)"):
        student_unet()(torch.rand(1, 1, 16, 16, 16))


def test_decoder_length_must_match_encoder():
    with pytest.raises(InputError, match="decoder"):
        RegistrationUNet(encoder=(8, 8), decoder=(8,))


def test_network_learns_a_known_translation_through_warp():
    """fixed(p) = moving(p + 2 e_i): training on the pair must drive warp(moving, u) towards fixed with u_i ~ +2."""
    torch.manual_seed(0)
    shift, n = 2, 16
    big = F.avg_pool3d(torch.rand(1, 1, n + shift, n, n), kernel_size=5, stride=1, padding=2, count_include_pad=False)
    big = (big - big.min()) / (big.max() - big.min())
    moving, fixed = big[:, :, :n], big[:, :, shift:]
    net = student_unet()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    interior = (slice(None), slice(None), slice(3, n - 3), slice(3, n - 3), slice(3, n - 3))

    def mse(u: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(spatial.warp(moving, u)[interior], fixed[interior])

    initial = mse(net(torch.cat([moving, fixed], dim=1))).item()
    for _ in range(30):
        optimiser.zero_grad()
        loss = mse(net(torch.cat([moving, fixed], dim=1)))
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        u = net(torch.cat([moving, fixed], dim=1))
    assert mse(u).item() < 0.25 * initial
    assert u[interior][:, 0].mean() > 0.5 * shift


@pytest.mark.parametrize(
    ("shape", "out_channels", "kernel", "stride"),
    [((1, 2, 20, 24, 18), 8, 3, 1), ((1, 8, 10, 12, 9), 16, 3, 2), ((3, 4, 8, 8, 8), 4, 1, 1), ((1, 4, 9, 8, 6), 8, 2, 2)],
)
def test_conv3d_matches_pytorchs_convolution_on_the_onednn_path(shape, out_channels, kernel, stride):
    """`nets.layout.Conv3d` gives PyTorch's ``F.conv3d`` values and gradients (within float rounding) for batches that
    PyTorch itself sends to its reference kernel, through oneDNN (the profiler sees no ``slow_conv3d``), and loads an
    ``nn.Conv3d``'s state."""
    torch.manual_seed(0)
    reference = torch.nn.Conv3d(shape[1], out_channels, kernel, stride=stride, padding=kernel // 2 if kernel % 2 else 0)
    conv = Conv3d(shape[1], out_channels, kernel, stride=stride, padding=kernel // 2 if kernel % 2 else 0)
    conv.load_state_dict(reference.state_dict())
    x = torch.rand(shape, requires_grad=True)
    with torch.profiler.profile() as profile:
        out = conv(x)
    kernels = {event.key for event in profile.key_averages()}
    assert "aten::mkldnn_convolution" in kernels and not any("slow_conv" in name for name in kernels)
    expected = F.conv3d(x, reference.weight, reference.bias, stride=stride, padding=reference.padding)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    x.grad = None
    expected.square().sum().backward()
    for ours, theirs in zip(grads, (x.grad, reference.weight.grad, reference.bias.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_conv3d_leaves_float64_to_pytorch():
    """Where oneDNN does not apply (float64 here), `Conv3d` is ``nn.Conv3d``: the same values bit for bit."""
    torch.manual_seed(1)
    conv = Conv3d(2, 3, 3, padding=1).double()
    x = torch.rand(1, 2, 6, 7, 5, dtype=torch.float64)
    assert torch.equal(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=1))


def test_fast_layout_converts_networks_and_volumes_only():
    net = fast_layout(RegistrationUNet(encoder=[4], decoder=[4]), torch.device("cpu"))
    assert net.encoder[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    batch = fast_layout({"image": torch.rand(1, 2, 4, 4, 4), "labels": torch.zeros(1, 2, 4, 4, 4, dtype=torch.int64)}, torch.device("cpu"))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last_3d)
    assert not batch["labels"].is_contiguous(memory_format=torch.channels_last_3d)


def test_networks_return_the_standard_layout():
    """A network's last layer is a `Head`: its output is contiguous (what callers index and reduce), with the values of
    the channels-last convolution before it."""
    torch.manual_seed(2)
    net = fast_layout(RegistrationUNet(encoder=[4, 8], decoder=[8, 4]), torch.device("cpu"))
    x = fast_layout(torch.rand(1, 2, 16, 16, 16), torch.device("cpu"))
    out = net(x)
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last_3d)
    for head in (Head(2, 5, 1), Head(2, 5, 1, bias=False), Head(2, 3, 3, padding=1)):  # 1x1x1: the matrix product
        inputs = x.detach().clone().requires_grad_(True)
        out = head(inputs)
        assert out.is_contiguous()
        expected_input = inputs.detach().contiguous().requires_grad_(True)
        expected = F.conv3d(expected_input, head.weight, head.bias, padding=head.padding)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        ours = [inputs.grad, head.weight.grad.clone()]
        head.weight.grad = None
        expected.square().sum().backward()
        torch.testing.assert_close(ours[0], expected_input.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[1], head.weight.grad, rtol=1e-4, atol=1e-4)
