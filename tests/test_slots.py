"""The shared time-slot helpers of the slot-driven systems (plate, circuit): actors/systems/slots.py."""
import torch

from actors.systems.slots import (perm_buffer, slot_controls, slot_permutation, window_ends,
                                  window_mean)


def test_interleave_is_a_permutation_with_theta_spread_evenly():
    perm = slot_permutation(64, 32, "interleave")
    assert sorted(perm.tolist()) == list(range(96))
    theta_slots = [s for s, c in enumerate(perm.tolist()) if c >= 64]
    assert theta_slots == [3 * j + 1 for j in range(32)]  # one theta slot in every 3, centred
    assert [c for c in perm.tolist() if c < 64] == list(range(64))  # x keeps its order
    assert slot_permutation(64, 32, "concat") is None
    assert slot_permutation(64, 0, "interleave") is None


def test_slot_controls_orders_x_and_theta_in_time():
    x = torch.arange(6.0).reshape(2, 3)
    theta = torch.tensor([10.0, 11.0])
    u = slot_controls(x, theta, perm_buffer(slot_permutation(3, 2, "interleave")))
    assert u.shape == (2, 5)
    expected_perm = slot_permutation(3, 2, "interleave").tolist()
    assert expected_perm == [0, 3, 1, 4, 2]  # theta slots at round((j + 0.5) * 5 / 2 - 0.5) = 1, 3
    full = torch.cat([x, theta.expand(2, -1)], dim=1)
    assert torch.equal(u, full[:, expected_perm])
    assert torch.equal(slot_controls(x, theta, perm_buffer(None)), full)


def test_window_mean_partitions_the_record():
    avg = window_mean(100, 7)
    assert avg.shape == (100, 7)
    assert torch.allclose(avg.sum(0), torch.ones(7))  # each window is a mean
    assert torch.equal((avg > 0).sum(1), torch.ones(100, dtype=torch.long))  # each sample in one window
    owner = avg.argmax(1)
    assert torch.all(owner[1:] >= owner[:-1])  # windows are contiguous and in order


def test_window_ends_fall_at_equal_fractions_of_the_record():
    for steps, n_out in ((384, 10), (384, 13), (7, 3), (10, 10)):
        ends = window_ends(steps, n_out)
        assert sorted(j for lst in ends.values() for j, _ in lst) == list(range(n_out))
        for k, lst in ends.items():
            for j, f in lst:
                assert 0.0 < f <= 1.0  # inside step k, its end included
                assert abs(k + f - (j + 1) * steps / n_out) < 1e-9
