"""Tests for toy_categorical.py: every exact quantity against an independent computation (a loop over
responses, a closed form, a logistic regression solved by Newton's method), the weights and losses of
the training loop recomputed from its recorded theta, the data's labels, the outputs and the claims."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import toy_categorical as tc

SMALL = dict(max_len=12, num_qualities=5, ref_len=4.0, ref_sd=1.5, best_len=6.0, num_pairs=400)


def small_args(**overrides):
    return dataclasses.replace(tc.Args(), **{**SMALL, **overrides})


def numpy_policy(world, theta):
    """pi_theta [K] from its definition, in numpy: pi_ref(y) exp(theta . phi(y)) / Z."""
    p = np.exp(world["log_ref"].numpy()) * np.exp(world["phi"].numpy() @ np.asarray(theta))
    return p / p.sum()


@pytest.mark.core
def test_policy_is_the_exponential_tilt_of_pi_ref():
    world = tc.make_world(small_args())
    for theta in [(0.0, 0.0), (0.7, -1.3), (-2.0, 3.0)]:
        logp = tc.policy_logps(torch.tensor(theta, dtype=torch.float64), world)
        np.testing.assert_allclose(logp.exp().numpy(), numpy_policy(world, theta), rtol=1e-12)
    assert float(world["log_ref"].exp().sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.core
def test_world_follows_its_formulas_and_seed():
    args = small_args(ref_noise=0.0, reward_noise=0.0)
    world = tc.make_world(args)
    length, quality = world["phi"].numpy().T
    assert sorted(set(length)) == list(range(1, 13)) and len(length) == 12 * 5
    reward = 0.5 * quality - 0.008 * (length - 6.0) ** 2
    np.testing.assert_allclose(world["reward"].numpy(), reward, atol=1e-12)
    log_ref = -(length - 4.0) ** 2 / (2 * 1.5 ** 2) - quality ** 2 / 2
    np.testing.assert_allclose(world["log_ref"].numpy(), log_ref - np.log(np.exp(log_ref).sum()), atol=1e-12)
    a, b, c = (tc.make_world(small_args(world_seed=s))["reward"] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.core
def test_kl_matches_the_log_partition_closed_form():
    # KL(pi_theta || pi_ref) = theta . E_theta[phi] - log E_ref[exp(theta . phi)]
    world = tc.make_world(small_args())
    unseen = torch.zeros(len(world["reward"]), dtype=torch.bool)
    for theta in [(0.3, 0.2), (-1.0, 2.5)]:
        t = torch.tensor(theta, dtype=torch.float64)
        p_ref, phi = world["log_ref"].exp().numpy(), world["phi"].numpy()
        closed = np.asarray(theta) @ (numpy_policy(world, theta) @ phi) - np.log(p_ref @ np.exp(phi @ theta))
        kl = tc.measure(tc.policy_logps(t, world), world, unseen)["kl"]
        assert kl == pytest.approx(closed, rel=1e-10)


@pytest.mark.core
@pytest.mark.parametrize("noise", [0.0, 0.3])  # noise 0: many ties in r, which count one half
def test_win_rate_matches_a_double_loop_and_is_one_half_against_itself(noise):
    world = tc.make_world(small_args(reward_noise=noise))
    r, p_ref = world["reward"].numpy(), world["log_ref"].exp().numpy()
    unseen = torch.zeros(len(r), dtype=torch.bool)
    assert tc.measure(world["log_ref"], world, unseen)["win_rate"] == pytest.approx(0.5, abs=1e-12)
    theta = (0.4, 0.9)
    p = numpy_policy(world, theta)
    loop = sum(p[i] * p_ref[j] * (1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0)
               for i in range(len(r)) for j in range(len(r)))
    logp = tc.policy_logps(torch.tensor(theta, dtype=torch.float64), world)
    assert tc.measure(logp, world, unseen)["win_rate"] == pytest.approx(loop, abs=1e-12)
    if noise == 0.0:
        assert (r[:, None] == r[None, :]).sum() > len(r)  # the ties this case exists for


@pytest.mark.core
def test_sample_pairs_reproducible_distinct_and_labelled_by_bradley_terry():
    args = small_args(num_pairs=20000)
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0)
    again = tc.sample_pairs(world, args.num_pairs, 0, 0)
    other = tc.sample_pairs(world, args.num_pairs, 0, 1)
    assert torch.equal(chosen, again[0]) and torch.equal(rejected, again[1])
    assert not torch.equal(chosen[:100], other[0][:100])
    assert (chosen != rejected).all() and len(chosen) > 0.8 * args.num_pairs
    # the better response is chosen with probability sigmoid(|r1 - r2|) on average
    r = world["reward"].numpy()
    gap = np.abs(r[chosen] - r[rejected])
    expected = (1 / (1 + np.exp(-gap))).mean()
    observed = (r[chosen] > r[rejected]).mean()
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(gap))
    # both responses come from pi_ref: the sampled length's mean matches pi_ref's
    length, p_ref = world["phi"][:, 0].numpy(), world["log_ref"].exp().numpy()
    both = np.concatenate([length[chosen], length[rejected]])
    assert abs(both.mean() - p_ref @ length) < 0.05  # pairs with y1 == y2 dropped shift it a little


@pytest.mark.core
def test_dpo_loss_is_a_logistic_regression_on_feature_differences():
    args = small_args()
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0)
    theta, beta = torch.tensor([0.8, -0.5], dtype=torch.float64), 0.3
    logp, log_ref = tc.policy_logps(theta, world), world["log_ref"]
    losses = tc.dpo.dpo_loss(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected], beta)
    d_phi = (world["phi"][chosen] - world["phi"][rejected]).numpy()
    np.testing.assert_allclose(losses.numpy(), np.logaddexp(0, -beta * d_phi @ theta.numpy()), rtol=1e-10)


def logistic_fit(d_phi, iterations=50):
    """u minimising mean(log(1 + exp(-d_phi u))), by Newton's method (numpy)."""
    u = np.zeros(d_phi.shape[1])
    for _ in range(iterations):
        s = 1 / (1 + np.exp(d_phi @ u))  # sigmoid(-margin)
        grad = -(d_phi * s[:, None]).mean(0)
        hess = (d_phi * (s * (1 - s))[:, None]).T @ d_phi / len(d_phi)
        u -= np.linalg.solve(hess, grad)
    return u


