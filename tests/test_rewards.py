"""rewards.py: each reward, length target and advantage formula on hand-made groups, dynamic sampling's test of a
flat group, the loss normalisations on a known batch and the clipped surrogate."""
import math

import pytest
import torch

import rewards as rw
from config import RLConfig

sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731


# ----------------------------------------------------------------------------- length rewards

def test_kimi_length_reward_on_hand_made_groups():
    T, F = True, False
    assert rw.kimi_length_reward([10, 20, 30], [T, T, F], [T] * 3) == [0.5, 0.0, -0.5]
    # a short wrong answer is not rewarded for being short: min(0, lambda)
    assert rw.kimi_length_reward([10, 30], [F, T], [T, T]) == [0.0, -0.5]
    assert rw.kimi_length_reward([7, 7, 7], [T, F, T], [T] * 3) == [0.0, 0.0, 0.0]  # ties: no length signal
    assert rw.kimi_length_reward([10, 40, 20], [F, F, F], [T] * 3) == [0.0, -0.5, 0.0]  # all wrong
    # a left-out sample neither sets min/max nor gets a length term
    assert rw.kimi_length_reward([5, 10, 30], [T, T, T], [F, T, T]) == [0.0, 0.5, -0.5]


def test_arora_penalty_uses_the_length_z_score_among_correct_samples():
    T, F = True, False
    a = 0.4
    out = rw.arora_length_reward([10, 30, 99], [T, T, F], [T] * 3, a)  # correct: mean 20, std 10 -> z = -1, +1
    assert out[0] == pytest.approx(-a * sig(-1)) and out[1] == pytest.approx(-a * sig(1)) and out[2] == 0.0
    assert rw.arora_length_reward([10, 20], [T, F], [T, T], a) == [pytest.approx(-a / 2), 0.0]  # one correct: z=0
    assert rw.arora_length_reward([12, 12], [T, T], [T, T], a) == [pytest.approx(-a / 2)] * 2  # ties
    assert rw.arora_length_reward([5, 9], [F, F], [T, T], a) == [0.0, 0.0]


def test_l1_reward_is_minus_alpha_times_distance_to_the_target():
    assert rw.l1_length_reward([10, 50, 32], [32, 32, 32], 0.01) == pytest.approx([-0.22, -0.18, 0.0])


def test_gfpo_keeps_the_k_shortest_or_most_efficient():
    lengths, rewards = [30, 10, 20, 10], [1.0, 0.0, 1.0, 1.0]
    assert rw.gfpo_keep_mask(lengths, rewards, [True] * 4, 2) == [False, True, False, True]
    assert rw.gfpo_keep_mask(lengths, rewards, [True] * 4, 2, "efficiency") == [False, False, True, True]
    assert rw.gfpo_keep_mask(lengths, rewards, [True, False, True, True], 2) == [False, False, True, True]


# ----------------------------------------------------------------------------- advantages and scoring

def test_group_advantages_zscore_and_mean_and_degenerate_groups():
    std = math.sqrt(4 * 0.25 / 3)  # sample std of [1, 0, 0, 1]
    assert rw.group_advantages([1, 0, 0, 1], [True] * 4) == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std,
                                                                          0.5 / std])
    assert rw.group_advantages([1, 0, 0, 1], [True] * 4, "mean") == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert rw.group_advantages([1, 1, 1], [True] * 3) == [0.0] * 3  # all correct
    assert rw.group_advantages([0, 0, 0], [True] * 3) == [0.0] * 3  # all wrong
    assert rw.group_advantages([1, 0, 5], [True, True, False], "mean") == [0.5, -0.5, 0.0]  # left out: 0, unused
    assert rw.group_advantages([1, 0], [True, False]) == [0.0, 0.0]  # one kept sample: nothing to compare


def sample(length, correct, finished=True, target=None):
    return dict(length=length, correct=correct, finished=finished, target=target, style=None)


def cfg(**kw):
    return RLConfig(**{"group_size": 4, **kw})


