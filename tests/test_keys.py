"""Keyed randomness: noise and fork keys are pure functions of their keys."""

from __future__ import annotations

import torch

from moesteer.keys import child_key, fork_keys, gumbel_noise


def test_gumbel_noise_is_a_function_of_its_keys():
    pos = torch.tensor([0, 1, 2, 3])
    prompt, zero = torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long)
    noise = gumbel_noise(7, (prompt, zero, zero, 2, pos), 16)
    again = gumbel_noise(7, (prompt[3:], zero[:1], zero[:1], 2, pos[3:]), 16)
    other_branch = gumbel_noise(7, (prompt[3:], zero[:1], zero[:1] + 1, 2, pos[3:]), 16)
    assert torch.equal(noise[3], again[0]) and not torch.equal(noise[3], other_branch[0])
    assert noise.shape == (4, 16) and torch.isfinite(noise).all()
    many = torch.arange(4000)
    big = gumbel_noise(0, (many * 0, many * 0, 0, 0, many), 16)
    assert abs(float(big.mean()) - 0.5772) < 0.02 and abs(float(big.var()) - 1.6449) < 0.05  # Gumbel(0, 1)


def test_fork_keys_are_hashes_of_the_parent_or_the_given_ones():
    children = fork_keys(7, 3)
    assert children == [child_key(7, c) for c in range(3)] and len(set(children)) == 3
    assert fork_keys(7, 2, [10, 11]) == [10, 11]
    assert child_key(7, 0) != child_key(8, 0)
