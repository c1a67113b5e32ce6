"""Every training loop can learn: each network overfits one small pair with its own trainer's step.

The pair is the bundled sample (Resources/SampleData, two subjects' T1 scans with FreeSurfer labels)
on a 32^3 RAS+ grid at 4 mm (6 mm for jers, whose networks need multiples of 32 and a whole head).
The trainers are the real ones (`JointRegSegLib.training`); their data bank is written from the
sample pair in a temporary folder (`training.bank` is the data interface), so no shared data is
needed. Each test feeds ONE batch (the pair, and the pair swapped: batches of 2 take PyTorch's fast
convolutions) to `Trainer.step` a few hundred times and asserts what the issue asks of a loop that
can learn:

- registration: the Dice of the moving labels warped by the network reaches (within 0.03) the
  Dice of an instance optimisation of a free field with the same similarity and regulariser on the
  same pair, and is well above the Dice before registration (tto: Dice of the three tissue classes;
  at 4 mm its MultiAxisMI reference gains only 0.047 on the 30 structures, too little to tell
  learning apart);
- segmentation: Dice > 0.9 on the image the network was shown.

A loop with a sign error, a frozen head, a broken integration or a detached target fails them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_closing, binary_fill_holes
from torch.nn import functional as F

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import read_image, read_labels
from JointRegSegLib.imageio.intensity import normalise_intensity
from JointRegSegLib.imageio.network_grid import network_geometry, to_network
from JointRegSegLib.labels import TISSUE_LABELS, tissue_of
from JointRegSegLib.losses import gradient_l2, lncc_loss
from JointRegSegLib.methods.tto import multi_axis_mi
from JointRegSegLib.methods.uresnet import N_CLASSES, forward, labels_to_classes
from JointRegSegLib.spatial import identity_grid, integrate_velocity, sample_at_indices, warp
from JointRegSegLib.training import bank, make_trainer
from JointRegSegLib.training.common import dice_present
from JointRegSegLib.nets.layout import fast_layout
from JointRegSegLib.weights import record_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (32, 32, 32)
SPACING = 4.0
HEAD_SPACING = 6.0
STEPS_JERS = 300
CPU = torch.device("cpu")


def _on_grid(sample_pair: dict, spacing: float) -> dict[str, torch.Tensor]:
    """The sample pair on a 32^3 RAS+ grid about the fixed image's centre: images in [0, 1], label codes."""
    fixed = read_image(sample_pair["fixed"])
    grid = network_geometry(fixed.geometry, spacing=spacing, shape=SHAPE)

    def image(key: str) -> torch.Tensor:
        return torch.from_numpy(normalise_intensity(to_network(read_image(sample_pair[key]), grid)))[None, None]

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(to_network(read_labels(sample_pair[key]), grid, labels=True).astype(np.int64))[None, None]

    return {"fixed": image("fixed"), "moving": image("moving"), "fixed_seg": labels("fixed_seg"), "moving_seg": labels("moving_seg")}


def _head(codes: torch.Tensor) -> torch.Tensor:
    """A whole-head label map from a brain's: the unlabelled voxels inside the brain's outline (sulci, the
    interhemispheric fissure: FreeSurfer's aseg leaves them 0) become CSF (code 24), as in SynthSeg's head maps; then
    skull (code 515) and scalp (code 507) shells around it."""
    outline = binary_fill_holes(binary_closing(codes[0, 0].numpy() > 0, iterations=2))
    intracranial = torch.from_numpy(outline)[None, None]
    head = torch.where(intracranial & (codes == 0), torch.full_like(codes, 24), codes)
    grown = [intracranial.float()]
    for _ in range(2):
        grown.append((F.max_pool3d(grown[-1], 3, 1, 1) > 0).float())
    head[(grown[1] > 0) & (grown[0] == 0)] = 515
    head[(grown[2] > 0) & (grown[1] == 0)] = 507
    return head


@pytest.fixture(scope="module")
def pair(sample_pair) -> dict[str, torch.Tensor]:
    return _on_grid(sample_pair, SPACING)


@pytest.fixture(scope="module")
def head_pair(sample_pair) -> dict[str, torch.Tensor]:
    return _on_grid(sample_pair, HEAD_SPACING)