def test_truncated_samples_get_zero_reward_or_are_masked():
    group = [sample(10, True), sample(20, False), sample(40, False, finished=False), sample(12, True)]
    rw.score(group, cfg(length_reward="none", truncated="zero"), 1.0)
    assert [s["reward"] for s in group] == [1.0, 0.0, 0.0, 1.0] and all(s["keep"] for s in group)
    rw.score(group, cfg(length_reward="none", truncated="mask"), 1.0)
    assert [s["keep"] for s in group] == [True, True, False, True] and group[2]["adv"] == 0.0
    assert group[1]["adv"] < 0 < group[0]["adv"]


def test_length_term_waits_for_the_solve_threshold_and_ramps_with_warmup():
    def rewards(group, **kw):
        rw.score(group, cfg(length_reward="kimi", alpha=1.0, **kw), kw.pop("scale", 1.0))
        return [s["reward"] for s in group]
    solved = [sample(10, True), sample(30, True), sample(20, False), sample(20, True)]
    assert rewards(solved, solve_threshold=0.5) == [1.5, 0.5, 0.0, 1.0]
    assert rewards(solved, solve_threshold=0.8) == [1.0, 1.0, 0.0, 1.0]  # 75% solved: no length term yet
    rw.score(solved, cfg(length_reward="kimi", alpha=1.0, solve_threshold=0.5), 0.5)  # half-way through warm-up
    assert [s["reward"] for s in solved] == [1.25, 0.75, 0.0, 1.0]


def test_all_equal_groups_are_counted_as_flat():
    group = [sample(10, True)] * 4 + [sample(10, True), sample(9, False), sample(10, True), sample(10, True)]
    flat = rw.score([dict(s) for s in group], cfg(length_reward="none"), 1.0)
    assert flat == 0.5


# ----------------------------------------------------------------------------- the loss

def test_token_weights_for_each_normalisation():
    lengths, keep = [2, 4, 6], [True, True, False]
    assert rw.token_weights(lengths, keep, "seq", 10) == pytest.approx([1 / 4, 1 / 8, 0.0])
    assert rw.token_weights(lengths, keep, "token", 10) == pytest.approx([1 / 6, 1 / 6, 0.0])
    assert rw.token_weights(lengths, keep, "const", 10) == pytest.approx([1 / 20, 1 / 20, 0.0])


def test_on_policy_loss_is_the_normalised_advantage_weighted_token_count():
    # ratio 1 everywhere: loss = -sum_i w_i * A_i * (tokens of i), the normalisations above on a known batch
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -0.25])
    # seq: the mean over sequences of each one's mean token term; token: over all 6 tokens; const: over 2 x 8
    for norm, want in [("seq", -(1.0 - 0.25) / 2), ("token", -(2 * 1.0 - 4 * 0.25) / 6),
                       ("const", -(2 * 1.0 - 4 * 0.25) / (2 * 8))]:
        w = torch.tensor(rw.token_weights([2, 4], [True, True], norm, 8))
        loss = rw.policy_loss(logp, logp, adv, w, mask, 0.2, 0.28)
        assert loss.item() == pytest.approx(want)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    mask, w = torch.ones(1, 2), torch.ones(1)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)  # ratios 1.5 (clipped) and 1.1
    rw.policy_loss(logp, old, torch.tensor([1.0]), w, mask, 0.2, 0.28).backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-1.1)
    logp.grad = None
    low = torch.tensor([[math.log(0.7), math.log(0.9)]], requires_grad=True)  # negative advantage, below 1 - 0.2
    rw.policy_loss(low, old, torch.tensor([-1.0]), w, mask, 0.2, 0.28).backward()
    assert low.grad[0, 0] == 0 and low.grad[0, 1] == pytest.approx(0.9)


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    mask, w, adv = torch.ones(1, 3), torch.ones(1), torch.zeros(1)
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert rw.policy_loss(logp, logp, adv, w, mask, 0.2, 0.2, logp, 1.0).item() == pytest.approx(0.0)
    assert rw.policy_loss(logp, logp, adv, w, mask, 0.2, 0.2, logp - 0.3, 1.0).item() > 0


# ----------------------------------------------------------------------------- when to think

def test_adaptthink_bonus_prefers_the_shorter_style_by_delta_per_step():
    styles = ["direct", "minimal", "verbose", None]
    assert rw.adaptthink_reward(styles, [True] * 4, 0.2) == pytest.approx([0.2, 0.1, 0.0, 0.0])
    assert rw.adaptthink_reward(styles, [False, True, True, True], 0.2) == pytest.approx([0.0, 0.1, 0.0, 0.0])


