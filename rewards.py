"""rewards.py: what reason_rl.py optimises. Rewards with a length or style term, advantages, the weights and the
clipped surrogate of the loss, and the test that tells dynamic sampling which groups carry no signal.

Ideas it rests on:
- A reward is 1 for a right final answer plus a term computed over the sample's group (the group_size samples of
  one prompt): every function takes the group's lists (`lengths` in generated tokens, `correct`, `keep`: False for
  samples left out, e.g. truncated under --truncated mask) and returns one float per sample.
- Two families. Length terms push every answer shorter (Kimi k1.5, Arora & Zanette, L1, GFPO filtering). When-to-
  think terms choose *how much* working a problem gets: AdaptThink's bonus for the shorter style, held back by the
  accuracy it costs, and LASER-D's step reward under a length target that each difficulty level sets from its own
  right answers (easy levels get short targets, hard ones long).
- Advantages compare a sample with its group (GRPO's z-score, Dr. GRPO's mean) or, as DLER, subtract the group's
  mean and divide by the standard deviation of the whole batch, so a group with nearly equal rewards is not blown
  up to unit scale. A group whose rewards are all equal teaches nothing: dynamic sampling replaces it.
"""
import math

import torch

from data.tasks import STYLES

# ----------------------------------------------------------------------------- length terms


def kimi_length_reward(lengths, correct, keep):
    """Kimi k1.5: lambda = 0.5 - (len - min) / (max - min) over the group; lambda if correct, min(0, lambda) if
    wrong (a wrong answer is never rewarded for being short). All lengths equal: 0."""
    ls = [n for n, k in zip(lengths, keep) if k]
    lo, hi = (min(ls), max(ls)) if ls else (0, 0)
    out = []
    for n, c, k in zip(lengths, correct, keep):
        lam = 0.0 if hi == lo or not k else 0.5 - (n - lo) / (hi - lo)
        out.append(lam if c else min(0.0, lam))
    return out


def arora_length_reward(lengths, correct, keep, alpha):
    """Arora & Zanette: a correct sample's reward 1 becomes 1 - alpha * sigmoid(z), z its length's z-score among the
    group's correct samples; returned as the change (-alpha * sigmoid(z)); wrong samples 0. Fewer than two correct
    samples, or equal lengths: z = 0 for all (a flat -alpha/2, which moves no advantage)."""
    ls = [n for n, c, k in zip(lengths, correct, keep) if c and k]
    mean = sum(ls) / len(ls) if ls else 0.0
    std = math.sqrt(sum((n - mean) ** 2 for n in ls) / len(ls)) if ls else 0.0
    return [-alpha / (1 + math.exp(-((n - mean) / std if std > 0 else 0.0))) if c and k else 0.0
            for n, c, k in zip(lengths, correct, keep)]


def l1_length_reward(lengths, targets, alpha):
    """L1-style: -alpha * |target - len| for every sample (the prompt says the target)."""
    return [-alpha * abs(t - n) for n, t in zip(lengths, targets)]


def gfpo_keep_mask(lengths, rewards, keep, k, metric="length"):
    """GFPO: train only on the k retained samples of a group, the shortest (metric "length") or those with the
    best reward per token ("efficiency"); ties keep the earlier sample."""
    order = [i for i in range(len(lengths)) if keep[i]]
    if metric == "length":
        order.sort(key=lambda i: lengths[i])
    else:
        order.sort(key=lambda i: -rewards[i] / max(1, lengths[i]))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(lengths))]


# ----------------------------------------------------------------------------- when to think


def adaptthink_reward(styles, keep, delta):
    """AdaptThink (arXiv 2505.13417) for answer styles ordered shortest first (direct, minimal, verbose): a bonus
    delta * (k - 1 - rank) / (k - 1) for the style a sample chose (delta for direct, delta/2 for minimal, 0 for
    verbose; an answer with no style tag gets 0). Added to 1[correct], it is the Lagrangian of "prefer the shorter
    style subject to accuracy no lower than the longer one's": a group's gradient favours a shorter style exactly
    when its solve rate plus its bonus beats the longer style's, i.e. when it loses less than delta/2 of accuracy
    per step of style. Applied right or wrong, as in the paper; left-out samples get 0."""
    k = len(STYLES)
    return [delta * (k - 1 - STYLES.index(s)) / (k - 1) if keep_ and s in STYLES else 0.0
            for s, keep_ in zip(styles, keep)]


def laser_targets(levels, lengths, correct, coverage):
    """LASER-D (arXiv 2505.15612) length targets, one per difficulty level: the shortest length L such that at least
    `coverage` of the level's samples are right *and* end within L (the paper's expected-correct-responses rule:
    coverage 1/group_size expects one such sample per group). A level with too few right answers gets no target
    (None): hard problems are not pushed shorter. Easy levels, whose short answers are right, get short targets."""
    out = {}
    for lv in dict.fromkeys(levels):
        idx = [i for i, x in enumerate(levels) if x == lv]
        ok = sorted(lengths[i] for i in idx if correct[i])
        need = max(1, math.ceil(coverage * len(idx)))
        out[lv] = ok[need - 1] if len(ok) >= need else None
    return out


def laser_reward(lengths, correct, keep, target, alpha):
    """LASER's step reward: +alpha for a right answer that ends within the target length, 0 otherwise (and 0 for
    every sample when there is no target)."""
    if target is None:
        return [0.0] * len(lengths)
    return [alpha if c and k and n <= target else 0.0 for n, c, k in zip(lengths, correct, keep)]


# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards, keep, kind="zscore", eps=1e-6):
    """Per-group advantages over the kept samples: reward - mean (Dr. GRPO, kind "mean"; also the first half of
    "batch", see batch_scale) or that divided by the group's std (GRPO, "zscore"). Left-out samples get 0; a group
    with equal rewards gets 0 everywhere."""
    rs = [r for r, k in zip(rewards, keep) if k]
    if len(rs) < 2:
        return [0.0] * len(rewards)
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
    if std < eps:
        return [0.0] * len(rewards)
    scale = std if kind == "zscore" else 1.0
    return [(r - mean) / scale if k else 0.0 for r, k in zip(rewards, keep)]


def batch_scale(advantages, keep, eps=1e-6):
    """DLER's batch-wise normalisation: group-centred advantages divided by their standard deviation over every
    kept sample of the batch (flat groups included, as zeros). 1 when the batch has no spread."""
    xs = [a for a, k in zip(advantages, keep) if k]
    if len(xs) < 2:
        return 1.0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return std if std > eps else 1.0


def is_flat(rewards, keep):
    """A group whose kept rewards are all equal (or that keeps fewer than two samples): no advantage, no signal."""
    rs = [r for r, k in zip(rewards, keep) if k]
    return len(rs) < 2 or max(rs) - min(rs) < 1e-9


# ----------------------------------------------------------------------------- scoring a batch


def group_rewards(grp, cfg, scale, target=None):
    """(rewards, keep) of one group: 1[correct] plus the configured term (scaled by `scale`, the warm-up), applied
    only when the group solves at least cfg.solve_threshold; `target` is LASER-D's for the group's level."""
    keep = [s["finished"] or cfg.truncated == "zero" for s in grp]
    correct = [s["correct"] for s in grp]
    lengths = [s["length"] for s in grp]
    rewards = [float(c) for c in correct]
    solved = sum(c for c, k in zip(correct, keep) if k) / max(1, sum(keep))
    kind = cfg.length_reward
    if kind == "none" or solved < cfg.solve_threshold or scale <= 0:
        return rewards, keep
    if kind == "kimi":
        extra = [cfg.alpha * x for x in kimi_length_reward(lengths, correct, keep)]
    elif kind == "arora":
        extra = arora_length_reward(lengths, correct, keep, cfg.alpha)
    elif kind == "l1":
        extra = l1_length_reward(lengths, [s["target"] for s in grp], cfg.alpha)
    elif kind == "adaptthink":
        extra = adaptthink_reward([s["style"] for s in grp], keep, cfg.alpha)
    elif kind == "laser":
        extra = laser_reward(lengths, correct, keep, target, cfg.alpha)
    else:  # gfpo: the reward stays 1[correct]; only the retained samples are trained on
        extra = [0.0] * len(grp)
        keep = [k and r for k, r in zip(keep, gfpo_keep_mask(lengths, rewards, keep, cfg.gfpo_keep,
                                                             cfg.gfpo_metric))]
    return [r + scale * e for r, e in zip(rewards, extra)], keep


def score(samples, cfg, scale):
    """Fill in each sample's reward, advantage and keep flag, group by group; scale in [0, 1] is the warm-up of
    the length term. Returns the share of groups whose rewards were all equal (they teach nothing)."""
    G = cfg.group_size
    targets = {}
    if cfg.length_reward == "laser":  # one target per level, from this batch's own samples
        targets = laser_targets([s.get("level") for s in samples], [s["length"] for s in samples],
                                [s["correct"] for s in samples], cfg.laser_coverage)
    flat, adv_all, keep_all = 0, [], []
    for start in range(0, len(samples), G):
        grp = samples[start:start + G]
        rewards, keep = group_rewards(grp, cfg, scale, targets.get(grp[0].get("level")))
        adv = group_advantages(rewards, keep, "mean" if cfg.advantage == "batch" else cfg.advantage)
        flat += is_flat(rewards, keep)
        for s, r, a, k in zip(grp, rewards, adv, keep):
            s.update(reward=r, adv=a, keep=k)
        adv_all += adv
        keep_all += keep
    if cfg.advantage == "batch":
        std = batch_scale(adv_all, keep_all)
        for s in samples:
            s["adv"] /= std
    return flat / (len(samples) // G)


# ----------------------------------------------------------------------------- the loss


def token_weights(gen_lengths, keep, norm, max_new_tokens):
    """The weight of each sample's generated tokens in the loss: 1/(n_seq * len) per sequence (GRPO), 1/(all
    tokens) per token (DAPO), or 1/(n_seq * max_new_tokens) (Dr. GRPO's constant). Left-out samples weigh 0."""
    kept = [n for n, k in zip(gen_lengths, keep) if k]
    if not kept:
        return [0.0] * len(gen_lengths)
    if norm == "seq":
        return [1.0 / (len(kept) * n) if k else 0.0 for n, k in zip(gen_lengths, keep)]
    if norm == "token":
        total = sum(kept)
        return [1.0 / total if k else 0.0 for k in keep]
    if norm == "const":
        return [1.0 / (len(kept) * max_new_tokens) if k else 0.0 for k in keep]
    raise ValueError(f"unknown norm {norm!r}")


def policy_loss(logp, old_logp, adv, weight, mask, clip_low, clip_high, ref_logp=None, kl_coef=0.0):
    """The clipped surrogate (PPO with separate low/high clip, as DAPO) on generated tokens.
    logp, old_logp, ref_logp, mask: (B, T) per target token; adv, weight: (B,) per sample. Returns a scalar whose
    normalisation is in `weight` (see token_weights)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    per_token = -surr
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)  # k3: unbiased, always >= 0
    return (per_token * mask * weight[:, None]).sum()
