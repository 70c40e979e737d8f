"""FVD: the Flax I3D against cd-fvd's PyTorch InceptionI3d, its converter, preprocessing, FVD.

The reference is `cdfvd.third_party.i3d.pytorch_i3d` (pip install --no-deps cd-fvd; it needs
only torch and numpy), the network TATS and cd-fvd compute FVD with, here with random weights:
He-scaled convolutions and random BatchNorm scales, shifts and running statistics, so that no
BatchNorm is the identity and activations stay O(1) through the ~60 layers. Submodules are
compared separately (odd and even sizes, strides 1 and 2: the asymmetric "SAME" padding),
then the whole network. The Frechet distance is checked against a float64 scipy computation
written here; the frame resize against torch's F.interpolate.

Tolerances: float32. XLA's and PyTorch's CPU convolutions sum in different orders, so each of
the ~60 convolutions of the network (fan-in up to 3x3x3x192) leaves ~1e-6 relative rounding
differences, which grow through depth (measured: 4e-7 of the largest feature and logit). The
whole network and each submodule are held to 1e-5 of their largest output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from cdfvd.third_party.i3d import pytorch_i3d
from flax import linen as nn
from flax import traverse_util

from dydit_jax.convert import CheckpointMismatchError
from dydit_jax.evaluation import fvd, i3d
from dydit_jax.evaluation.inception import torch_name
from dydit_jax.evaluation.video_metrics import video_metrics


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and BatchNorm statistics for a reference module, in eval mode."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            shape = tuple(t.shape)
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv3d.weight"):
                value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
            elif name.endswith("bn.weight"):
                value = rng.uniform(0.7, 1.3, shape)
            elif name.endswith("running_var"):
                value = rng.uniform(0.5, 1.5, shape)
            else:  # bn.bias, running_mean, the logits bias
                value = rng.normal(0, 0.2, shape)
            t.copy_(torch.from_numpy(value.astype(np.float32)))
    return module.eval()


def flax_variables(module: torch.nn.Module, flax_module: nn.Module, x) -> dict:
    """The reference module's weights as the variables of `flax_module` (for submodules)."""
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    abstract = jax.eval_shape(flax_module.init, jax.random.PRNGKey(0), x)
    out = {}
    for collection, tree in abstract.items():
        flat = {}
        for path in traverse_util.flatten_dict(tree):
            value = state[torch_name(collection, path)]
            flat[path] = jnp.asarray(value.transpose(2, 3, 4, 1, 0) if value.ndim == 5 else value)
        out[collection] = traverse_util.unflatten_dict(flat)
    return out


def run_torch(module, x_ndhwc):
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x_ndhwc.transpose(0, 4, 1, 2, 3))))


def to_ndhwc(y):
    return y.numpy().transpose(0, 2, 3, 4, 1)


def assert_close(actual, expected, rel):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err < rel, f"max error {err:.3g} of the largest |value| (allowed {rel})"


def random_videos(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Submodules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,stride,size", [
    ((7, 7, 7), (2, 2, 2), (9, 12, 11)),   # Conv3d_1a: odd and even sizes under stride 2
    ((3, 3, 3), (1, 1, 1), (4, 5, 6)),
    ((1, 1, 1), (1, 1, 1), (3, 4, 5)),
])
def test_unit3d_matches_reference(kernel, stride, size):
    ref = randomise(pytorch_i3d.Unit3D(5, 8, kernel_shape=kernel, stride=stride), seed=1)
    ours = i3d.Unit3D(8, kernel, stride)
    x = random_videos((2,) + size + (5,))
    assert_close(ours.apply(flax_variables(ref, ours, x), x), to_ndhwc(run_torch(ref, x)), 1e-5)


def test_logits_unit_matches_reference():
    """The logits unit: a bias, no BatchNorm, no ReLU."""
    ref = randomise(pytorch_i3d.Unit3D(16, 10, activation_fn=None, use_batch_norm=False,
                                       use_bias=True), seed=2)
    ours = i3d.Unit3D(10, use_batch_norm=False, use_bias=True, activation=False)
    x = random_videos((2, 2, 1, 1, 16))
    assert_close(ours.apply(flax_variables(ref, ours, x), x), to_ndhwc(run_torch(ref, x)), 1e-5)


@pytest.mark.parametrize("kernel,stride,size", [
    ((1, 3, 3), (1, 2, 2), (3, 7, 8)),     # MaxPool3d_2a / 3a
    ((3, 3, 3), (2, 2, 2), (5, 13, 14)),   # MaxPool3d_4a
    ((2, 2, 2), (2, 2, 2), (3, 7, 6)),     # MaxPool3d_5a: padding at the back only
    ((3, 3, 3), (1, 1, 1), (2, 4, 5)),     # the Inception modules' pool branch
])
def test_max_pool_matches_reference(kernel, stride, size):
    """Zero "SAME" padding (the inputs here are signed, so -inf padding would differ)."""
    ref = pytorch_i3d.MaxPool3dSamePadding(kernel_size=kernel, stride=stride, padding=0)
    x = random_videos((2,) + size + (3,))
    np.testing.assert_array_equal(i3d.max_pool_same(jnp.asarray(x), kernel, stride),
                                  to_ndhwc(run_torch(ref, x)))


