"""Exercise 4: is_dpo.log_importance_weights and is_dpo.importance_weights (METHOD.md, section 6): log w per
pair in every mode against a loop over the pairs, the clip on log w (not on each ratio, not from below),
alpha = 1/|y| on each response's log-ratio, importance_weights passing every flag (--weight, --alpha,
--log_w_max, --behaviour_logps) through, and a weight that carries no gradient unless asked to."""
import math

import torch

import is_dpo


def ratios(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_w = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    r_l = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    len_w = torch.randint(1, 25, (n,), generator=g).double()
    len_l = torch.randint(1, 25, (n,), generator=g).double()
    return r_w, r_l, len_w, len_l


def expected_log_w(mode, rw, rl, nw, nl, alpha, bound):
    return {"full": rw + rl, "clipped": min(rw + rl, bound), "adaptive": rw / nw + rl / nl,
            "fixed": alpha * (rw + rl), "sqrt": rw / math.sqrt(nw) + rl / math.sqrt(nl)}[mode]


def test_every_mode_pair_by_pair():
    r_w, r_l, len_w, len_l = ratios()
    for mode, alpha, bound in [("full", 0, 2), ("clipped", 0, 2), ("clipped", 0, 0.5), ("adaptive", 0, 2),
                               ("fixed", 0.3, 2), ("fixed", 1.0, 2), ("sqrt", 0, 2)]:
        log_w = is_dpo.log_importance_weights(mode, r_w, r_l, len_w, len_l, alpha=alpha, log_w_max=bound)
        assert log_w.shape == (32,), f"log_importance_weights({mode!r}): shape {tuple(log_w.shape)}"
        for i in range(32):
            want = expected_log_w(mode, r_w[i].item(), r_l[i].item(), len_w[i].item(), len_l[i].item(), alpha,
                                  bound)
            assert math.isclose(log_w[i].item(), want, rel_tol=1e-9, abs_tol=1e-12), (
                f"log_importance_weights mode {mode!r} (alpha {alpha}, log_w_max {bound}), pair {i}: "
                f"{log_w[i].item():.6f}, expected {want:.6f}")


def test_the_clip_acts_on_the_pair_and_from_above():
    r_w = torch.tensor([5.0, -4.0, 1.5, 3.0, -1.0, 0.0, 10.0, -10.0], dtype=torch.float64)
    r_l = torch.tensor([-4.0, 5.0, 1.5, 3.0, -1.0, 0.0, -9.5, 9.0], dtype=torch.float64)
    lens = torch.full((8,), 4.0, dtype=torch.float64)
    log_w = is_dpo.log_importance_weights("clipped", r_w, r_l, lens, lens, log_w_max=2.0)
    want = [1.0, 1.0, 2.0, 2.0, -2.0, 0.0, 0.5, -1.0]
    assert log_w.tolist() == want, (
        f"clipped log w (log_w_max 2): {log_w.tolist()}, expected {want}: min(r_w + r_l, 2), the clip on the "
        "pair's log w and from above only")


def test_adaptive_alpha_is_one_over_each_responses_length():
    r_w = torch.tensor([6.0, -6.0, 2.0, 0.0, 3.0, -3.0, 8.0, 1.0], dtype=torch.float64)
    r_l = torch.tensor([-2.0, 4.0, 2.0, 5.0, 3.0, -1.0, -8.0, 1.0], dtype=torch.float64)
    len_w = torch.tensor([2.0, 3.0, 4.0, 5.0, 1.0, 6.0, 8.0, 10.0], dtype=torch.float64)
    len_l = torch.tensor([4.0, 2.0, 1.0, 5.0, 3.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    log_w = is_dpo.log_importance_weights("adaptive", r_w, r_l, len_w, len_l)
    want = [2.5, 0.0, 2.5, 1.0, 4.0, -1.0, -1.0, 1.1]
    assert log_w.tolist() == want, (
        f"adaptive log w: {log_w.tolist()}, expected r_w / |y_w| + r_l / |y_l| = {want}")


def weights_and_losses(weight_grad, n=12, seed=4, **flags):
    g = torch.Generator().manual_seed(seed)
    ref_w = -20 * torch.rand(n, generator=g, dtype=torch.float64)
    ref_l = -20 * torch.rand(n, generator=g, dtype=torch.float64)
    pi_w = (ref_w + torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    pi_l = (ref_l + torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": ref_w, "ref_l": ref_l,
             "len_w": torch.randint(1, 20, (n,), generator=g),
             "len_l": torch.randint(1, 20, (n,), generator=g)}
    # the behaviour policy's log-probs, multiples of 1/8 (exact in float32), near pi_ref's but not equal
    rows = [{"chosen_behaviour_logp": round(8 * (w + 1.5)) / 8,
             "rejected_behaviour_logp": round(8 * (l - 1)) / 8}
            for w, l in zip(ref_w.tolist(), ref_l.tolist())]
    args = is_dpo.Args(weight_grad=weight_grad, **{"weight": "adaptive", **flags})
    w, _ = is_dpo.importance_weights(args, logps, rows=rows)
    return w, logps, rows


def test_weights_are_exp_log_w_and_carry_no_gradient():
    w, logps, _ = weights_and_losses(weight_grad=False)
    r_w, r_l = (logps["pi_w"] - logps["ref_w"]).detach(), (logps["pi_l"] - logps["ref_l"]).detach()
    expected = torch.exp(r_w / logps["len_w"] + r_l / logps["len_l"])
    assert w.shape == (12,), f"importance_weights: one weight per pair, shape (12,), not {tuple(w.shape)}"
    assert torch.allclose(w, expected, rtol=1e-6), (
        f"importance_weights (adaptive): {w.tolist()}, expected exp(log w) = {expected.tolist()}")
    loss = (w * logps["pi_w"]).sum()  # d/dpi_w must be w itself: the weight is a constant
    loss.backward()
    grad_l = logps["pi_l"].grad
    constant = torch.allclose(logps["pi_w"].grad, expected, rtol=1e-6)
    assert constant and (grad_l is None or torch.all(grad_l == 0)), (
        "the weight carries a gradient without --weight_grad: it must be a constant (detached)")


def test_weight_grad_lets_the_gradient_through():
    w, logps, _ = weights_and_losses(weight_grad=True)
    w.sum().backward()
    grad = logps["pi_w"].grad
    assert grad is not None and torch.allclose(grad, w.detach() / logps["len_w"], rtol=1e-6), (
        "with --weight_grad the gradient flows through the weight: d w / d pi_w = w / |y_w| (adaptive), "
        f"got {None if grad is None else grad[:4].tolist()}...")


def test_every_flag_reaches_the_weights():
    """--weight, --alpha and --log_w_max as given, and --behaviour_logps: the data's behaviour log-probs in
    place of log pi_ref (rows' chosen_behaviour_logp, rejected_behaviour_logp)."""
    for behaviour in (False, True):
        for flags in ({"weight": "fixed", "alpha": 0.3, "log_w_max": 0.7},
                      {"weight": "clipped", "alpha": 0.3, "log_w_max": 0.7},
                      {"weight": "clipped", "alpha": 0.05, "log_w_max": 1.5}, {"weight": "full"},
                      {"weight": "adaptive"}, {"weight": "sqrt"}):
            w, logps, rows = weights_and_losses(False, behaviour_logps=behaviour, **flags)
            base_w, base_l = logps["ref_w"], logps["ref_l"]
            if behaviour:
                base_w = torch.tensor([r["chosen_behaviour_logp"] for r in rows], dtype=torch.float64)
                base_l = torch.tensor([r["rejected_behaviour_logp"] for r in rows], dtype=torch.float64)
            for i in range(12):
                want = expected_log_w(flags["weight"], (logps["pi_w"][i] - base_w[i]).item(),
                                      (logps["pi_l"][i] - base_l[i]).item(), logps["len_w"][i].item(),
                                      logps["len_l"][i].item(), flags.get("alpha", 0),
                                      flags.get("log_w_max", 0))
                assert math.isclose(w[i].item(), math.exp(want), rel_tol=1e-5), (
                    f"importance_weights with {flags}, behaviour_logps={behaviour}, pair {i}: "
                    f"{w[i].item():.6f}, expected {math.exp(want):.6f} (every flag passed through"
                    + (", the rows' behaviour log-probs in place of log pi_ref)" if behaviour else ")"))
