"""Exercise 4: is_dpo.log_importance_weights and is_dpo.importance_weights (METHOD.md, section 6): log w per
pair in every mode against values worked out by hand on small inputs (lengths that are squares, so each
sqrt is whole), the modes' relations on random inputs (fixed at alpha is alpha times full, clipped is full
below the bound and the bound above it, adaptive with lengths 1 is full, sqrt is adaptive at the lengths'
square roots), the clip on log w (not on each ratio, not from below), alpha = 1/|y| on each response's
log-ratio, importance_weights passing every flag (--weight, --alpha, --log_w_max, --behaviour_logps)
through, and a weight that carries no gradient unless asked to."""
import math

import torch

import is_dpo


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# 8 pairs: the log-ratios r_w, r_l and lengths |y_w|, |y_l| (squares: sqrt(|y|) is 1, 2, 3, 4 or 5)
R_W, R_L = [2.0, -3.0, 0.5, 4.0, 5.0, -1.0, 3.0, 6.0], [1.0, 2.0, -4.0, -3.0, 2.0, 5.0, -1.5, -0.5]
LEN_W, LEN_L = [4, 9, 1, 16, 25, 4, 1, 9], [1, 4, 16, 9, 4, 25, 9, 1]
LOG_W = {  # (mode, alpha, log_w_max) -> log w of the 8 pairs, worked out pair by pair
    ("full", 0, 2): [3, -1, -3.5, 1, 7, 4, 1.5, 5.5],  # r_w + r_l
    ("clipped", 0, 2): [2, -1, -3.5, 1, 2, 2, 1.5, 2],  # min(r_w + r_l, 2)
    ("clipped", 0, 0.5): [0.5, -1, -3.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    ("adaptive", 0, 2): [1.5, 1 / 6, 0.25, -1 / 12, 0.7, -0.05, 17 / 6, 1 / 6],  # 2/4 + 1/1, -3/9 + 2/4, ...
    ("fixed", 0.3, 2): [0.9, -0.3, -1.05, 0.3, 2.1, 1.2, 0.45, 1.65],  # 0.3 (r_w + r_l)
    ("fixed", 1.0, 2): [3, -1, -3.5, 1, 7, 4, 1.5, 5.5],
    ("sqrt", 0, 2): [2, 0, -0.5, 0, 2, 0.5, 2.5, 1.5],  # 2/2 + 1/1, -3/3 + 2/2, 0.5/1 - 4/4, ...
}


def ratios(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_w = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    r_l = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    len_w = torch.randint(1, 25, (n,), generator=g).double()
    len_l = torch.randint(1, 25, (n,), generator=g).double()
    return r_w, r_l, len_w, len_l


def test_every_mode_pair_by_pair():
    inputs = [f64(R_W), f64(R_L), f64(LEN_W), f64(LEN_L)]
    for (mode, alpha, bound), want in LOG_W.items():
        log_w = is_dpo.log_importance_weights(mode, *inputs, alpha=alpha, log_w_max=bound)
        assert log_w.shape == (8,), f"log_importance_weights({mode!r}): shape {tuple(log_w.shape)}"
        for i in range(8):
            assert math.isclose(log_w[i].item(), want[i], rel_tol=1e-9, abs_tol=1e-12), (
                f"log_importance_weights mode {mode!r} (alpha {alpha}, log_w_max {bound}), pair {i} (r_w "
                f"{R_W[i]}, r_l {R_L[i]}, |y_w| {LEN_W[i]}, |y_l| {LEN_L[i]}): {log_w[i].item():.6f}, "
                f"expected {want[i]:.6f}")


def test_the_modes_relations_on_random_pairs():
    r_w, r_l, len_w, len_l = ratios()

    def log_w(mode, alpha=0.0, bound=2.0, n_w=len_w, n_l=len_l):
        return is_dpo.log_importance_weights(mode, r_w, r_l, n_w, n_l, alpha=alpha, log_w_max=bound)

    full = log_w("full")
    assert full.shape == (32,), f"log_importance_weights('full'): shape {tuple(full.shape)}"
    for alpha in (0.3, 1.0):
        fixed = log_w("fixed", alpha)
        assert torch.allclose(fixed, alpha * full, rtol=1e-9, atol=1e-12), (
            f"log_importance_weights: 'fixed' at alpha {alpha} is not alpha times 'full' (the full log w): "
            f"{fixed[:4].tolist()}... against {(alpha * full)[:4].tolist()}...")
    for bound in (2.0, 0.5):
        clipped, below = log_w("clipped", bound=bound), full <= bound
        ok = torch.allclose(clipped[below], full[below], rtol=1e-9, atol=1e-12) and torch.allclose(
            clipped[~below], torch.full_like(clipped[~below], bound), rtol=1e-9)
        assert ok and below.any() and not below.all(), (
            f"log_importance_weights 'clipped' (log_w_max {bound}): {clipped[:6].tolist()}..., the full "
            f"log w {full[:6].tolist()}...: equal to it where it is at most {bound}, {bound} where it is "
            "above")
    ones = torch.ones_like(len_w)
    adaptive = log_w("adaptive", n_w=ones, n_l=ones)
    assert torch.allclose(adaptive, full, rtol=1e-9, atol=1e-12), (
        f"log_importance_weights 'adaptive' with every length 1: {adaptive[:4].tolist()}..., expected the "
        f"full log w {full[:4].tolist()}...")
    sqrt, adaptive = log_w("sqrt"), log_w("adaptive", n_w=len_w.sqrt(), n_l=len_l.sqrt())
    assert torch.allclose(sqrt, adaptive, rtol=1e-9, atol=1e-12), (
        f"log_importance_weights 'sqrt': {sqrt[:4].tolist()}..., 'adaptive' with the lengths' square roots: "
        f"{adaptive[:4].tolist()}...: r / sqrt(|y|) for each response")


def test_the_clip_acts_on_the_pair_and_from_above():
    r_w = f64([5.0, -4.0, 1.5, 3.0, -1.0, 0.0, 10.0, -10.0])
    r_l = f64([-4.0, 5.0, 1.5, 3.0, -1.0, 0.0, -9.5, 9.0])
    lens = torch.full((8,), 4.0, dtype=torch.float64)
    log_w = is_dpo.log_importance_weights("clipped", r_w, r_l, lens, lens, log_w_max=2.0)
    want = [1.0, 1.0, 2.0, 2.0, -2.0, 0.0, 0.5, -1.0]
    assert torch.allclose(log_w, f64(want), rtol=1e-9, atol=1e-12), (
        f"clipped log w (log_w_max 2): {log_w.tolist()}, expected {want}: min(r_w + r_l, 2), the clip on the "
        "pair's log w and from above only")


def test_adaptive_alpha_is_one_over_each_responses_length():
    r_w = f64([6.0, -6.0, 2.0, 0.0, 3.0, -3.0, 8.0, 1.0])
    r_l = f64([-2.0, 4.0, 2.0, 5.0, 3.0, -1.0, -8.0, 1.0])
    len_w = f64([2.0, 3.0, 4.0, 5.0, 1.0, 6.0, 8.0, 10.0])
    len_l = f64([4.0, 2.0, 1.0, 5.0, 3.0, 2.0, 4.0, 1.0])
    log_w = is_dpo.log_importance_weights("adaptive", r_w, r_l, len_w, len_l)
    want = [2.5, 0.0, 2.5, 1.0, 4.0, -1.0, -1.0, 1.1]
    assert torch.allclose(log_w, f64(want), rtol=1e-9, atol=1e-12), (
        f"adaptive log w: {log_w.tolist()}, expected r_w / |y_w| + r_l / |y_l| = {want}")


# 5 pairs of log-probs, multiples of 1/8 (exact in float32); lengths as dpo.train passes them (int64)
PI_W, REF_W = [-9.0, -22.0, -4.5, -5.0, -13.25], [-10.0, -20.0, -5.0, -8.0, -12.0]  # r_w: 1, -2, 1/2, 3, -5/4
PI_L, REF_L = [-12.5, -3.5, -13.5, -7.5, -2.25], [-12.0, -6.0, -15.0, -7.0, -3.0]  # r_l: -1/2, 5/2, 3/2, ...
PAIR_LEN_W, PAIR_LEN_L = [4, 1, 9, 16, 4], [1, 4, 9, 4, 16]
BEHAVIOUR_W = [-9.5, -21.0, -6.0, -4.75, -15.25]  # pi_w minus these: 1/2, -1, 3/2, -1/4, 2
BEHAVIOUR_L = [-12.25, -5.0, -13.0, -8.0, -2.0]  # pi_l minus these: -1/4, 3/2, -1/2, 1/2, -1/4
ADAPTIVE = [-1 / 4, -11 / 8, 2 / 9, 1 / 16, -17 / 64]  # log w against pi_ref: 1/4 - 1/2, -2/1 + 5/8, ...
FLAG_LOG_W = {  # (flags, behaviour_logps) -> log w of the 5 pairs
    ("fixed", 0.3, 0.7, False): [3 / 20, 3 / 20, 3 / 5, 3 / 4, -3 / 20],  # 0.3 (r_w + r_l)
    ("clipped", 0.3, 0.7, False): [1 / 2, 1 / 2, 7 / 10, 7 / 10, -1 / 2],  # min(r_w + r_l, 0.7)
    ("clipped", 0.05, 1.5, False): [1 / 2, 1 / 2, 3 / 2, 3 / 2, -1 / 2],
    ("full", None, None, False): [1 / 2, 1 / 2, 2, 5 / 2, -1 / 2],
    ("adaptive", None, None, False): ADAPTIVE,
    ("sqrt", None, None, False): [0, -3 / 4, 2 / 3, 1 / 2, -7 / 16],  # 1/2 - 1/2, -2/1 + 5/4, ...
    ("fixed", 0.3, 0.7, True): [3 / 40, 3 / 20, 3 / 10, 3 / 40, 21 / 40],
    ("clipped", 0.3, 0.7, True): [1 / 4, 1 / 2, 7 / 10, 1 / 4, 7 / 10],
    ("clipped", 0.05, 1.5, True): [1 / 4, 1 / 2, 1, 1 / 4, 3 / 2],
    ("full", None, None, True): [1 / 4, 1 / 2, 1, 1 / 4, 7 / 4],
    ("adaptive", None, None, True): [-1 / 8, -5 / 8, 1 / 9, 7 / 64, 31 / 64],
    ("sqrt", None, None, True): [0, -1 / 4, 1 / 3, 3 / 16, 15 / 16],
}


def weights_and_logps(weight_grad, **flags):
    logps = {"pi_w": f64(PI_W).requires_grad_(True), "pi_l": f64(PI_L).requires_grad_(True),
             "ref_w": f64(REF_W), "ref_l": f64(REF_L), "len_w": torch.tensor(PAIR_LEN_W),
             "len_l": torch.tensor(PAIR_LEN_L)}
    rows = [{"chosen_behaviour_logp": w, "rejected_behaviour_logp": l}
            for w, l in zip(BEHAVIOUR_W, BEHAVIOUR_L)]
    args = is_dpo.Args(weight_grad=weight_grad, **{"weight": "adaptive", **flags})
    w, _ = is_dpo.importance_weights(args, logps, rows=rows)
    return w, logps


def test_weights_are_exp_log_w_and_carry_no_gradient():
    w, logps = weights_and_logps(weight_grad=False)
    expected = torch.exp(f64(ADAPTIVE))
    assert w.shape == (5,), f"importance_weights: one weight per pair, shape (5,), not {tuple(w.shape)}"
    assert torch.allclose(w.double(), expected, rtol=1e-6), (
        f"importance_weights (adaptive): {w.tolist()}, expected exp(log w) = {expected.tolist()}")
    loss = (w * logps["pi_w"]).sum()  # d/dpi_w must be w itself: the weight is a constant
    loss.backward()
    grad_l = logps["pi_l"].grad
    constant = torch.allclose(logps["pi_w"].grad, expected, rtol=1e-6)
    assert constant and (grad_l is None or torch.all(grad_l == 0)), (
        "the weight carries a gradient without --weight_grad: it must be a constant (detached)")


def test_weight_grad_lets_the_gradient_through():
    w, logps = weights_and_logps(weight_grad=True)
    w.sum().backward()
    grad, want = logps["pi_w"].grad, torch.exp(f64(ADAPTIVE)) / f64(PAIR_LEN_W)
    assert grad is not None and torch.allclose(grad, want, rtol=1e-6), (
        "with --weight_grad the gradient flows through the weight: d w / d pi_w = w / |y_w| (adaptive) = "
        f"{want.tolist()}, got {None if grad is None else grad.tolist()}")


def test_every_flag_reaches_the_weights():
    """--weight, --alpha and --log_w_max as given, and --behaviour_logps: the data's behaviour log-probs in
    place of log pi_ref (rows' chosen_behaviour_logp, rejected_behaviour_logp)."""
    for (mode, alpha, bound, behaviour), want in FLAG_LOG_W.items():
        flags = {"weight": mode, **({} if alpha is None else {"alpha": alpha, "log_w_max": bound})}
        w, _ = weights_and_logps(False, behaviour_logps=behaviour, **flags)
        for i in range(5):
            assert math.isclose(w[i].item(), math.exp(want[i]), rel_tol=1e-5), (
                f"importance_weights with {flags}, behaviour_logps={behaviour}, pair {i}: "
                f"{w[i].item():.6f}, expected exp({want[i]:.6f}) = {math.exp(want[i]):.6f} (every flag "
                "passed through"
                + (", the rows' behaviour log-probs in place of log pi_ref)" if behaviour else ")"))
