"""Evaluation metrics: the FID Inception network, FID/sFID, IS, precision/recall, ADM batches.

The Inception runs with random weights in the pytorch-fid layout; its forward is checked
against a PyTorch reference written with torch.nn.functional from torchvision's block
definitions and the FID graph's patches, so layouts, paddings and pools are checked against
independent kernels. The metrics are checked against closed forms and plain numpy/scipy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax import traverse_util

from dydit_jax.convert import CheckpointMismatchError
from dydit_jax.evaluation import evaluator, inception
from dydit_jax.evaluation.fid import (FIDStatistics, compute_statistics, fid_from_features,
                                      frechet_distance)
from dydit_jax.evaluation.inception_score import inception_score
from dydit_jax.evaluation.precision_recall import manifold_radii, precision_recall
from dydit_jax.evaluation.reference_batch import (iter_images, read_reference_batch,
                                                  write_reference_batch)

# ----------------------------------------------------------------------------------------------
# The Inception network
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_state_dict():
    """Random weights under the pytorch-fid names and shapes (He-scaled convs, BatchNorm
    statistics near the identity), plus the two keys the model ignores."""
    rng = np.random.default_rng(0)
    abstract = inception.abstract_variables()
    sd = {}
    for collection, tree in abstract.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            name = inception.torch_name(collection, path)
            shape = inception._torch_shape(leaf.shape)
            if name.endswith("conv.weight"):
                fan_in = np.prod(shape[1:])
                value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            elif name == "fc.weight":
                value = rng.normal(0, 2048 ** -0.5, shape)
            elif name.endswith("running_var"):
                value = rng.uniform(0.5, 1.5, shape)
            elif name.endswith("bn.weight"):
                value = rng.uniform(0.8, 1.2, shape)
            else:
                value = rng.normal(0, 0.1, shape)
            sd[name] = value.astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 1, (1008,)).astype(np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
    return sd


@pytest.fixture(scope="module")
def variables(random_state_dict):
    return inception.from_pytorch(random_state_dict)


def test_key_set_is_the_pytorch_fid_one(random_state_dict):
    # 94 conv+BatchNorm units (5 tensors each) and fc.weight; fc.bias is loaded nowhere.
    assert len(random_state_dict) - 2 == 94 * 5 + 1
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_6d.branch7x7dbl_5.bn.running_var",
                "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"):
        assert key in random_state_dict
    assert random_state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)


def test_output_and_block_shapes_at_299():
    model = inception.InceptionV3()
    abstract = inception.abstract_variables()
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.uint8)  # resized to 299 inside
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        abstract, images)
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 17, 17, 7)
    assert out["logits"].shape == (2, 1008)
    shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items()
              if k != "__call__"}
    assert shapes["Conv2d_1a_3x3"] == (2, 149, 149, 32)
    assert shapes["Conv2d_4a_3x3"] == (2, 71, 71, 192)
    assert shapes["Mixed_5b"] == (2, 35, 35, 256)
    assert shapes["Mixed_5d"] == (2, 35, 35, 288)
    assert shapes["Mixed_6a"] == (2, 17, 17, 768)
    assert shapes["Mixed_6d"] == (2, 17, 17, 768)
    assert shapes["Mixed_7a"] == (2, 8, 8, 1280)
    assert shapes["Mixed_7c"] == (2, 8, 8, 2048)


def _resize_reference(img, out_h, out_w):
    """TF1 legacy bilinear from its definition: output (i, j) reads the input at
    (i * in_h / out_h, j * in_w / out_w), lower neighbour floor(.), upper one clamped."""
    def taps(n_in, n_out):
        src = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo)[:, None]

    out = np.zeros((out_h, out_w, img.shape[2]), np.float64)
    x0, x1, fx = taps(img.shape[1], out_w)
    for i in range(out_h):
        y = i * img.shape[0] / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, img.shape[0] - 1), y - y0
        top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
        bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
        out[i] = top * (1 - fy) + bottom * fy
    return out


def test_resize_is_tensorflow1_legacy_bilinear():
    # Legacy TF1 samples at i * in / out: [0, 10] -> [0, 5, 10, 10] (half-pixel would give
    # [0, 2.5, 7.5, 10]).
    row = jnp.asarray([0.0, 10.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(inception.resize_bilinear_tf1(row, (1, 4))[0, 0, :, 0],
                               [0, 5, 10, 10])
    img = np.random.default_rng(1).uniform(0, 255, (13, 9, 3)).astype(np.float32)
    out = inception.resize_bilinear_tf1(jnp.asarray(img)[None], (29, 17))[0]
    np.testing.assert_allclose(out, _resize_reference(img, 29, 17), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(inception.resize_bilinear_tf1(jnp.asarray(img)[None],
                                                                (13, 9))[0], img)


def _torch_inception(sd, x):
    """The FID Inception-v3 with torch.nn.functional. x: NCHW, already resized and scaled."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

    def c(name, x, stride=1, padding=0):
        x = F.conv2d(x, t[name + ".conv.weight"], stride=stride, padding=padding)
        x = F.batch_norm(x, t[name + ".bn.running_mean"], t[name + ".bn.running_var"],
                         t[name + ".bn.weight"], t[name + ".bn.bias"], eps=1e-3)
        return F.relu(x)

    def avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    def block_a(n, x):
        b5 = c(n + ".branch5x5_2", c(n + ".branch5x5_1", x), padding=2)
        b3 = c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x), padding=1)
        return torch.cat([c(n + ".branch1x1", x), b5, c(n + ".branch3x3dbl_3", b3, padding=1),
                          c(n + ".branch_pool", avg(x))], 1)

    def block_b(n, x):
        b3 = c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x), padding=1)
        return torch.cat([c(n + ".branch3x3", x, stride=2),
                          c(n + ".branch3x3dbl_3", b3, stride=2), F.max_pool2d(x, 3, 2)], 1)

    def block_c(n, x):
        b7 = c(n + ".branch7x7_2", c(n + ".branch7x7_1", x), padding=(0, 3))
        b7 = c(n + ".branch7x7_3", b7, padding=(3, 0))
        d = c(n + ".branch7x7dbl_1", x)
        for i, pad in enumerate([(3, 0), (0, 3), (3, 0), (0, 3)], start=2):
            d = c(f"{n}.branch7x7dbl_{i}", d, padding=pad)
        return torch.cat([c(n + ".branch1x1", x), b7, d, c(n + ".branch_pool", avg(x))], 1)

    def block_d(n, x):
        b3 = c(n + ".branch3x3_2", c(n + ".branch3x3_1", x), stride=2)
        b7 = c(n + ".branch7x7x3_2", c(n + ".branch7x7x3_1", x), padding=(0, 3))
        b7 = c(n + ".branch7x7x3_4", c(n + ".branch7x7x3_3", b7, padding=(3, 0)), stride=2)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)

    def block_e(n, x, pool):
        b3 = c(n + ".branch3x3_1", x)
        d = c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x), padding=1)
        p = avg(x) if pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([c(n + ".branch1x1", x),
                          c(n + ".branch3x3_2a", b3, padding=(0, 1)),
                          c(n + ".branch3x3_2b", b3, padding=(1, 0)),
                          c(n + ".branch3x3dbl_3a", d, padding=(0, 1)),
                          c(n + ".branch3x3dbl_3b", d, padding=(1, 0)),
                          c(n + ".branch_pool", p)], 1)

    x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x, stride=2)), padding=1)
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(name, x)
    x = block_b("Mixed_6a", x)
    x = block_c("Mixed_6c", block_c("Mixed_6b", x))
    # mixed_6/conv of the TF graph: Mixed_6d's 1x1 branch, computed on its own here.
    spatial = c("Mixed_6d.branch1x1", x)[:, :7]
    x = block_c("Mixed_6e", block_c("Mixed_6d", x))
    x = block_e("Mixed_7b", block_d("Mixed_7a", x), "avg")
    x = block_e("Mixed_7c", x, "max")
    pool = x.mean(dim=(2, 3))
    return {"pool": pool, "spatial": spatial.permute(0, 2, 3, 1), "logits": pool @ t["fc.weight"].T}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(variables, images):
    """Through the evaluator's extraction: the second image is a batch of one, padded to 2."""
    return evaluator.extract_features(inception.InceptionV3(), variables,
                                      [images[:1], images[1:]], batch_size=2)


