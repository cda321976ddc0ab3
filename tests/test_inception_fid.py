"""The optional standard Inception FID (`sd_core.evaluation.inception_fid`): pytorch-fid's FID Inception v3
rebuilt without torchvision. Its real weights file cannot be downloaded here, so the checks use random weights
saved in the file's format: the parameter names and shapes the real file has, the load through
``checkpoint_eval``'s ``inception_weights`` option, refusals of wrong files, and the FID arithmetic.

The FID values themselves need scipy's ``sqrtm`` of a 2048 × 2048 matrix (pytorch-fid's method, shared with
CLIP-FD through ``frechet_distance``): about 25 s each on one core, so the two tests that compute one are
``slow``; every other step of the path (network, features, loading, refusals) is checked fast."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.evaluation import inception_fid as fid
from sd_core.evaluation.checkpoint_eval import EvalSettings, EvaluationError

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision's Inception3 with aux logits and 1000 classes has 27,161,264 parameters (the `num_params` of
# torchvision's Inception_V3_Weights); pytorch-fid's FID Inception drops the aux classifier and has 1008 classes.
TORCHVISION_INCEPTION_V3 = 27_161_264
AUX_LOGITS = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)
FC_1000, FC_1008 = 2048 * 1000 + 1000, 2048 * 1008 + 1008
FID_INCEPTION_PARAMS = TORCHVISION_INCEPTION_V3 - AUX_LOGITS - FC_1000 + FC_1008  # 23,850,960

# Keys of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's names) and their shapes.
KNOWN_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _randomised(seed: int = 0) -> fid.FIDInceptionV3:
    """A FID Inception with random weights *and* random BatchNorm statistics (so a load that dropped them
    would show), in eval mode."""
    torch.manual_seed(seed)
    model = fid.fid_inception_v3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A state dict saved under the real file's name, as pytorch-fid's weights are saved (torch.save)."""
    path = tmp_path_factory.mktemp("fid") / fid.WEIGHTS_FILE
    torch.save(_randomised().state_dict(), path)
    return path