def test_adaptthink_moves_to_a_shorter_style_only_while_its_accuracy_holds():
    # the constraint: in a group, a shorter style wins when its solve rate + delta/2 beats the longer one's.
    # Level-1-like group: direct right 3 of 4, minimal 4 of 4; delta 0.6 (margin 0.3 > 0.25 lost): direct wins
    def mean_adv(group, delta):
        rw.score(group, cfg(group_size=8, length_reward="adaptthink", alpha=delta, solve_threshold=0.0), 1.0)
        by = {st: [s["adv"] for s in group if s["style"] == st] for st in ("direct", "minimal")}
        return {st: sum(v) / len(v) for st, v in by.items()}
    group = lambda: [dict(sample(28, c), style="direct") for c in (True, True, True, False)] + \
        [dict(sample(49, True), style="minimal") for _ in range(4)]  # noqa: E731
    a = mean_adv(group(), 0.6)
    assert a["direct"] > a["minimal"]
    a = mean_adv(group(), 0.4)  # margin 0.2 < 0.25 of accuracy lost: minimal keeps the edge
    assert a["direct"] < a["minimal"]
    # reward = 1[correct] + bonus: direct right 1.6, direct wrong 0.6, minimal 1.3
    g = group()
    rw.score(g, cfg(group_size=8, length_reward="adaptthink", alpha=0.6, solve_threshold=0.0), 1.0)
    assert [s["reward"] for s in g] == pytest.approx([1.6, 1.6, 1.6, 0.6] + [1.3] * 4)


def test_laser_targets_are_the_shortest_length_covering_the_share_of_right_answers():
    levels = [1] * 4 + [2] * 4 + [3] * 4
    lengths = [28, 30, 49, 50, 21, 51, 52, 96, 25, 70, 140, 150]
    correct = [True, False, True, True, False, True, True, True, False, False, False, True]
    # coverage 1/4: one sample per level must be right within L -> level 1: 28, level 2: 51, level 3: 150
    assert rw.laser_targets(levels, lengths, correct, 0.25) == {1: 28, 2: 51, 3: 150}
    # coverage 1/2: two right within L -> 49, 52, and level 3 (one right answer) gets no target
    assert rw.laser_targets(levels, lengths, correct, 0.5) == {1: 49, 2: 52, 3: None}


def test_laser_step_reward_pays_right_answers_within_the_target():
    T, F = True, False
    assert rw.laser_reward([28, 49, 20, 28], [T, T, F, T], [T, T, T, F], 28, 0.5) == [0.5, 0.0, 0.0, 0.0]
    assert rw.laser_reward([28, 49], [T, T], [T, T], None, 0.5) == [0.0, 0.0]


def test_score_uses_each_levels_own_laser_target():
    group = [dict(sample(n, c), level=lv) for lv, n, c in
             [(1, 28, True), (1, 49, True), (1, 30, True), (1, 50, True),
              (2, 50, True), (2, 96, True), (2, 21, False), (2, 97, True)]]
    rw.score(group, cfg(length_reward="laser", alpha=0.5, laser_coverage=0.25), 1.0)
    # level 1's target is 28 (one of four right within it), level 2's is 50
    assert [s["reward"] for s in group] == [1.5, 1.0, 1.0, 1.0, 1.5, 1.0, 0.0, 1.0]


def test_batch_advantages_centre_per_group_and_scale_by_the_batch_std():
    group = [sample(10, c) for c in (True, False, True, True)] + [sample(10, True)] * 4
    rw.score(group, cfg(length_reward="none", advantage="batch"), 1.0)
    centred = [0.25, -0.75, 0.25, 0.25] + [0.0] * 4  # the second group is flat: zeros, still in the batch std
    mean = sum(centred) / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in centred) / 7)
    assert [s["adv"] for s in group] == pytest.approx([x / std for x in centred])


def test_is_flat_looks_at_kept_rewards_only():
    assert rw.is_flat([1.0, 1.0, 1.0], [True] * 3)
    assert not rw.is_flat([1.0, 0.0, 1.0], [True] * 3)
    assert rw.is_flat([1.0, 0.0, 1.0], [True, False, True])
    assert rw.is_flat([1.0, 0.0], [True, False])  # one kept sample: nothing to compare