def test_forward_matches_a_pytorch_reference(random_state_dict, features, images):
    resized = np.stack([_resize_reference(im.astype(np.float64), 299, 299) for im in images])
    x = torch.from_numpy(((resized - 128) / 128).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = _torch_inception(random_state_dict, x)
    for key in ("pool", "spatial", "logits"):
        want = ref[key].numpy()
        np.testing.assert_allclose(features[key], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max(), err_msg=key)
    # The unused fc.bias really is unused: the logits are pool @ W^T.
    np.testing.assert_allclose(features["logits"],
                               np.asarray(features["pool"]) @ random_state_dict["fc.weight"].T,
                               rtol=1e-5, atol=1e-5)


def test_convert_once_then_load_without_torch(tmp_path, random_state_dict, variables):
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in random_state_dict.items()}, pth)
    out = tmp_path / "inception_fid.npz"
    inception.main(["--convert", str(pth), "--out", str(out)])
    with np.load(out) as f:
        assert "fc.bias" not in f.files and len(f.files) == 94 * 5 + 1
    model, loaded = inception.load_inception(str(out))
    assert model.image_size == 299
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


def test_weight_mismatches_are_all_listed(random_state_dict):
    sd = dict(random_state_dict)
    del sd["Mixed_5b.branch_pool.bn.running_mean"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["Mixed_6b.branch7x7_2.conv.weight"] = sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(
        0, 1, 3, 2)  # a 7x1 kernel where the graph has 1x7
    with pytest.raises(CheckpointMismatchError, match="torchvision's ImageNet") as err:
        inception.from_pytorch(sd)
    assert err.value.missing == ["Mixed_5b.branch_pool.bn.running_mean"]
    assert err.value.unexpected == ["AuxLogits.fc.weight"]
    assert err.value.mismatched == [("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7),
                                     (128, 128, 7, 1))]


def test_missing_weight_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.load_inception(str(tmp_path / "inception_fid.npz"))


# ----------------------------------------------------------------------------------------------
# FID and sFID
# ----------------------------------------------------------------------------------------------

def _fid_by_eigh(x, y):
    """Independent FID: numpy statistics, tr sqrt(A^1/2 B A^1/2) from symmetric eigensolvers."""
    mu1, mu2 = x.mean(0), y.mean(0)
    a, b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b @ root_a), 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * tr_covmean


