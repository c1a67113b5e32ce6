"""Synthetic pairs (SynthMorph recipe): rendering, deformations, label maps, pairs, determinism."""

import numpy as np
import pytest
import torch

from JointRegSegLib import spatial
from JointRegSegLib.device import same_device
from JointRegSegLib.errors import InputError
from JointRegSegLib.synth import (
    AffineRanges,
    DeformationOptions,
    RenderOptions,
    SyntheticPairs,
    load_synthseg_maps,
    random_deformation,
    random_velocity,
    render_image,
    smooth_noise_labelmap,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (32, 32, 32)
SMALL_DEFORMATION = DeformationOptions(max_std=1.5, min_std=0.5, resolution=1.0 / 8.0)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a voxel field ``(3, I, J, K)`` by central differences (numpy)."""
    grads = np.stack([np.stack(np.gradient(disp[c]), axis=0) for c in range(3)], axis=0)  # [c, axis, ...]
    jac = grads + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def noise_pairs(seed: int) -> SyntheticPairs:
    return SyntheticPairs("noise", SHAPE, seed=seed, deformation=SMALL_DEFORMATION, n_labels=6, noise_resolution=0.125)


def test_rendered_images_span_exactly_0_to_1():
    labels = smooth_noise_labelmap(SHAPE, 8, generator(), batch_size=3, resolution=0.25)
    image = render_image(labels, generator(1))
    assert image.shape == (3, 1, *SHAPE) and image.dtype == torch.float32
    assert torch.all(image >= 0) and torch.all(image <= 1)
    assert torch.allclose(image.amin(dim=(1, 2, 3, 4)), torch.zeros(3))
    assert torch.allclose(image.amax(dim=(1, 2, 3, 4)), torch.ones(3))


def test_mixture_intensities_follow_the_label_means():
    """Without blur, bias or gamma, the image is an affine map of the mixture: (mu_1 - mu_0) / sd_1 is invariant."""
    labels = torch.zeros((1, 1, *SHAPE), dtype=torch.long)
    labels[..., 16:] = 300  # a sparse code: the lookup table must reach it
    plain = RenderOptions(max_blur=0.0, max_bias_std=0.0, gamma_std=0.0)
    means = torch.zeros(1, 301)
    stds = torch.ones(1, 301)
    means[0, 0], means[0, 300], stds[0, 300] = 50.0, 200.0, 10.0
    image = render_image(labels, generator(), plain, means=means, stds=stds)[0, 0]
    low, high = image[..., :16], image[..., 16:]
    assert high.mean() > low.mean()
    ratio = (high.mean() - low.mean()) / high.std()
    assert ratio == pytest.approx((200.0 - 50.0) / 10.0, rel=0.05)
    assert low.std() / high.std() == pytest.approx(1.0 / 10.0, rel=0.1)


def test_label_with_higher_mean_is_brighter_with_all_augmentations():
    labels = torch.zeros((4, 1, *SHAPE), dtype=torch.long)
    labels[..., 8:24, 8:24, 8:24] = 1
    means = torch.tensor([[30.0, 220.0]]).repeat(4, 1)
    stds = torch.full((4, 2), 5.0)
    image = render_image(labels, generator(), RenderOptions(max_blur=0.5), means=means, stds=stds)
    inside = labels.bool()
    for b in range(4):
        assert image[b][inside[b]].mean() > image[b][~inside[b]].mean() + 0.3


def test_render_refuses_float_labels_and_missing_codes():
    with pytest.raises(InputError, match="integer"):
        render_image(torch.zeros((1, 1, 8, 8, 8)), generator())
    labels = torch.full((1, 1, 8, 8, 8), 5, dtype=torch.long)
    with pytest.raises(InputError, match="L >= 6"):
        render_image(labels, generator(), means=torch.zeros(1, 3), stds=torch.ones(1, 3))


def test_same_seed_same_pair_different_seed_different_pair():
    first, again, other = noise_pairs(3).sample(2), noise_pairs(3).sample(2), noise_pairs(4).sample(2)
    assert set(first) == {"fixed", "moving", "fixed_labels", "moving_labels", "true_disp"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
        assert not torch.equal(first[key], other[key]), key


def test_pair_shapes_types_and_ranges():
    pair = noise_pairs(0).sample(2)
    for key in ("fixed", "moving"):
        assert pair[key].shape == (2, 1, *SHAPE) and pair[key].dtype == torch.float32
        assert pair[key].min() >= 0 and pair[key].max() <= 1
    for key in ("fixed_labels", "moving_labels"):
        assert pair[key].shape == (2, 1, *SHAPE) and pair[key].dtype == torch.int64
    assert pair["true_disp"].shape == (2, 3, *SHAPE)


def test_pair_labels_are_one_map_deformed_twice():
    pair = noise_pairs(1).sample(2)
    fixed, moving = pair["fixed_labels"], pair["moving_labels"]
    for b in range(2):
        assert not torch.equal(fixed[b], moving[b])
        assert torch.equal(torch.unique(fixed[b]), torch.unique(moving[b]))
    # The returned ground truth registers the pair: much better label agreement than no registration
    # (not perfect: the labels went through two nearest-neighbour resamplings).
    registered = spatial.warp(moving.float(), pair["true_disp"], mode="nearest", padding_mode="border").long()
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    before = (moving == fixed)[inner].float().mean()
    after = (registered == fixed)[inner].float().mean()
    assert after > 0.88 and after > before + 0.1


def test_pairs_from_given_label_maps_keep_their_codes():
    maps = np.zeros((2, *SHAPE), dtype=np.int32)
    maps[:, 8:24, 8:24, 8:24] = 17
    maps[1, 12:20, 12:20, 12:20] = 53
    pair = SyntheticPairs(maps, SHAPE, seed=0, deformation=SMALL_DEFORMATION).sample(4)
    for key in ("fixed_labels", "moving_labels"):
        assert set(torch.unique(pair[key]).tolist()) <= {0, 17, 53}
    with pytest.raises(InputError, match="label maps must be integers"):
        SyntheticPairs(maps.astype(np.float32), SHAPE)
    with pytest.raises(InputError, match="label maps must be integers"):
        SyntheticPairs(maps[:, :16], SHAPE)


@pytest.mark.parametrize("affine", [None, AffineRanges(rotation_deg=10.0, scale=0.05, shear=0.02, translation=2.0)])
def test_random_deformation_is_diffeomorphic(affine):
    # Control points 10 voxels apart with a 1.5-voxel RMS: relatively stronger than the defaults on 96^3.
    options = DeformationOptions(max_std=1.5, min_std=1.5, resolution=1.0 / 8.0, affine=affine)
    disp = random_deformation(SHAPE, generator(5), batch_size=3, options=options).numpy()
    for b in range(3):
        det = jacobian_determinant(disp[b])
        assert det.min() > 0, f"folding: min det {det.min()}"
        assert det.min() < 0.9 and det.max() > 1.1
        assert np.abs(disp[b]).max() > 2.0


@pytest.mark.parametrize("affine", [None, AffineRanges()])
def test_inverse_deformation_undoes_the_deformation(affine):
    options = DeformationOptions(max_std=1.0, min_std=1.0, resolution=1.0 / 8.0, affine=affine)
    disp, inverse = random_deformation(SHAPE, generator(6), 2, options, return_inverse=True)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    residual = spatial.compose(inverse, disp)[inner]
    assert residual.square().mean().sqrt() < 0.05
    assert residual.abs().max() < 0.5
    assert disp[inner].abs().max() > 2.0


def test_deformation_has_the_requested_magnitude():
    """The velocity RMS is the drawn sigma; a smooth velocity integrates to a displacement of about the same size."""
    velocity = random_velocity(SHAPE, generator(7), batch_size=8, max_std=3.0, min_std=1.0, resolution=1.0 / 8.0)
    rms = velocity.square().mean(dim=(1, 2, 3, 4)).sqrt()
    assert torch.all(rms >= 1.0 - 1e-4) and torch.all(rms <= 3.0 + 1e-4)
    assert rms.std() > 0.1
    for sigma in (0.5, 2.0):
        options = DeformationOptions(max_std=sigma, min_std=sigma, resolution=1.0 / 8.0)
        disp = random_deformation(SHAPE, generator(8), batch_size=4, options=options)
        disp_rms = disp.square().mean(dim=(1, 2, 3, 4)).sqrt()
        assert torch.all(disp_rms > 0.7 * sigma) and torch.all(disp_rms < 1.3 * sigma), disp_rms


def test_smooth_noise_label_map_has_the_requested_labels():
    for n_labels in (4, 9):
        labels = smooth_noise_labelmap(SHAPE, n_labels, generator(n_labels), batch_size=2, resolution=0.25)
        assert labels.shape == (2, 1, *SHAPE) and labels.dtype == torch.int64
        for b in range(2):
            assert torch.unique(labels[b]).tolist() == list(range(n_labels))
    with pytest.raises(InputError, match="n_labels"):
        smooth_noise_labelmap(SHAPE, 1, generator())


def test_synthseg_maps_load_at_network_size_in_lps_order(shared_data_dir):
    folder = shared_data_dir / "synthseg_labelmaps"
    maps = load_synthseg_maps(folder, (48, 48, 48), drop_extracerebral=True, max_maps=2)
    assert maps.shape == (2, 48, 48, 48) and maps.dtype == np.int16
    assert maps is load_synthseg_maps(folder, (48, 48, 48), drop_extracerebral=True, max_maps=2)  # memory cache
    for labels in maps:
        codes = set(np.unique(labels).tolist())
        assert {0, 2, 3, 41, 42} <= codes
        assert max(codes) < 500

        def centroid(code: int) -> np.ndarray:
            return np.argwhere(labels == code).mean(axis=0)

        # LPS index order: i grows to the left, k grows superiorly.
        assert centroid(2)[0] > centroid(41)[0] + 5
        assert centroid(3)[2] > centroid(16)[2] + 5


def test_brain_maps_lose_the_spinal_csf_and_centre_on_the_brain(tmp_path):
    """A head map whose CSF runs down to its lower edge (as SynthSeg's do): the brain-only map keeps the CSF
    around the brain and CSF_MARGIN_MM (5 voxels here) of the tail, drops the rest, and is centred on what it
    keeps; the whole map keeps the tail."""
    import nibabel as nib

    head = np.zeros((40, 40, 60), dtype=np.int16)
    head[10:30, 10:30, 30:51] = 24  # CSF around the brain
    head[12:28, 12:28, 32:48] = 2  # the brain
    head[18:22, 18:22, 0:30] = 24  # the spinal canal's CSF, down to k = 0
    head[5:35, 5:35, 52:55] = 600  # an extra-cerebral class
    nib.save(nib.Nifti1Image(head, np.eye(4)), str(tmp_path / "head.nii.gz"))
    options = {"spacing": 1.0, "orientation": None, "method": "nearest"}
    brain = load_synthseg_maps(tmp_path, (40, 40, 60), drop_extracerebral=True, **options)[0]
    whole = load_synthseg_maps(tmp_path, (40, 40, 60), **options)[0]

    kept = np.where(head >= 500, 0, head)
    kept[:, :, : 32 - 5] = 0  # the tail more than 5 voxels below the brain (k 32..47)
    # what is kept spans k 27..50 (centre 38.5), sampled on a grid of 60 centred there: output k reads input k + 9
    expected = np.zeros_like(head)
    expected[:, :, : 60 - 9] = kept[:, :, 9:]
    assert np.array_equal(brain, expected)
    assert np.count_nonzero(whole[19, 19] == 24) >= 25 and 600 in whole


def test_mode_pooling_matches_scipy():
    from scipy import stats

    from JointRegSegLib.synth.labelmaps import _mode_pool

    fine = np.random.default_rng(0).integers(0, 5, size=(12, 9, 6)).astype(np.int16)
    blocks = fine.reshape(4, 3, 3, 3, 3, 2).transpose(0, 2, 4, 1, 3, 5).reshape(4, 3, 3, 18)
    expected = stats.mode(blocks, axis=-1, keepdims=False).mode  # ties: the smallest value, as ours
    assert np.array_equal(_mode_pool(fine, (3, 3, 2)), expected)


def test_load_synthseg_maps_rejects_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_synthseg_maps(tmp_path / "nowhere", (32, 32, 32))
    with pytest.raises(InputError, match="no label maps"):
        load_synthseg_maps(tmp_path, (32, 32, 32))


def test_a_device_without_an_index_is_the_current_one_of_its_type():
    """``torch.Generator(device="cuda").device`` is ``cuda`` while a tensor on that GPU reports ``cuda:0``: renderings
    compare the two with `same_device` (``!=`` refused every training generator made from a bare ``cuda``)."""
    cuda, first, second, cpu = (torch.device(name) for name in ("cuda", "cuda:0", "cuda:1", "cpu"))
    assert cuda != first and same_device(cuda, first) and same_device(first, cuda) and same_device(cuda, second)
    assert not same_device(first, second) and not same_device(cpu, cuda) and same_device(cpu, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pairs_on_cuda_are_deterministic():
    first = SyntheticPairs("noise", SHAPE, seed=2, device="cuda", deformation=SMALL_DEFORMATION).sample(2)
    again = SyntheticPairs("noise", SHAPE, seed=2, device="cuda", deformation=SMALL_DEFORMATION).sample(2)
    for key in first:
        assert first[key].is_cuda
        assert torch.equal(first[key], again[key]), key
    assert first["fixed"].min() >= 0 and first["fixed"].max() <= 1