def _images(seed: int, n: int = 4, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_the_network_has_pytorch_fids_parameter_names_shapes_and_count():
    state = fid.fid_inception_v3().state_dict()
    for key, shape in KNOWN_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not [k for k in state if k.startswith("AuxLogits")]  # pytorch-fid builds it with aux_logits=False
    assert sum(p.numel() for p in fid.fid_inception_v3().parameters()) == FID_INCEPTION_PARAMS == 23_850_960
    blocks = {name: type(m).__name__ for name, m in fid.fid_inception_v3().named_children()}
    assert blocks["Mixed_5b"] == "FIDInceptionA" and blocks["Mixed_6e"] == "FIDInceptionC"
    assert blocks["Mixed_7b"] == "FIDInceptionE_1" and blocks["Mixed_7c"] == "FIDInceptionE_2"


def test_a_saved_state_dict_round_trips_and_gives_2048_d_pool3_features(weights_file):
    reference = _randomised()
    loaded = fid.load_fid_inception(weights_file)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = _images(0) + _images(1, n=1, size=48)  # sizes may differ: every image is resized to 299
    features = fid.inception_features(loaded, images, batch_size=4)
    assert features.shape == (5, fid.FEATURE_DIM) and features.dtype == np.float64 and np.isfinite(features).all()
    np.testing.assert_allclose(features, fid.inception_features(reference, images), rtol=1e-5, atol=1e-6)
    assert (features >= 0).all()  # pool3 averages ReLU outputs


def test_a_file_without_batchnorm_step_counters_loads(tmp_path):
    # state dicts saved before torch 0.4.1 have no num_batches_tracked (unused in eval mode)
    state = {k: v for k, v in _randomised(1).state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / fid.WEIGHTS_FILE
    torch.save(state, path)
    loaded = fid.load_fid_inception(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_option_accepts_the_file_and_refuses_a_missing_one(weights_file, tmp_path):
    assert EvalSettings(inception_weights=str(weights_file)).check().inception_weights == str(weights_file)
    missing = tmp_path / "nowhere" / fid.WEIGHTS_FILE
    with pytest.raises(EvaluationError, match=rf"inception_weights {missing} not found.*{fid.WEIGHTS_FILE}"):
        EvalSettings(inception_weights=str(missing)).check()
    with pytest.raises(fid.InceptionWeightsError, match=rf"{missing} not found.*{fid.WEIGHTS_FILE}"):
        fid.load_fid_inception(missing)


def test_torchvisions_imagenet_inception_is_refused_with_the_mismatch(tmp_path):
    # the layout torchvision's inception_v3_google file has: an aux classifier and 1000 classes
    state = dict(fid.fid_inception_v3().state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    state["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del state["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)
    with pytest.raises(fid.InceptionWeightsError) as err:
        fid.load_fid_inception(path)
    message = str(err.value)
    assert str(path) in message and fid.WEIGHTS_FILE in message
    assert "1 missing keys: Mixed_7c.branch_pool.conv.weight" in message
    assert "2 unexpected keys: AuxLogits.conv0.conv.weight, AuxLogits.fc.weight" in message
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in message and "of 566 expected keys" in message


class _NotAWeight:
    pass


@pytest.mark.parametrize("content", ["garbage", "code", "list"])
def test_unreadable_or_foreign_files_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "garbage":
        path.write_bytes(b"\x00not a torch file\xff" * 10)
    elif content == "code":  # a pickled object: weights_only refuses to construct it
        torch.save({"fc.weight": _NotAWeight()}, path)
    else:
        torch.save([torch.zeros(3)], path)
    with pytest.raises(fid.InceptionWeightsError, match=str(path)) as err:
        fid.load_fid_inception(path)
    expected = "not a state dict" if content == "list" else "not a readable torch weights file"
    assert expected in str(err.value) and fid.WEIGHTS_FILE in str(err.value)


def test_checkpoint_eval_fails_clearly_on_a_missing_weights_file(tmp_path):
    from sd_assets.assets.evaluation import checkpoint_eval
    from sd_assets.resources import SDConfig
    from sampling_support import save_tiny_checkpoint
    from sd_core.config import Profile
    from sd_core.model.unet import UNetModel

    profile = Profile.tiny(tmp_path / "data").with_overrides(
        {"unet": {"ch": 16, "ch_mults": [1, 2], "res_blks": 1, "attn_lvls": [2], "heads": 2, "norm_groups": 8}})
    save_tiny_checkpoint(profile.checkpoints_dir / "run", UNetModel(profile.unet), step=2)
    missing = tmp_path / fid.WEIGHTS_FILE
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match=rf"{missing} not found"):
        dg.materialize([checkpoint_eval], instance=instance,
                       run_config={"ops": {"checkpoint_eval": {"config": {"inception_weights": str(missing)}}}},
                       resources={"sd": SDConfig(profile="tiny", data_root=str(profile.data_root))})


@pytest.mark.slow  # two 2048-d sqrtm (~25 s each on one core)
def test_fid_is_about_zero_for_identical_sets_and_positive_otherwise(weights_file):
    reference = fid.InceptionReference.build(weights_file, _images(0))
    same = reference.fid(_images(0))
    other = reference.fid(_images(1))
    assert math.isfinite(other) and other > 0
    assert abs(same) < 1e-3 * other


@pytest.mark.slow  # a small sd15-like run scored end to end, one 2048-d sqrtm (~25 s on one core)
def test_the_sd15_evaluator_reports_fid_inception_on_its_clip_fd_images(weights_file, tmp_path):
    from sampling_support import sd15_like_checkpoint, tiny_vae
    from sd_core.config import Profile
    from sd_core.evaluation.checkpoint_eval import Evaluator
    from train_support import SMALL_UNET, make_tiny_data

    profile = Profile.tiny(tmp_path / "data").with_overrides({
        **SMALL_UNET,
        "sample": {"steps": 2, "height": 32, "width": 32, "seeds": [0, 1]}})
    make_tiny_data(profile)
    tiny_vae().save_pretrained(profile.components_dir / "vae")
    (profile.components_dir / "build.json").write_text('{"profile": "tiny", "note": "test components"}')
    sd15_like, clip_dir, ckpt = sd15_like_checkpoint(profile, tmp_path)
    settings = EvalSettings(clip_model=str(clip_dir), clip_prompts=4, eps_buckets=2,
                            inception_weights=str(weights_file))
    metrics = Evaluator(sd15_like, settings, ckpt).score(ckpt).metrics
    assert metrics["clip_n"] == 4 and math.isfinite(metrics["clip_fd"])
    assert math.isfinite(metrics["fid_inception"]) and metrics["fid_inception"] >= 0