def test_dpo_ends_at_the_logistic_fit_divided_by_beta():
    # theta* = u / beta: the same fit, 1 / beta times as far from pi_ref
    args = small_args(steps=1500, lr=0.02, num_checkpoints=2)
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0)
    u = logistic_fit((world["phi"][chosen] - world["phi"][rejected]).numpy())
    for beta in (0.5, 1.0):
        rows, _ = tc.train(world, chosen, rejected, "dpo", beta, args)
        theta = np.array([rows[-1]["theta_length"], rows[-1]["theta_quality"]])
        np.testing.assert_allclose(theta, u / beta, rtol=0.02, atol=1e-3)


def independent_weights(method, ratio, c, j, length):
    """w per pair from pi_theta / pi_base per response, by each mode's definition (METHOD.md, section 6)."""
    both = ratio[c] * ratio[j]
    if method.startswith("ais"):
        return ratio[c] ** (1 / length[c]) * ratio[j] ** (1 / length[j])
    if method.startswith("sqrtis"):
        return ratio[c] ** (1 / np.sqrt(length[c])) * ratio[j] ** (1 / np.sqrt(length[j]))
    if method.startswith("is"):
        return np.minimum(both, math.e ** 2)
    if method.startswith("fullis"):
        return both
    if method.startswith("a0.1"):
        return both ** 0.1
    return np.ones(len(c))


@pytest.mark.core
@pytest.mark.parametrize("method, data_theta, against", [
    ("dpo", (0, 0), "ref"), ("ais-dpo", (0, 0), "ref"), ("is-dpo", (0, 0), "ref"),
    ("ais-sn-dpo", (0, 0), "ref"),
    ("a0.1-dpo", (0, 0), "ref"), ("sqrtis-dpo", (0, 0), "ref"), ("fullis-dpo", (0, 0), "ref"),
    ("ipo", (0, 0), "ref"), ("ais-ipo", (0, 0), "ref"), ("rpo", (0, 0), "ref"),
    ("ais-dpo", (0.3, -0.2), "ref"), ("ais-dpo", (0.3, -0.2), "behaviour"),
])
def test_rows_weights_and_losses_match_an_independent_computation(method, data_theta, against):
    args = small_args(steps=30, lr=0.1, num_checkpoints=4, data_theta=list(data_theta), weigh_against=against)
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0, args.data_theta)
    beta = 0.05
    rows, final = tc.train(world, chosen, rejected, method, beta, args)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    p_ref, length = world["log_ref"].exp().numpy(), world["phi"][:, 0].numpy()
    p_base = numpy_policy(world, data_theta) if against == "behaviour" else p_ref
    d_phi = (world["phi"][chosen] - world["phi"][rejected]).numpy()
    c, j = chosen.numpy(), rejected.numpy()
    for row in rows[:-1]:  # the last checkpoint has no step after it, so no loss
        theta = np.array([row["theta_length"], row["theta_quality"]])
        p = numpy_policy(world, theta)
        w = independent_weights(method, p / p_base, c, j, length)
        assert row["weight_mean"] == pytest.approx(w.mean(), rel=1e-9)
        assert row["ess"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum() / len(w), rel=1e-9)
        if "-sn-" in method:
            w = w / w.mean()
        margin = d_phi @ theta  # Delta: log Z cancels
        losses = {"ipo": (margin - 1 / (2 * beta)) ** 2,  # the IPO paper's form, on summed log-ratios
                  "rpo": np.logaddexp(0, -beta * margin) - args.rpo_eta * beta * np.log(p[c])}.get(
            method.split("-")[-1], np.logaddexp(0, -beta * margin))
        assert row["loss"] == pytest.approx((w * losses).mean(), rel=1e-9)
        top = np.sort(w * losses)[::-1][:len(c) // 10]
        assert row["top10_loss_share"] == pytest.approx(top.sum() / (w * losses).sum(), rel=1e-9)
    if against == "ref" or data_theta == (0, 0):
        assert rows[0]["weight_mean"] == pytest.approx(1.0)  # theta = 0: pi_theta = pi_ref, every w is 1
    theta = np.array([rows[-1]["theta_length"], rows[-1]["theta_quality"]])
    np.testing.assert_allclose(final, numpy_policy(world, theta), rtol=1e-10)


@pytest.mark.core
@pytest.mark.parametrize("name, parsed", [
    ("dpo", ("dpo", "none", 0.0, False)), ("ipo", ("ipo", "none", 0.0, False)),
    ("ais-dpo", ("dpo", "adaptive", 0.0, False)), ("is-ipo", ("ipo", "clipped", 0.0, False)),
    ("ais-sn-dpo", ("dpo", "adaptive", 0.0, True)), ("a0.2-rpo", ("rpo", "fixed", 0.2, False)),
    ("sqrtis-dpo", ("dpo", "sqrt", 0.0, False)), ("fullis-sn-ipo", ("ipo", "full", 0.0, True)),
    ("sft", None), ("ais", None), ("ais-xx-dpo", None), ("a1.5-dpo", None), ("ax-dpo", None),
    ("sn-dpo", None),
    ("ais-sn-sn-dpo", None), ("foo-dpo", None),
])
def test_method_names(name, parsed):
    assert tc.parse_method(name) == parsed


@pytest.mark.core
def test_pairs_from_a_shifted_policy_follow_it():
    args = small_args(num_pairs=20000)
    world = tc.make_world(args)
    length = world["phi"][:, 0].numpy()
    for data_theta in [(0.0, 0.0), (0.4, 0.0)]:
        chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0, data_theta)
        both = np.concatenate([length[chosen], length[rejected]])
        assert abs(both.mean() - numpy_policy(world, data_theta) @ length) < 0.05


