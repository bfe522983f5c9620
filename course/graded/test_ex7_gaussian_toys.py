"""Exercise 7: toy_gaussian.pair_losses and toy_gaussian.exact_moments (METHOD.md, section 9). Graded by
values written out below, each computed once to 40 digits (mpmath) from the densities and rounded to a float:
the two offline losses at a few pairs, and the exact moments of w^alpha for three tokens; and by properties:
the losses are symmetric in (y_w, y_l), zero when y_w = y_l and a mean over pairs; log E[w^alpha] grows
linearly in T, and adding c to every log r adds T alpha c to log E and 2 T alpha c to log Var. Each returns
two numbers: a tuple, or anything that unpacks into two floats (a numpy array of two)."""
import math

import numpy as np

import toy_gaussian

# (theta, y_w's, y_l's) -> (mean(rho^2 / 2), mean(w rho^2 / 2)), h(y) = log N(y; theta, 0.1^2) - log mu(y),
# mu = 0.3 N(-0.8, 0.2^2) + 0.4 N(0, 0.2^2) + 0.3 N(0.8, 0.2^2), rho = h(y_w) - h(y_l),
# w = e^(h(y_w) + h(y_l))
PAIR_LOSSES = {(0.3, (0.3, 0.35, 0.1), (0.2, 0.45, 0.3)): (1.7131704479501342, 41.00709508420831),
               (0.0, (0.0, -0.15, 0.2), (0.1, 0.05, -0.1)): (0.33380286670818327, 2.1406204380786997),
               (-0.5, (-0.5, -0.45, -0.7), (-0.6, -0.3, -0.5)): (2.359101123447243, 71.5947321411907)}
# r = (0.5, 0.3, 0.2) / (1/3) = (1.5, 0.9, 0.6): (T, alpha) -> (log E[w^alpha], log Var[w^alpha]) with
# E[w^a] = mean(r^a)^T, Var[w^a] = mean(r^2a)^T - mean(r^a)^2T; at alpha 1: E[r] = 1, E[r^2] = 1.14, so
# log E[w] = 0 and log Var[w] = log(1.14^T - 1)
LOG_R = np.log(np.array([0.5, 0.3, 0.2])) + np.log(3)
MOMENTS = {(1, 1.0): (0.0, -1.9661128563728327), (1, 0.5): (-0.01747688877149905, -3.3711547142866443),
           (1, 0.2): (-0.011229284747418687, -5.1952550478680575), (2, 1.0): (0.0, -1.2053070273390727),
           (2, 0.5): (-0.0349537775429981, -2.6953317094515485),
           (2, 0.2): (-0.022458569494837374, -4.52173609886481),
           (4, 1.0): (0.0, -0.3725718325720738), (4, 0.5): (-0.0699075550859962, -2.036527547504621),
           (4, 0.25): (-0.052614654935368085, -3.4307726706004744),
           (4, 0.2): (-0.04491713898967475, -3.8678373932732413)}


def two_floats(got, name):
    assert len(got) == 2, f"{name} returns two numbers, not {len(got)}"
    return tuple(map(float, got))


def test_pair_losses_values():
    for (theta, y_w, y_l), want in PAIR_LOSSES.items():
        got = two_floats(toy_gaussian.pair_losses(theta, np.array(y_w), np.array(y_l)),
                         "pair_losses (mu-weighted, mu-IS)")
        names = ("mu-weighted loss, mean(rho^2 / 2)", "mu-IS loss, mean(w rho^2 / 2)")
        for name, value, expected in zip(names, got, want):
            assert math.isclose(value, expected, rel_tol=1e-9), (
                f"pair_losses at theta {theta}, y_w {y_w}, y_l {y_l}: the {name} is {value:.10g}, expected "
                f"{expected:.10g}")