def test_fid_matches_an_independent_computation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) + 0.5
    np.testing.assert_allclose(fid_from_features(x, y), _fid_by_eigh(x, y), rtol=1e-8)
    stats = compute_statistics(x.astype(np.float32))
    assert stats.mu.dtype == np.float64 and stats.sigma.shape == (32, 32)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float32).astype(np.float64),
                                                   rowvar=False))


def test_identical_sets_give_zero():
    x = np.random.default_rng(4).normal(size=(200, 64)).astype(np.float32)
    assert abs(fid_from_features(x, x)) < 1e-8


def test_shifted_gaussians_follow_the_closed_form():
    # FID(N(0, I), N(m, s^2 I)) = |m|^2 + d (1 - s)^2, from the statistics directly ...
    d, s = 16, 1.5
    m = np.linspace(-1, 1, d)
    fid = frechet_distance(FIDStatistics(np.zeros(d), np.eye(d)),
                           FIDStatistics(m, s ** 2 * np.eye(d)))
    np.testing.assert_allclose(fid, m @ m + d * (1 - s) ** 2, rtol=1e-10)
    # ... and from samples, up to sampling error.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20000, d))
    y = m + s * rng.normal(size=(20000, d))
    np.testing.assert_allclose(fid_from_features(x, y), m @ m + d * (1 - s) ** 2, rtol=0.05)