@pytest.mark.core
def test_unseen_mass_is_pi_ref_mass_off_the_data_at_the_start():
    args = small_args(steps=1, num_checkpoints=2, num_pairs=30)
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, 0, 0)
    rows, _ = tc.train(world, chosen, rejected, "dpo", 0.1, args)
    seen = set(chosen.tolist()) | set(rejected.tolist())
    p_ref = world["log_ref"].exp().numpy()
    expected = sum(p_ref[i] for i in range(len(p_ref)) if i not in seen)
    assert rows[0]["unseen_mass"] == pytest.approx(expected, rel=1e-12) and 0 < expected < 1


def test_default_run_writes_everything_and_its_claims_hold(tmp_path):
    # the lesson of the toy, on its defaults: every claim of evaluate.py --check holds over the 5 seeds
    out = tmp_path / "toy"
    tc.main(dataclasses.replace(tc.Args(), out_dir=str(out)))
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.md", "check.md", "dynamics.png",
                                               "config.json"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 5 * 21
    check = (out / "check.md").read_text()
    assert check.count("| yes |") == 4 and "| NO |" not in check


@pytest.mark.core
def test_a_failing_claim_exits_1_after_writing(tmp_path):
    out = tmp_path / "toy"
    args = small_args(out_dir=str(out), steps=4, num_checkpoints=5, seeds=[0, 1],
                      runs="dpo:0.01 ais-dpo:0.01")
    with pytest.raises(SystemExit) as e:
        tc.main(args)
    assert e.value.code == 1
    assert "| NO |" in (out / "check.md").read_text()


@pytest.mark.parametrize("overrides, message", [
    (dict(runs="sft:0.1"), "unknown method"),
    (dict(runs="dpo"), "not method:beta"),
    (dict(runs="dpo:-0.1"), "beta must be"),
    (dict(runs="dpo:nan"), "beta must be"),
    (dict(runs="dpo:0.1 dpo:0.1"), "distinct"),
    (dict(runs=""), "distinct"),
    (dict(seeds=[1, 1]), "distinct"),
    (dict(seeds=[-1]), "[0, 2^32)"),
    (dict(num_checkpoints=1), "--num_checkpoints"),
    (dict(steps=3, num_checkpoints=5), "--num_checkpoints"),
    (dict(num_qualities=1), "--num_qualities"),
    (dict(lr=float("nan")), "--lr"),
    (dict(num_pairs=0), "--num_pairs"),
    (dict(data_theta=[0.1]), "--data_theta"),
    (dict(weigh_against="pi_ref"), "--weigh_against"),
    (dict(runs="a2-dpo:0.1"), "unknown method"),
])
@pytest.mark.core
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, overrides, message):
    out = tmp_path / "toy"
    with pytest.raises(SystemExit) as e:
        tc.main(small_args(out_dir=str(out), **overrides))
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