def test_pair_losses_symmetric_zero_on_ties_and_a_mean_over_pairs():
    rng = np.random.default_rng(0)
    for theta in (-0.5, 0.0, 0.3, 0.8):
        y_w, y_l = rng.normal(0, 0.6, 16), rng.normal(0, 0.6, 16)
        got = two_floats(toy_gaussian.pair_losses(theta, y_w, y_l), "pair_losses (mu-weighted, mu-IS)")
        swapped = two_floats(toy_gaussian.pair_losses(theta, y_l, y_w), "pair_losses")
        assert np.allclose(got, swapped, rtol=1e-9), (
            f"pair_losses at theta {theta}: {got}, with y_w and y_l swapped {swapped}; rho^2 and "
            "w = pi(y_w) pi(y_l) / (mu(y_w) mu(y_l)) are symmetric in the two")
        ties = two_floats(toy_gaussian.pair_losses(theta, y_w, y_w.copy()), "pair_losses")
        assert np.allclose(ties, 0.0, atol=1e-12), (
            f"pair_losses at y_w = y_l (rho = 0): {ties}, expected 0, 0")
        halves = [two_floats(toy_gaussian.pair_losses(theta, y_w[s], y_l[s]), "pair_losses")
                  for s in (slice(0, 8), slice(8, 16))]
        mean = tuple((a + b) / 2 for a, b in zip(*halves))
        assert np.allclose(got, mean, rtol=1e-9), (
            f"pair_losses at theta {theta}: {got} on 16 pairs, but the mean of its halves' is {mean}")


def test_exact_moments_values():
    for (T, alpha), want in MOMENTS.items():
        got = two_floats(toy_gaussian.exact_moments(LOG_R, alpha, T), "exact_moments (log E, log Var)")
        assert np.allclose(got, want, rtol=1e-9, atol=1e-9), (
            f"exact_moments at T {T}, alpha {alpha:.3g}: (log E[w^alpha], log Var[w^alpha]) = {got}, "
            f"expected {want}")
    log_mean, log_var = two_floats(toy_gaussian.exact_moments(LOG_R, 0.0, 5), "exact_moments")  # w^0 = 1
    assert abs(log_mean) < 1e-12 and (log_var == -math.inf or log_var < -30), (
        f"exact_moments at alpha 0 (w^0 = 1): log E {log_mean}, log Var {log_var}; expected 0 and -inf")


def test_exact_moments_linear_in_t_and_under_a_shift():
    log_r = np.random.default_rng(1).normal(0, 1.5, 5)
    (log_mean, log_var), (log_mean_2t, _) = (two_floats(toy_gaussian.exact_moments(log_r, 0.7, T),
                                                        "exact_moments") for T in (3, 6))
    assert math.isclose(log_mean_2t, 2 * log_mean, rel_tol=1e-9), (
        f"exact_moments: log E[w^alpha] at T 6 is {log_mean_2t:.10g}, twice that at T 3 is "
        f"{2 * log_mean:.10g} (the steps are independent)")
    shifted = two_floats(toy_gaussian.exact_moments(log_r + 2.5, 0.7, 3), "exact_moments")
    want = (log_mean + 3 * 0.7 * 2.5, log_var + 2 * 3 * 0.7 * 2.5)
    assert np.allclose(shifted, want, rtol=1e-9, atol=1e-9), (
        f"exact_moments with 2.5 added to every log r (T 3, alpha 0.7): {shifted}, expected {want} (w^alpha "
        "is multiplied by e^(T alpha 2.5))")


def test_exact_moments_do_not_overflow():
    log_r = np.array([400.0, 0.0, -3.0, 1.0])  # r^2 alone overflows float64
    log_mean, log_var = two_floats(toy_gaussian.exact_moments(log_r, 1.0, 20), "exact_moments")
    # log E[r] = 400 - log 4 (+ e^-400 terms), log E[r^2] = 800 - log 4: log E[w] = 20 (400 - log 4), and
    # log Var[w] = 20 (800 - log 4) + log(1 - e^(40 (400 - log 4) - 20 (800 - log 4))) = ... + log(1 - 4^-20)
    want_log_mean, want_log_var = 7972.274112777603, 15972.2741127776
    assert math.isclose(log_mean, want_log_mean, rel_tol=1e-12), (
        f"exact_moments where r^2 overflows (log r up to 400, T 20): log E {log_mean}, expected "
        f"{want_log_mean}")
    assert math.isclose(log_var, want_log_var, rel_tol=1e-12), (
        f"exact_moments where r^2 overflows (log r up to 400, T 20): log Var {log_var}, expected "
        f"{want_log_var}")
