"""Tests for toy_gaussian.py: closed forms and Monte Carlo checks, the claims of the two analyses, and the
CLI."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import toy_gaussian as tg

SCRIPT = Path(tg.__file__).resolve()


def log_ratio_uniform(vocab_size, peak):
    """log pi_theta/pi_ref per token, for the uniform reference of the variance analysis."""
    return np.log(tg.policy_probs(vocab_size, peak)) + np.log(vocab_size)


# ---------------------------------------------------------------- 1. correlation
@pytest.mark.core
@pytest.mark.parametrize("m1, s1, m2, s2",
                         [(0.3, 0.1, -0.2, 0.5), (0.0, 1.0, 0.0, 1.0), (1.0, 0.5, -0.5, 0.8)])
def test_kl_quadrature_matches_gaussian_closed_form(m1, s1, m2, s2):
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    closed = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    quad = tg.kl_quadrature(lambda y: tg.gaussian_logpdf(y, m1, s1), lambda y: tg.gaussian_logpdf(y, m2, s2))
    assert quad == pytest.approx(closed, rel=1e-7, abs=1e-10)


@pytest.mark.core
@pytest.mark.parametrize("theta", [-1.0, 0.4, 0.8])
def test_kl_quadrature_of_mixture_matches_monte_carlo(theta):
    rng = np.random.default_rng(1)
    y = rng.normal(theta, tg.POLICY_STD, size=200_000)  # KL = E_{pi_theta}[log pi_theta - log mu]
    h = tg.gaussian_logpdf(y, theta, tg.POLICY_STD) - tg.mixture_logpdf(y)
    quad = tg.kl_quadrature(lambda t: tg.gaussian_logpdf(t, theta, tg.POLICY_STD), tg.mixture_logpdf)
    assert abs(quad - h.mean()) < 4 * h.std() / np.sqrt(len(y))


@pytest.mark.core
def test_mixture_density_integrates_to_one_and_sampler_matches_it():
    y = np.linspace(-6, 6, 20001)
    assert np.trapezoid(np.exp(tg.mixture_logpdf(y)), y) == pytest.approx(1.0, abs=1e-9)
    samples = tg.sample_mixture(np.random.default_rng(0), 100_000)
    assert samples.mean() == pytest.approx(0.0, abs=0.01)  # symmetric mixture
    assert samples.var() == pytest.approx(0.2**2 + 0.6 * 0.8**2, rel=0.02)  # within + between components


@pytest.mark.core
def test_losses_estimate_variances_of_the_log_ratio():
    # For iid pairs E[rho^2 / 2] = Var[h]: the mu-weighted loss estimates Var_mu[h], the mu-IS loss
    # Var_pi_theta[h].
    theta, rng = 0.4, np.random.default_rng(2)
    y = np.linspace(-6, 6, 20001)
    h = tg.gaussian_logpdf(y, theta, tg.POLICY_STD) - tg.mixture_logpdf(y)
    def var_under(log_density):
        p = np.exp(log_density)
        mean = np.trapezoid(p * h, y)
        return np.trapezoid(p * (h - mean) ** 2, y)
    batches = np.array([tg.pair_losses(theta, tg.sample_mixture(rng, 2000), tg.sample_mixture(rng, 2000))
                        for _ in range(20)])
    mean, se = batches.mean(0), batches.std(0, ddof=1) / np.sqrt(len(batches))
    assert abs(mean[0] - var_under(tg.mixture_logpdf(y))) < 4 * se[0]
    assert abs(mean[1] - var_under(tg.gaussian_logpdf(y, theta, tg.POLICY_STD))) < 4 * se[1]


def test_mu_is_loss_correlates_with_kl_better_than_mu_weighted_at_defaults():
    args = tg.Args()
    corr = tg.correlation_sweep(np.random.default_rng(args.seed),
                                np.linspace(args.theta_min, args.theta_max, args.n_theta), args.n_samples)
    assert corr["pearson_log_kl_vs_log_mu_is_loss"] > corr["pearson_log_kl_vs_log_mu_loss"] + 0.3
    assert corr["pearson_log_kl_vs_log_mu_is_loss"] > 0.7


@pytest.mark.core
def test_same_seed_same_numbers():
    run = lambda: tg.correlation_sweep(np.random.default_rng(3), np.linspace(-1, 1, 5), 100)  # noqa: E731
    assert run() == run()


# ---------------------------------------------------------------- 2. variance
@pytest.mark.core
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2, 0.0])
def test_exact_moments_match_enumeration_of_all_sequences(alpha):
    V, T = 3, 3
    log_r = log_ratio_uniform(V, 1.7)
    # every sequence has probability 1/V^T under the uniform reference
    x = np.array([np.exp(alpha * sum(log_r[list(seq)])) for seq in itertools.product(range(V), repeat=T)])
    log_mean, log_var = tg.exact_moments(log_r, alpha, T)
    assert np.exp(log_mean) == pytest.approx(x.mean(), rel=1e-12)
    assert np.exp(log_var) == pytest.approx(x.var(), rel=1e-9, abs=1e-15)


@pytest.mark.core
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1 / 3])
def test_exact_variance_matches_monte_carlo(alpha):
    V, T, n = 4, 3, 200_000
    log_r = log_ratio_uniform(V, 2.0)
    log_w = log_r[np.random.default_rng(4).integers(V, size=(n, T))].sum(1)
    x = np.exp(alpha * log_w)
    se = np.std((x - x.mean()) ** 2) / np.sqrt(n)  # standard error of the sample variance
    _, log_var_mc = tg.mc_moments(log_w, alpha)
    _, log_var_exact = tg.exact_moments(log_r, alpha, T)
    assert abs(np.exp(log_var_mc) - np.exp(log_var_exact)) < 4 * se


@pytest.mark.core
@pytest.mark.parametrize("V, peak", [(2, 0.5), (10, 1.5), (50, 4.0)])
def test_full_weight_is_unbiased_and_powers_are_biased_down(V, peak):
    log_r = log_ratio_uniform(V, peak)
    for T in (1, 7, 40):
        assert tg.exact_moments(log_r, 1.0, T)[0] == pytest.approx(0.0, abs=1e-12)  # E[w] = 1
        for alpha in (0.05, 0.4, 1 / T, 1 / np.sqrt(T)):
            assert tg.exact_moments(log_r, alpha, T)[0] <= 1e-12  # E[w^alpha] <= 1 (Jensen)
    assert tg.exact_moments(log_r, 0.0, 5) == (0.0, -np.inf)  # w^0 = 1: no bias, no variance


@pytest.mark.core
def test_log_variance_of_w_grows_linearly_while_w_one_over_T_stays_bounded():
    var = tg.variance_sweep(np.random.default_rng(0), 10, 1.5, 60, [0.1], n_mc=100)
    full, root_T = np.array(var["curves"]["w"]["log_var_exact"]), var["curves"]["w^(1/T)"]["log_var_exact"]
    slopes = np.diff(full)[20:]  # log Var[w] = T log E[r^2] + log(1 - E[r^2]^-T): slope -> log E[r^2]
    assert np.allclose(slopes, slopes[-1], rtol=1e-3) and slopes[-1] > 0.3
    assert max(root_T) <= root_T[0]


# ---------------------------------------------------------------- the command line
def test_script_runs_end_to_end(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out_dir", str(tmp_path), "--n_theta", "5", "--n_samples", "200",
           "--t_max", "4", "--n_mc", "500", "--alphas", "0", "0.3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Pearson" in proc.stdout
    for name in ("results.json", "correlation.png", "variance.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))
    results = json.loads((tmp_path / "results.json").read_text())
    corr, var = results["correlation"], results["variance"]
    assert len(corr["theta"]) == len(corr["kl"]) == len(corr["mu_is_loss"]) == 5
    assert -1 <= corr["pearson_log_kl_vs_log_mu_is_loss"] <= 1
    assert set(var["curves"]) == {"w", "w^(1/T)", "w^(1/sqrt(T))", "w^0", "w^0.3"}
    assert var["curves"]["w^0"]["log_var_exact"] == [None] * 4  # log 0 is written as null, not -Infinity
    assert results["config"]["n_mc"] == 500


@pytest.mark.core
@pytest.mark.parametrize("flags",
                         [["--n_samples", "0"], ["--n_mc", "-5"], ["--theta_min", "1", "--theta_max", "0"],
                                   ["--n_theta", "1"], ["--alphas", "0.1", "1.5"], ["--vocab_size", "1"],
                                   ["--t_max", "0"]])
def test_bad_flags_give_one_line_error(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tg.parse_args(flags)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_bad_flag_through_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out_dir", str(tmp_path / "x"), "--vocab_size",
                           "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