def test_inception_module_matches_reference():
    channels = (4, 3, 5, 2, 6, 7)
    ref = randomise(pytorch_i3d.InceptionModule(6, list(channels), "Mixed"), seed=3)
    ours = i3d.InceptionModule(channels)
    x = np.maximum(random_videos((2, 3, 5, 6, 6)), 0)   # a ReLU output, as in the network
    assert_close(ours.apply(flax_variables(ref, ours, x), x), to_ndhwc(run_torch(ref, x)), 1e-5)


# ----------------------------------------------------------------------------------------------
# The network and its weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomise(pytorch_i3d.InceptionI3d(400, in_channels=3), seed=4)


@pytest.fixture(scope="module")
def state_dict(reference):
    return {k: v.numpy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def variables(state_dict):
    return i3d.from_pytorch(state_dict)


def test_i3d_matches_reference(reference, variables):
    """Features and logits of the whole network. 17 frames at 193x224: time leaves 3 steps,
    so the final pool has 2 windows to average; 193 pads asymmetrically at MaxPool3d_5a, 224
    at Conv3d_1a; the final grid is 7x7 (the smallest input the final pool takes)."""
    x = random_videos((2, 17, 193, 224, 3), seed=5)
    out = jax.jit(i3d.InceptionI3d().apply)(variables, jnp.asarray(x))
    pooled = []   # the final average pool's output [B, 1024, T'', 1, 1], seen in one forward
    hook = reference.avg_pool.register_forward_hook(lambda m, args, y: pooled.append(y))
    try:
        logits = run_torch(reference, x).numpy()
    finally:
        hook.remove()
    features = pooled[0].mean(dim=(2, 3, 4)).numpy()
    assert pooled[0].shape[2:] == (2, 1, 1)
    assert out["features"].shape == (2, i3d.FEATURE_DIM)
    assert out["logits"].shape == (2, i3d.NUM_CLASSES)
    assert_close(out["features"], features, 1e-5)
    assert_close(out["logits"], logits, 1e-5)
    assert np.abs(features).max() > 0.1 and np.abs(logits).max() > 0.1   # not vanished


def test_input_limits():
    i3d.check_video_shape((1, i3d.MIN_FRAMES, i3d.MIN_SIZE, i3d.INPUT_SIZE, 3))
    shapes = jax.eval_shape(i3d.InceptionI3d().init_with_output, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, i3d.MIN_FRAMES, i3d.MIN_SIZE, 224, 3),
                                                 jnp.float32))[0]
    assert shapes["features"].shape == (1, i3d.FEATURE_DIM)
    with pytest.raises(ValueError, match="at least 9 frames, got 8"):
        i3d.check_video_shape((1, 8, 224, 224, 3))
    with pytest.raises(ValueError, match="resize them with `preprocess`"):
        jax.eval_shape(i3d.InceptionI3d().init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 16, 256, 256, 3), jnp.float32))
    with pytest.raises(ValueError, match="NCDHW input"):
        i3d.check_video_shape((1, 3, 16, 224, 224))