def test_sfid_flattens_spatial_features_in_hwc_order():
    rng = np.random.default_rng(6)
    spatial = rng.normal(size=(50, 17, 17, 7))
    stats = compute_statistics(spatial)
    assert stats.mu.shape == (2023,)
    np.testing.assert_allclose(stats.mu[:7], spatial[:, 0, 0, :].mean(0))
    np.testing.assert_allclose(stats.mu[7:14], spatial[:, 0, 1, :].mean(0))


def test_statistics_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2048,\) vs \(2023,\)"):
        frechet_distance(FIDStatistics(np.zeros(2048), np.eye(2048)),
                         FIDStatistics(np.zeros(2023), np.eye(2023)))
    with pytest.raises(ValueError, match="sigma"):
        FIDStatistics(np.zeros(3), np.eye(4))


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------

def test_inception_score_on_known_distributions():
    # The same distribution for every sample: KL = 0, IS = 1.
    assert inception_score(np.zeros((100, 1008)), num_splits=10) == pytest.approx(1.0)
    # Confident and uniform over 100 classes in every split: IS = 100.
    labels = np.tile(np.arange(100), 10)
    one_hot = 1000.0 * np.eye(1008)[labels]
    assert inception_score(one_hot, num_splits=10) == pytest.approx(100.0, rel=1e-6)


def test_inception_score_matches_the_entropy_form():
    # IS of one split = exp(H(mean_x p) - mean_x H(p)).
    logits = np.random.default_rng(7).normal(0, 3, (500, 20))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 5):
        marginal = part.mean(0)
        h_marginal = -(marginal * np.log(marginal)).sum()
        h_cond = -(part * np.log(part)).sum(1).mean()
        scores.append(np.exp(h_marginal - h_cond))
    assert inception_score(logits, num_splits=5) == pytest.approx(np.mean(scores), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------

def _brute_force_pr(ref, samples, k=3):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    d = np.linalg.norm(samples[:, None] - ref[None], axis=-1)
    precision = np.mean(np.any(d <= radii(ref)[None], axis=1))
    recall = np.mean(np.any(d.T <= radii(samples)[None], axis=1))
    return precision, recall


def test_precision_recall_on_a_line():
    ref = np.stack([np.arange(10.0), np.zeros(10)], 1)
    # 3rd nearest neighbour: 3 away at the ends (0 -> 3, 9 -> 6), 2 away inside.
    np.testing.assert_allclose(np.sqrt(manifold_radii(ref)), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    samples = np.array([[4.5, 0], [-3, 0], [12.5, 0], [50, 0], [51, 0], [52, 0], [53, 0]])
    precision, recall = precision_recall(ref, samples)
    # Inside the reference manifold: 4.5, and -3 (exactly on the ball of 0); 12.5 is 3.5 from 9.
    assert precision == pytest.approx(2 / 7)
    # The sample at 4.5 has its 3rd neighbour at 50 (45.5 away): its ball covers every reference.
    assert recall == 1.0
    assert (precision, recall) == pytest.approx(_brute_force_pr(ref, samples))


def test_precision_recall_matches_brute_force_with_blocks():
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(70, 8)).astype(np.float32)
    samples = (rng.normal(size=(50, 8)) * 1.3 + 0.4).astype(np.float32)
    got = precision_recall(ref, samples, block=16)  # blocks of 16 rows, the last ones padded
    assert got == pytest.approx(_brute_force_pr(ref, samples))
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_identical_and_disjoint_sets():
    x = np.random.default_rng(9).normal(size=(40, 5))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# ADM batches and the evaluator
# ----------------------------------------------------------------------------------------------

def test_reference_batch_round_trip_and_streaming(tmp_path):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (7, 8, 6, 3), dtype=np.uint8)
    pool, spatial = rng.normal(size=(7, 16)), rng.normal(size=(7, 2, 2, 7))
    path = write_reference_batch(str(tmp_path / "ref"), images, pool, spatial)
    batch = read_reference_batch(path)
    assert (batch.num_images, batch.image_shape) == (7, (8, 6, 3))
    np.testing.assert_allclose(batch.pool.sigma, np.cov(pool, rowvar=False))
    np.testing.assert_allclose(batch.spatial.mu, spatial.reshape(7, -1).mean(0))
    chunks = list(iter_images(path, 3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), images)


