"""Exercise 7: toy_gaussian.pair_losses and toy_gaussian.exact_moments (METHOD.md, section 9): the two
offline losses against a loop over the pairs with the densities written out, and the exact moments of
w^alpha against enumerating every sequence. Each returns two numbers: a tuple, or anything that unpacks into
two floats (a numpy array of two)."""
import itertools
import math

import numpy as np

import toy_gaussian


def normal_pdf(y, mean, std):
    return math.exp(-0.5 * ((y - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def mixture_pdf(y):
    return sum(w * normal_pdf(y, m, 0.2) for w, m in zip((0.3, 0.4, 0.3), (-0.8, 0.0, 0.8)))


def test_pair_losses_against_a_loop():
    rng = np.random.default_rng(0)
    for theta in (-0.5, 0.0, 0.3, 0.8):
        y_w, y_l = rng.normal(0, 0.6, 16), rng.normal(0, 0.6, 16)
        got = toy_gaussian.pair_losses(theta, y_w, y_l)
        assert len(got) == 2, f"pair_losses returns two numbers (mu-weighted, mu-IS), not {len(got)}"
        mu_loss, mu_is_loss = map(float, got)
        h = lambda y: math.log(normal_pdf(y, theta, 0.1)) - math.log(mixture_pdf(y))  # noqa: E731
        rho2 = [(h(a) - h(b)) ** 2 / 2 for a, b in zip(y_w, y_l)]
        w = [math.exp(h(a) + h(b)) for a, b in zip(y_w, y_l)]
        want = sum(rho2) / 16
        assert math.isclose(mu_loss, want, rel_tol=1e-9), (
            f"pair_losses at theta {theta}: the mu-weighted loss {mu_loss:.6g}, mean(rho^2 / 2) is "
            f"{want:.6g}")
        want = sum(a * b for a, b in zip(w, rho2)) / 16
        assert math.isclose(mu_is_loss, want, rel_tol=1e-9), (
            f"pair_losses at theta {theta}: the mu-IS loss {mu_is_loss:.6g}, mean(w rho^2 / 2) is {want:.6g}")


def by_enumeration(log_r, alpha, T):
    """log E[w^alpha], log Var[w^alpha] over every sequence of T tokens, each of probability V^-T."""
    values = [math.exp(alpha * sum(log_r[i] for i in seq)) for seq in itertools.product(range(len(log_r)),
                                                                                        repeat=T)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.log(mean), math.log(var)


def test_exact_moments_against_enumeration():
    log_r = np.log(np.array([0.5, 0.3, 0.2])) + np.log(3)  # pi_theta / uniform pi_ref over V = 3
    for T in (1, 2, 4):
        for alpha in (1.0, 0.5, 1 / T, 0.2):
            got = toy_gaussian.exact_moments(log_r, alpha, T)
            want = by_enumeration(log_r, alpha, T)
            assert len(got) == 2, f"exact_moments returns two numbers (log E, log Var), not {len(got)}"
            assert np.allclose(got, want, rtol=1e-9, atol=1e-9), (
                f"exact_moments at T {T}, alpha {alpha:.3g}: (log E[w^alpha], log Var[w^alpha]) = "
                f"{tuple(map(float, got))}, by enumeration {want}")
    log_mean, log_var = map(float, toy_gaussian.exact_moments(log_r, 0.0, 5))  # w^0 = 1: Var = 0
    assert abs(log_mean) < 1e-12 and (log_var == -math.inf or log_var < -30), (
        f"exact_moments at alpha 0 (w^0 = 1): log E {log_mean}, log Var {log_var}; expected 0 and -inf")


def test_exact_moments_do_not_overflow():
    log_r = np.array([400.0, 0.0, -3.0, 1.0])  # r^2 alone overflows float64
    log_mean, log_var = map(float, toy_gaussian.exact_moments(log_r, 1.0, 20))
    log_m1 = np.logaddexp.reduce(log_r) - np.log(4)
    log_m2 = np.logaddexp.reduce(2 * log_r) - np.log(4)
    assert math.isclose(log_mean, 20 * log_m1, rel_tol=1e-12), (
        f"exact_moments where r^2 overflows (log r up to 400, T 20): log E {log_mean}, expected "
        f"{20 * log_m1}")
    want_log_var = 20 * log_m2 + math.log1p(-math.exp(40 * log_m1 - 20 * log_m2))
    assert math.isclose(log_var, want_log_var, rel_tol=1e-12), (
        f"exact_moments where r^2 overflows (log r up to 400, T 20): log Var {log_var}, expected "
        f"{want_log_var}")
