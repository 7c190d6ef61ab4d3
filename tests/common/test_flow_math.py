"""common/flow_math.py against hand-computed values (numpy; the backends' tests reuse these cases)."""

import math

import numpy as np
import pytest

from common import flow_math as fm


def test_time_from_uniform_is_beta_1p5_1_mapped_to_tmin_1():
    # u = 0.125 -> 0.125^(2/3) = 0.25 -> 0.25 * 0.999 + 0.001.
    t = fm.time_from_uniform(np.array([0.0, 0.125, 1.0]))
    np.testing.assert_allclose(t, [0.001, 0.25075, 1.0], rtol=0, atol=1e-12)
    # Distribution: CDF of Beta(1.5, 1) is t^1.5 (before the affine map); mean 0.6.
    u = np.random.default_rng(0).uniform(size=200_000)
    samples = (fm.time_from_uniform(u) - fm.T_MIN) / (1 - fm.T_MIN)
    assert abs(samples.mean() - 0.6) < 0.003
    for q in (0.1, 0.5, 0.9):
        assert abs(np.mean(samples <= q) - q ** 1.5) < 0.005
    # More mass near t = 1 (noise) than near t = 0 (data), as in pi0.
    assert np.mean(samples > 0.5) > 0.64


def test_noisy_actions_and_target_point_from_data_at_0_to_noise_at_1():
    noise = np.full((3, 2, 1), 4.0)
    actions = np.full((3, 2, 1), 2.0)
    x = fm.noisy_actions(np.array([0.0, 0.25, 1.0]), noise, actions)
    np.testing.assert_allclose(x[:, 0, 0], [2.0, 0.25 * 4 + 0.75 * 2, 4.0])
    np.testing.assert_allclose(fm.velocity_target(noise, actions), np.full((3, 2, 1), 2.0))


def test_masked_mse_ignores_padded_steps_and_divides_by_valid_entries():
    prediction = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (B=1, H=3, A=2)
    target = np.zeros_like(prediction)
    is_pad = np.array([[False, False, True]])
    # (1 + 4 + 9 + 16) / 4 valid entries.
    assert fm.masked_mse(prediction, target, is_pad) == pytest.approx(7.5)
    assert fm.masked_mse(prediction, target, None) == pytest.approx((30 + 20000) / 6)
    # A second, fully padded sample adds nothing and does not dilute the mean.
    both = np.concatenate([prediction, np.full_like(prediction, 7.0)])
    pads = np.array([[False, False, True], [True, True, True]])
    assert fm.masked_mse(both, np.zeros_like(both), pads) == pytest.approx(7.5)
    assert fm.masked_mse(both, np.zeros_like(both), np.ones((2, 3), bool)) == 0.0


def test_flow_loss_is_masked_mse_to_noise_minus_actions():
    velocity = np.array([[[1.0], [5.0]]])
    noise, actions = np.array([[[3.0], [0.0]]]), np.array([[[1.0], [0.0]]])
    # target [2, 0]; step 2 padded -> (1 - 2)^2 / 1.
    assert fm.flow_loss(velocity, noise, actions, np.array([[False, True]])) == pytest.approx(1.0)


def test_euler_sample_runs_from_t1_to_t0():
    assert fm.integration_times(4) == [1.0, 0.75, 0.5, 0.25]
    # v(x, t) = t: two steps of 0.5 at t = 1 and t = 0.5 -> x = noise - 0.5 - 0.25.
    out = fm.euler_sample(lambda x, t: np.full_like(x, t), np.full((1, 1, 1), 3.0), num_steps=2)
    assert out[0, 0, 0] == pytest.approx(2.25)
    # The exact field of the straight path to a point a, v = (x - a) / t, lands on a exactly.
    a = np.array([[[0.3, -1.2]]])
    noise = np.array([[[2.0, 5.0]]])
    np.testing.assert_allclose(fm.euler_sample(lambda x, t: (x - a) / t, noise, 10), a, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        fm.integration_times(0)


def test_sincos_embedding_hand_values():
    # dim 4: periods 4e-3 and 4.0; t = 0.5 -> angles 250 pi and pi / 4.
    emb = fm.sincos_embedding(np.array([0.5, 0.0]), 4)
    s = math.sqrt(0.5)
    np.testing.assert_allclose(emb[0], [0.0, s, 1.0, s], atol=1e-3)
    np.testing.assert_allclose(emb[1], [0.0, 0.0, 1.0, 1.0])
    assert fm.sincos_embedding(np.zeros(3), 32).shape == (3, 32)
    with pytest.raises(ValueError, match="even"):
        fm.sincos_embedding(np.zeros(1), 3)