def test_converter_names_every_bad_key(state_dict):
    state = dict(state_dict)
    del state["Mixed_4c.b1b.bn.running_var"]
    state["Mixed_4c.b4.conv3d.weight"] = np.zeros((1,), np.float32)
    state["Conv3d_2b_1x1.conv3d.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        i3d.from_pytorch(state)
    message = str(e.value)
    assert "missing keys (1): Mixed_4c.b1b.bn.running_var" in message
    assert "unexpected keys (1): Mixed_4c.b4.conv3d.weight" in message
    assert "shape mismatch for Conv3d_2b_1x1.conv3d.weight" in message
    assert "(64, 64, 1, 1, 1)" in message


def test_converter_file_round_trip(tmp_path, reference, variables):
    """.pt -> the CLI's .npz -> load_i3d gives the variables of the in-memory state dict."""
    pt, npz = tmp_path / "i3d.pt", tmp_path / "i3d.npz"
    torch.save(reference.state_dict(), pt)
    i3d.main(["--convert", str(pt), "--out", str(npz)])
    model, loaded = i3d.load_i3d(str(npz))
    assert isinstance(model, i3d.InceptionI3d)
    for a, b in zip(jax.tree_util.tree_leaves_with_path(loaded),
                    jax.tree_util.tree_leaves_with_path(variables)):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(FileNotFoundError, match="--convert i3d_pretrained_400.pt"):
        i3d.load_i3d(str(tmp_path / "absent.npz"))


# ----------------------------------------------------------------------------------------------
# Preprocessing, features, FVD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(256, 320), (64, 48), (300, 100), (224, 224)])
def test_preprocess_matches_torch_interpolate(height, width):
    """cd-fvd's `preprocess_i3d`: F.interpolate(bilinear, align_corners=False), 2x/255 - 1."""
    videos = np.random.default_rng(6).integers(0, 256, (2, 2, height, width, 3), np.uint8)
    frames = torch.from_numpy(videos).float().flatten(end_dim=1).permute(0, 3, 1, 2)
    resized = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    expected = (2.0 * resized / 255.0 - 1).permute(0, 2, 3, 1).reshape(2, 2, 224, 224, 3)
    np.testing.assert_allclose(i3d.preprocess(videos), expected.numpy(), rtol=0, atol=2e-6)


def numpy_frechet(a, b):
    """float64: means, N - 1 covariances, tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    s_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root_a = scipy.linalg.sqrtm(s_a).real
    cross = scipy.linalg.sqrtm(root_a @ s_b @ root_a).real
    return np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross)


def test_fvd_matches_numpy():
    rng = np.random.default_rng(7)
    a = rng.normal(0, 1, (300, 40)) @ rng.normal(0, 1, (40, 40))
    b = rng.normal(0.3, 1.5, (250, 40)) @ rng.normal(0, 1, (40, 40))
    expected = numpy_frechet(a, b)
    np.testing.assert_allclose(fvd.fvd_from_features(a.astype(np.float32),
                                                     b.astype(np.float32)), expected, rtol=1e-5)
    assert abs(fvd.fvd_from_features(a, a)) < 1e-6 * expected


class PixelStatistics(nn.Module):
    """A cheap stand-in for the networks: channel means and deviations of its input. As I3D
    it returns {"features", "logits"} of clips [B, T, H, W, 3]; as the Inception {"pool",
    "spatial", "logits"} of frames [B, H, W, 3]."""
    video: bool = True

    @nn.compact
    def __call__(self, x):
        axes = (1, 2, 3) if self.video else (1, 2)
        x = x.astype(jnp.float32)
        stats = jnp.concatenate([x.mean(axes), x.std(axes)], -1)
        stats = stats * self.param("scale", nn.initializers.ones, (1,))
        if self.video:
            return {"features": stats, "logits": stats[:, :4]}
        return {"pool": stats, "spatial": stats[:, :1], "logits": stats}


def test_extract_video_features_batches_and_gray():
    """Padding the last batch changes nothing; gray clips are the RGB clips of equal channels."""
    model = PixelStatistics()
    gray = np.random.default_rng(8).integers(0, 256, (5, 9, 32, 24, 1), np.uint8)
    variables = model.init(jax.random.PRNGKey(0), i3d.preprocess(gray[:1].repeat(3, -1)))
    batched = fvd.extract_video_features(model, variables, gray, batch_size=2)
    whole = model.apply(variables, i3d.preprocess(gray.repeat(3, -1)))
    for k in fvd.OUTPUTS:
        np.testing.assert_allclose(batched[k], whole[k], rtol=1e-6)
    np.testing.assert_allclose(
        fvd.extract_video_features(model, variables, gray.repeat(3, -1), batch_size=2)["logits"],
        batched["logits"], rtol=1e-5)
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd.extract_video_features(model, variables, gray[:, :8], batch_size=2)
    with pytest.raises(ValueError, match="expected uint8"):
        fvd.extract_video_features(model, variables, gray.astype(np.float32), batch_size=2)


def test_video_metrics():
    rng = np.random.default_rng(9)
    samples = rng.integers(0, 200, (12, 9, 16, 16, 3), np.uint8)
    reference = rng.integers(50, 256, (10, 9, 16, 16, 1), np.uint8)
    video, image = PixelStatistics(), PixelStatistics(video=False)
    v_vars = video.init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 224, 224, 3)))
    i_vars = image.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    metrics = video_metrics(samples, reference, video, v_vars, image, i_vars, batch_size=4,
                            frame_batch_size=32)
    rgb = lambda v: v.repeat(3, -1) if v.shape[-1] == 1 else v  # noqa: E731
    clip_logits = [video.apply(v_vars, i3d.preprocess(rgb(v)))["logits"]
                   for v in (samples, reference)]
    frame_pool = [image.apply(i_vars, rgb(v).reshape(-1, 16, 16, 3))["pool"]
                  for v in (samples, reference)]
    np.testing.assert_allclose(metrics["fvd"], numpy_frechet(*clip_logits), rtol=1e-4)
    np.testing.assert_allclose(metrics["fid_per_frame"], numpy_frechet(*frame_pool), rtol=1e-4)
    assert set(video_metrics(samples, reference, video, v_vars)) == {"fvd"}
