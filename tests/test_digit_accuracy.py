"""The demos' digit-accuracy score: real clips score ~1, noise and wrong labels do not."""
import ml_collections
import numpy as np
import pytest

from dydit_jax.data.moving_digits import MovingDigitsSource
from dydit_jax.evaluation.digit_accuracy import accuracy, digit_windows


def real_clips(n=60, canvas=20, frames=4):
    cfg = ml_collections.ConfigDict(dict(image_size=canvas, num_frames=frames, digit_scale=2,
                                         max_speed=2.0, motion_step=2, seed=5))
    src = MovingDigitsSource(cfg, process_index=0, process_count=1, local_batch_size=n)
    batch = src.clips(np.arange(0, 17 * n, 17))         # spread over the 1,797 digits
    uint8 = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)
    return uint8, batch["label"]


def test_real_moving_digits_score_near_one_and_wrong_answers_do_not():
    clips, labels = real_clips()
    # The classifier was fitted on these digits: only the window search and the pooling
    # (exact inverses of the clip's placement and upsampling) stand between them.
    score = accuracy(clips, labels)
    assert score["frame_accuracy"] >= 0.98 and score["clip_accuracy"] >= 0.98
    assert score["consistent_clips"] >= 0.95 and score["frames"] == 4
    assert accuracy(clips, (labels + 1) % 10)["frame_accuracy"] <= 0.05
    noise = np.random.RandomState(0).randint(0, 256, clips.shape).astype(np.uint8)
    assert accuracy(noise, labels)["frame_accuracy"] <= 0.3
    # Images [N, S, S, 1] score per image; the window finds a digit anywhere on the canvas.
    assert accuracy(clips[:, 0], labels)["frame_accuracy"] >= 0.98
    window = digit_windows(clips[:1, 0], 2).reshape(8, 8)
    from sklearn.datasets import load_digits
    # uint8 rounding: at most half a level of 255 in the 0..16 scale.
    np.testing.assert_allclose(window, load_digits().images[0], atol=16 * 0.5 / 255 + 1e-9)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="labels must be"):
        accuracy(np.zeros((3, 16, 16, 1), np.uint8), np.zeros(2, int))
    with pytest.raises(ValueError, match="cannot hold a digit"):
        digit_windows(np.zeros((1, 12, 12), np.uint8), 2)
    with pytest.raises(ValueError, match="gray"):
        digit_windows(np.zeros((1, 16, 16, 3), np.uint8), 2)


def test_command_line_scores_sample_files(tmp_path, capsys):
    import json
    from dydit_jax.evaluation import digit_accuracy
    clips, labels = real_clips(n=10)
    np.savez(tmp_path / "samples.npz", clips, labels)
    digit_accuracy.main([str(tmp_path / "samples.npz")])
    score = json.loads(capsys.readouterr().out.split(" ", 1)[1])
    assert score["clip_accuracy"] == 1.0 and score["samples"] == 10