def _clean_t1(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """T1-like images of ``labels`` without blur, bias field or much noise (one contrast for the batch): images whose
    tissue classes their intensities tell apart, so overfitting asks the loop to learn, not the data to be hard."""
    from JointRegSegLib.synth import RenderOptions
    from JointRegSegLib.training.augment import render_t1

    clean = RenderOptions(max_blur=0.0, max_bias_std=0.0, gamma_std=0.0)
    return render_t1(labels, torch.Generator().manual_seed(seed), pairs=len(labels) == 2, std_range=(1.0, 2.0), options=clean)


@pytest.fixture(scope="module")
def jers_head(head_pair) -> dict[str, torch.Tensor]:
    """The moving sample brain in a skull and scalp (`_head`) and its tissue classes (0 background, 1 CSF, 2 grey,
    3 white matter); jers' atlas: the same brain rendered (`_clean_t1`) and skull-stripped."""
    from JointRegSegLib.training.jers import brain_mask_of

    labels = _head(head_pair["moving_seg"])
    tissue = torch.from_numpy(np.searchsorted((0, *TISSUE_LABELS), tissue_of(labels.numpy())))
    return {"labels": labels, "tissue": tissue, "atlas": _clean_t1(labels, 4) * brain_mask_of(labels)}


@pytest.fixture(scope="module", autouse=True)
def sample_bank(tmp_path_factory, pair, head_pair, jers_head):
    """A data bank made of the sample pair only (20 'maps': the two label maps in turn; the scans as the real
    ones; jers' atlas: the skull-stripped sample head), in a temporary JRS_TRAINING_DIR."""
    folder = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JRS_TRAINING_DIR", str(folder))
        maps = np.concatenate([pair["fixed_seg"][0].numpy(), pair["moving_seg"][0].numpy()] * 10).astype(np.int16)
        bank.entry(bank.synthseg_key("brain", SPACING, SHAPE), lambda: {"maps": maps})
        heads = [_head(head_pair[k])[0].numpy() for k in ("fixed_seg", "moving_seg")]
        bank.entry(f"jers_heads_{bank.grid_key(HEAD_SPACING, SHAPE)}", lambda: {"maps": np.concatenate(heads * 10).astype(np.int16)})
        onehot = F.one_hot(jers_head["tissue"][0, 0], 4).permute(3, 0, 1, 2).numpy().astype(np.uint8)
        bank.entry(f"jers_atlas_{bank.grid_key(HEAD_SPACING, SHAPE)}", lambda: {"image": jers_head["atlas"][0, 0].numpy(), "onehot": onehot})
        for spacing, images in ((SPACING, pair), (HEAD_SPACING, head_pair)):
            scans = [images["fixed"][0, 0].numpy(), images["moving"][0, 0].numpy()]
            for relative, scan in zip(
                ("oasis_unlabelled/OASIS_0001_0000.nii.gz", "oasis_unlabelled/OASIS_0075_0000.nii.gz",
                 "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni152/MNI152_2009_template.nii.gz"),
                scans * 2,
            ):
                stem = relative.replace("/", "_").split(".")[0]
                bank.entry(f"scan_{stem}_{bank.grid_key(spacing, SHAPE)}", lambda scan=scan: {"image": scan})
        yield folder


def _both_ways(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cat[a, b], cat[b, a])``: the pair and the pair swapped, one batch of two."""
    return torch.cat([a, b]), torch.cat([b, a])


def _mean_dice(truth: torch.Tensor, predicted: torch.Tensor) -> float:
    labels = sorted(int(c) for c in torch.unique(truth) if c > 0)
    return dice_present(truth, predicted, labels)


def _instance_optimisation(loss_of_disp, shape=SHAPE, steps: int = 150, lr: float = 0.1) -> torch.Tensor:
    """A free displacement field optimised directly (Adam) for ``loss_of_disp`` (the trainer's loss on the pair)."""
    disp = torch.zeros((1, 3, *shape), requires_grad=True)
    optimiser = torch.optim.Adam([disp], lr=lr)
    for _ in range(steps):
        loss = loss_of_disp(disp)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return disp.detach()


def _train(trainer, batch: dict[str, torch.Tensor], steps: int, start: int = 0) -> list[float]:
    """``steps`` optimisation steps of ``trainer`` on one batch (the layout training uses); the losses."""
    for module in trainer.modules().values():
        fast_layout(module, CPU).train()
    batch = fast_layout(batch, CPU)
    return [trainer.step(batch, n)["loss"] for n in range(start, start + steps)]


def _registration_dice(pair: dict[str, torch.Tensor], disp: torch.Tensor) -> float:
    warped = warp(pair["moving_seg"].float(), disp, mode="nearest").long()
    return _mean_dice(pair["fixed_seg"], warped)


def _tissue(codes: torch.Tensor) -> torch.Tensor:
    """FreeSurfer codes grouped into tissue classes: 0 background, 1 CSF, 2 grey, 3 white matter (`labels.tissue_of`)."""
    return torch.from_numpy(np.searchsorted((0, *TISSUE_LABELS), tissue_of(codes.numpy())))


def _tissue_dice(pair: dict[str, torch.Tensor], disp: torch.Tensor) -> float:
    """Mean Dice of the three tissue classes after warping the moving labels by ``disp``."""
    return _registration_dice({"fixed_seg": _tissue(pair["fixed_seg"]), "moving_seg": _tissue(pair["moving_seg"])}, disp)


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_tto_networks_overfit_one_pair(tmp_path, pair, stage):
    """MultiAxisMI + smoothness (eq. 1, and L_KD for the student): the network's field matches a free field's Dice."""
    generator = torch.Generator().manual_seed(0)
    reference = _instance_optimisation(  # the bar first: it is cheap, and the check means nothing without it
        lambda u: multi_axis_mi(pair["fixed"], warp(pair["moving"], u), 32, 2, generator) + 0.3 * gradient_l2(u)
    )
    before, instance = (_tissue_dice(pair, d) for d in (torch.zeros_like(reference), reference))
    assert instance > before + 0.05, (before, instance)
    output = str(tmp_path)
    if stage == "student":  # a teacher to distil: the network of a teacher trainer after the same overfitting
        teacher = make_trainer("tto", {"stage": "teacher", "iterations": 1, "sources": {"noise": 1.0}, "output": output})
        fixed, moving = _both_ways(pair["fixed"], pair["moving"])
        _train(teacher, {"fixed": fixed, "moving": moving}, 150)
        torch.save(teacher.shipped_state(), tmp_path / "tto_teacher.pt")
        record_weights("tto_teacher", tmp_path / "tto_teacher.pt", {"note": "overfit teacher, test"})
    trainer = make_trainer("tto", {"stage": stage, "iterations": 1, "sources": {"noise": 1.0}, "output": output})
    fixed, moving = _both_ways(pair["fixed"], pair["moving"])
    losses = _train(trainer, {"fixed": fixed, "moving": moving}, 150)
    assert np.mean(losses[-10:]) < losses[0]
    with torch.no_grad():
        disp = trainer.net.eval()(torch.cat([pair["moving"], pair["fixed"]], dim=1).contiguous(memory_format=torch.channels_last_3d))
    network = _tissue_dice(pair, disp.float())
    assert network >= instance - 0.03, (before, network, instance)


def test_uresnet_overfits_one_pair(tmp_path, pair):
    """Eq. 7: registration reaches a free field's Dice (same image terms) and the moving image's segmentation Dice > 0.9."""
    trainer = make_trainer("uresnet", {"iterations": 1, "shape": list(SHAPE), "spacing": SPACING, "lr": 3e-3, "output": str(tmp_path)})
    moving, fixed = _both_ways(pair["moving"], pair["fixed"])
    moving_classes, fixed_classes = _both_ways(labels_to_classes(pair["moving_seg"]), labels_to_classes(pair["fixed_seg"]))
    batch = {"moving": moving, "fixed": fixed, "moving_classes": moving_classes, "fixed_classes": fixed_classes}
    _train(trainer, batch, 400)
    with torch.no_grad():
        out = forward(trainer.net.eval(), *fast_layout([moving, fixed], CPU))
    classes = {"moving": labels_to_classes(pair["moving_seg"]), "fixed": labels_to_classes(pair["fixed_seg"])}
    warped = warp(classes["moving"].float(), out["disp"][:1], mode="nearest").long()
    reference = _instance_optimisation(
        lambda u: F.mse_loss(warp(pair["moving"], u), pair["fixed"]) + lncc_loss(pair["fixed"], warp(pair["moving"], u))
        + 0.1 * gradient_l2(u)
    )
    labels = list(range(1, N_CLASSES))
    network = dice_present(classes["fixed"], warped, labels)
    instance = dice_present(classes["fixed"], warp(classes["moving"].float(), reference, mode="nearest").long(), labels)
    before = dice_present(classes["fixed"], classes["moving"], labels)
    assert instance > before + 0.05, (before, instance)
    assert network >= instance - 0.03, (before, network, instance)
    segmentation = dice_present(classes["moving"], out["seg"][:1].argmax(dim=1, keepdim=True), labels)
    assert segmentation > 0.9, segmentation


def test_segreg_network_overfits_one_region_pair(tmp_path, pair):
    """Eq. 5 on one region (both thalami, merged): the network's velocity matches a free velocity's Dice."""
    from JointRegSegLib.methods.segreg import INTEGRATION_STEPS, region_loss

    trainer = make_trainer("segreg", {"iterations": 1, "shape": list(SHAPE), "spacing": SPACING, "lr": 3e-3, "output": str(tmp_path)})
    masks = {k: torch.isin(pair[f"{k}_seg"], torch.tensor([10, 49])).float() for k in ("fixed", "moving")}
    fixed = torch.cat([pair["fixed"] * masks["fixed"], masks["fixed"]], dim=1)
    moving = torch.cat([pair["moving"] * masks["moving"], masks["moving"]], dim=1)
    _train(trainer, {"fixed": torch.cat([fixed, moving]), "moving": torch.cat([moving, fixed])}, 200)
    ones = torch.ones_like(fixed[:, 1:2])

    def dice(points: torch.Tensor) -> float:
        warped = sample_at_indices(moving, points.permute(0, 2, 3, 4, 1), padding_mode="border")[:, 1] > 0.5
        truth = fixed[:, 1] > 0.5
        return float(2 * (warped & truth).sum() / (warped.sum() + truth.sum()))

    def points_of(velocity: torch.Tensor) -> torch.Tensor:
        return identity_grid(SHAPE) + integrate_velocity(velocity, INTEGRATION_STEPS)

    with torch.no_grad():
        network = dice(points_of(trainer.net.eval()(torch.cat([moving[:, :1], fixed[:, :1]], dim=1)).float()))
    reference = _instance_optimisation(lambda v: region_loss(trainer.settings, points_of(v), fixed, moving, v, ones)[0])
    before, instance = dice(identity_grid(SHAPE)), dice(points_of(reference))
    assert instance > before + 0.1, (before, instance)
    assert network >= instance - 0.03, (before, network, instance)


def test_hof_overfits_one_pair(tmp_path, pair):
    """Pretraining (sim + smo) reaches a free field's Dice; the follower (Dice + CE) then segments the labelled image, Dice > 0.9."""
    from JointRegSegLib.methods.hof import N_CLASSES as HOF_CLASSES
    from JointRegSegLib.methods.hof import codes_to_classes
    from JointRegSegLib.training.hof import one_hot, smoothness

    trainer = make_trainer("hof", {
        "iterations": 1, "size": 32, "crop": 32, "spacing": SPACING, "phases": [250, 0, 750], "output": str(tmp_path),
        "alpha": 3e-3, "lr_follower": 1e-2,
    })
    x_l, x_u = _both_ways(pair["moving"], pair["fixed"])
    _train(trainer, {"x_l": x_l, "x_u": x_u}, 250)
    with torch.no_grad():
        psi = trainer.net.eval().register(*fast_layout([pair["moving"], pair["fixed"]], CPU))
    reference = _instance_optimisation(
        lambda u: F.mse_loss(warp(pair["moving"], u), pair["fixed"]) + 10.0 * smoothness(u)
    )
    before, network, instance = (_registration_dice(pair, d) for d in (torch.zeros_like(psi), psi.float(), reference))
    assert instance > before + 0.05, (before, instance)
    assert network >= instance - 0.03, (before, network, instance)

    classes = torch.from_numpy(codes_to_classes(pair["moving_seg"].numpy()))
    y_l = one_hot(torch.cat([classes, classes]), HOF_CLASSES)
    batch = {"x_l": torch.cat([pair["moving"]] * 2), "y_l": y_l, "x_u": x_u, "gamma": torch.zeros(2)}
    _train(trainer, batch, 750, start=250)  # Dice 0.69, 0.81, 0.87, 0.89, 0.92 after 150 ... 750 steps
    with torch.no_grad():
        predicted = trainer.net.eval().segment(fast_layout(pair["moving"], CPU)).argmax(dim=1, keepdim=True)
    segmentation = _mean_dice(classes, predicted)
    assert segmentation > 0.9, segmentation


def test_hof_same_brain_pairs_render_one_map_twice(tmp_path):
    """With ``other_subject=0`` a registration batch pairs each labelled map with itself, drawn afresh: with the
    deformation all but off the two label maps agree voxel for voxel while the images differ (each its own
    contrast and noise); with ``other_subject=1`` the bank's two brains meet too."""
    config = {"iterations": 1, "size": 32, "crop": 32, "spacing": SPACING, "phases": [0, 50, 0], "output": str(tmp_path), "max_std": 1e-6}
    same = make_trainer("hof", {**config, "other_subject": 0.0})
    for n in range(6):
        batch = same.batch(n)
        assert torch.equal(batch["y_u"], batch["y_l"])
        assert not torch.allclose(batch["x_u"], batch["x_l"], atol=0.05)
    mixed = make_trainer("hof", {**config, "other_subject": 1.0})
    assert any(
        "y_u" in batch and not torch.equal(batch["y_u"], batch["y_l"]) for batch in map(mixed.batch, range(12))
    )
    with pytest.raises(InputError, match="other_subject"):
        make_trainer("hof", {**config, "other_subject": 1.5})


def test_hof_pairs_start_where_the_affine_stage_leaves_them(tmp_path):
    """With ``prealign`` (the default) the bank's two brains, the sample pair's label maps an affine apart, are
    brought to their mean shape and the scans onto them, so training and validation pairs start affinely aligned,
    as the method's affine stage hands its pairs to the network."""
    from JointRegSegLib.metrics.similarity import ncc
    from JointRegSegLib.training.common import dice_present
    from JointRegSegLib.training.prealign import shared_codes

    config = {"iterations": 1, "size": 32, "crop": 32, "spacing": SPACING, "output": str(tmp_path)}
    given, aligned = make_trainer("hof", {**config, "prealign": False}), make_trainer("hof", config)
    codes = shared_codes(given.maps[:2])
    dice = [dice_present(t.maps[0], t.maps[1], codes) for t in (given, aligned)]
    similarity = [ncc(t.real[0, 0].numpy(), t.real[1, 0].numpy()) for t in (given, aligned)]
    assert dice[1] > dice[0] + 0.05 and similarity[1] > similarity[0], (dice, similarity)
    assert given.validate()["identity_dice"] < aligned.validate()["identity_dice"]
    with pytest.raises(InputError, match="prealign"):
        make_trainer("hof", {**config, "prealign": "yes"})

    # each pair then takes one random pose, both its volumes together, and the segmentation is validated posed
    still = make_trainer("hof", {**config, "pose": [0, 0, 0, 0], "other_subject": 0.0, "max_std": 1e-6})
    posed = make_trainer("hof", {**config, "other_subject": 0.0, "max_std": 1e-6})
    first, moved = still.batch(700), posed.batch(700)  # a registration-phase batch of same-brain pairs, with labels
    assert torch.equal(moved["y_u"], moved["y_l"])  # one pose for both brains of a pair
    assert dice_present(first["y_l"][:1].argmax(1), moved["y_l"][:1].argmax(1), list(range(1, first["y_l"].shape[1]))) < 0.9
    assert torch.equal(still.posed_classes, still.validation_classes) and not torch.equal(posed.posed_classes, posed.validation_classes)


def _rotation(degrees: float, shift: float) -> torch.Tensor:
    """A normalised 4x4 affine: a rotation by ``degrees`` in the plane of two grid axes and a shift along the third
    (a fraction of the half field of view); on a cubic grid of isotropic voxels a rigid motion."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return torch.tensor([[[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, shift], [0.0, 0.0, 0.0, 1.0]]], dtype=torch.float32)


def test_jers_overfits_one_head(tmp_path, jers_head):
    """One synthetic head in two known poses, the atlas being the same brain unposed and skull-stripped with its tissue
    classes (the bank's jers atlas, `jers_head`), in another contrast: the extraction finds the brain (mask Dice > 0.9), the affine stages
    reach an instance-optimised affine's similarity to the atlas, and the segmentation, taught by the atlas labels the
    inverse affine brings into the head (eq. 7, 11), labels the head's own tissues (Dice > 0.9)."""
    from JointRegSegLib.nets.jers import affine_warp
    from JointRegSegLib.training.jers import brain_mask_of

    trainer = make_trainer("jers", {
        "iterations": 1, "shape": list(SHAPE), "spacing": HEAD_SPACING, "output": str(tmp_path), "lr": 3e-3,
        "lr_registration": 1e-3, "warmup": 0, "mask_supervision": 1.0, "window": 5,
    })
    poses = torch.cat([_rotation(8.0, 0.06), _rotation(-6.0, -0.06)])
    labels = affine_warp(jers_head["labels"].float().expand(2, -1, -1, -1, -1), poses, mode="nearest").long()
    raw = _clean_t1(labels, 3)
    tissue = affine_warp(jers_head["tissue"].float().expand(2, -1, -1, -1, -1), poses, mode="nearest").long()
    brain = brain_mask_of(labels).float()
    _train(trainer, {"raw": raw, "brain": brain}, STEPS_JERS)
    trainer.net.eval()
    with torch.no_grad():
        out = trainer.forward(fast_layout(raw, CPU), coupled=False, hard=True)
        soft = trainer.forward(fast_layout(raw, CPU), coupled=False)
    mask = torch.stack(out.masks).prod(dim=0).long()
    extraction = [_mean_dice(brain[k:k + 1].long(), mask[k:k + 1]) for k in range(2)]
    segmentation = [_mean_dice(tissue[k:k + 1], out.segmentation_logits[k:k + 1].argmax(dim=1, keepdim=True)) for k in range(2)]
    assert min(extraction) > 0.9, extraction
    assert min(segmentation) > 0.9, segmentation
    with torch.no_grad():
        scores = trainer.validate()
    stages = [scores[f"reg_dice_stage_{k}"] for k in range(1, trainer.cfg.registration_stages + 1)]
    assert stages[-1] == pytest.approx(scores["reg_dice"], abs=1e-9), (stages, scores["reg_dice"])  # A_c^N is the network's
    # the stripped diagnostic heads are the held-apart heads, same poses, with only their brain left
    held = trainer.validation_labels
    assert torch.equal(trainer.stripped_labels, torch.where(brain_mask_of(held), held, 0)) and (held != trainer.stripped_labels).any()
    assert all(0.0 <= scores[f"stripped_{key}"] <= 1.0 for key in ("dice_ext", "dice_seg", "reg_dice"))

    atlas = trainer.atlas.contiguous()
    for k in range(2):
        extracted = soft.extracted[k:k + 1].detach()
        theta = torch.eye(4)[None, :3].clone().requires_grad_(True)
        optimiser = torch.optim.Adam([theta], lr=0.01)
        bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])
        for _ in range(150):
            loss = lncc_loss(affine_warp(extracted, torch.cat([theta, bottom], dim=1)), atlas, window=5)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        instance = -float(loss)
        network = -float(lncc_loss(affine_warp(extracted, soft.affine[k:k + 1]), atlas, window=5))
        before = -float(lncc_loss(extracted, atlas, window=5))
        assert instance > before + 0.02, (before, instance)
        assert network >= instance - 0.02, (before, network, instance)