def test_reads_the_adm_layout_written_by_numpy(tmp_path):
    """As VIRTUAL_imagenet256_labeled.npz: arr_0 plus mu, sigma, mu_s, sigma_s (compressed
    members stream too)."""
    images = np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3)
    mu, sigma = np.ones(2048), np.eye(2048)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma,
                        mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    batch = read_reference_batch(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(batch.pool.mu, mu)
    assert batch.spatial.sigma.shape == (2023, 2023)
    np.testing.assert_array_equal(np.concatenate(list(batch.iter_images(3))), images)
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.arange(4))
    samples = read_reference_batch(str(tmp_path / "samples.npz"))
    assert samples.pool is None and samples.spatial is None


def test_batch_layout_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match="arr_0"):
        read_reference_batch(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 NHWC"):
        read_reference_batch(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(3))
    with pytest.raises(KeyError, match="sigma"):
        read_reference_batch(str(tmp_path / "c.npz"))


class _TinyFeatures(nn.Module):
    """A stand-in for the Inception with the same outputs at small sizes (16-d pool, 2x2x3
    spatial, 10 logits), so the evaluator's wiring is tested without 2048-d matrix roots."""

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 255.0
        spatial = nn.avg_pool(x, (4, 4), strides=(4, 4))[:, :2, :2]
        pool = jnp.tanh(nn.Dense(16)(x.reshape(len(x), -1)))
        return {"pool": pool, "spatial": spatial, "logits": nn.Dense(10)(pool)}


def test_evaluate_npz_wires_the_adm_evaluation(tmp_path):
    rng = np.random.default_rng(11)
    model = _TinyFeatures()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8))
    ref_images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    sample_images = (rng.integers(0, 200, (20, 8, 8, 3)) + 30).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    write_reference_batch(str(tmp_path / "plain.npz"), ref_images)
    ref = evaluator.extract_features(model, variables, [ref_images[:16], ref_images[16:]], 16)
    sample = evaluator.extract_features(model, variables, [sample_images], 32)

    metrics = evaluator.evaluate_npz(str(tmp_path / "samples.npz"), str(tmp_path / "plain.npz"),
                                     model, variables, batch_size=16, num_splits=2)
    expected = {"inception_score": inception_score(sample["logits"], 2),
                "fid": fid_from_features(sample["pool"], ref["pool"]),
                "sfid": fid_from_features(sample["spatial"], ref["spatial"])}
    expected["precision"], expected["recall"] = precision_recall(ref["pool"], sample["pool"])
    assert metrics == pytest.approx(expected, rel=1e-5)
    assert metrics["fid"] > 0.01

    # Stored reference statistics are used instead of the reference features' own.
    write_reference_batch(str(tmp_path / "stored.npz"), ref_images, sample["pool"],
                          sample["spatial"])
    stored = evaluator.evaluate_npz(str(tmp_path / "samples.npz"), str(tmp_path / "stored.npz"),
                                    model, variables, batch_size=16, num_splits=2)
    assert stored["fid"] == pytest.approx(0.0, abs=1e-6)
    assert stored["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert stored["precision"] == pytest.approx(metrics["precision"])
