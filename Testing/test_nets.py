"""Registration U-Net: shapes, size against the seed-004 spec, identity start, input checks, learning."""

import pytest
import torch
from torch.nn import functional as F

from JointRegSegLib import spatial
from JointRegSegLib.errors import InputError
from JointRegSegLib.nets import RegistrationUNet, count_parameters, student_unet, teacher_unet

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
