"""
toy_gaussian.py -- two small numerical experiments behind importance-sampled DPO (numpy and matplotlib, a
few seconds on a CPU).

1. Correlation (paper Fig. 1). The reference is a 1-D Gaussian mixture mu = pi_ref, the policy a narrow
   Gaussian pi_theta = N(theta, 0.1^2) slid across [-1, 1]. For each theta: KL(pi_theta || pi_ref) by
   quadrature, and two losses on preference pairs drawn from mu (offline data): the mu-weighted squared
   log-ratio margin, and the same loss importance-weighted towards pi_theta (mu-IS). On a log scale the
   mu-IS loss tracks the KL; the mu-weighted loss does not: it sees pi_theta only where mu puts samples.
2. Variance (paper App. E). Sequences of T tokens, a uniform reference over V tokens and the same policy
   categorical at every step. The sequence weight w = prod_t pi_theta/pi_ref has a variance that grows
   exponentially in T; w^(1/T) keeps it bounded (it even shrinks), at the price of a bias E[w^alpha] <= 1
   (Jensen, App. A). Exact values (the steps are independent): lines; Monte Carlo estimates: markers.

Run:  python toy_gaussian.py          (--help lists the flags and their defaults)
See:  out/toy_gaussian/correlation.png  KL and the mu-IS loss rise and fall together, the mu-weighted one not
      out/toy_gaussian/variance.png     log Var[w]: a straight rising line in T; log Var[w^(1/T)] never rises
      out/toy_gaussian/results.json     every plotted number and the two Pearson correlations
"""
import argparse
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # write files only: works on a machine without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import stage  # noqa: E402  (the output directory, written whole)


@dataclass
class Args:
    seed: int = field(default=0, metadata={"help": "seed of the one random generator behind every draw"})
    out_dir: str = field(default="out/toy_gaussian", metadata={"help": "results.json and the figures"})
    theta_min: float = field(default=-1.0, metadata={"help": "smallest policy mean theta"})
    theta_max: float = field(default=1.0, metadata={"help": "largest policy mean theta"})
    n_theta: int = field(default=41, metadata={"help": "number of theta values on the grid"})
    n_samples: int = field(default=2000, metadata={"help": "preference pairs (y_w, y_l) from mu per theta"})
    vocab_size: int = field(default=10, metadata={"help": "V: the reference is uniform over V tokens"})
    peak: float = field(default=1.5, metadata={"help": "pi_theta = softmax(peak * linspace(-1, 1, V))"})
    t_max: int = field(default=20, metadata={"help": "longest sequence length T"})
    alphas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4], metadata={
        "help": "fixed exponents alpha in [0, 1] of w^alpha"})
    n_mc: int = field(default=10000, metadata={"help": "Monte Carlo sequences drawn from pi_ref"})


def parse_args(argv=None) -> Args:
    """Flags from the fields of Args (numpy alone, unlike stage.parse_args). usage=SUPPRESS: a bad flag
    prints one line, "toy_gaussian.py: error: ...", and exits with 2."""
    parser = argparse.ArgumentParser(usage=argparse.SUPPRESS, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = dict(type=float, nargs="+") if isinstance(default, list) else dict(type=type(default))
        parser.add_argument(f"--{f.name}", default=default, help=f.metadata["help"], **kind)
    args = Args(**vars(parser.parse_args(argv)))
    for name, value in vars(args).items():  # nan passes every comparison below unnoticed, inf breaks grids
        if not isinstance(value, str) and not np.isfinite(value).all():
            parser.error(f"--{name} must be finite, got {value}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.n_samples < 1 or args.n_mc < 2 or args.vocab_size < 2 or args.t_max < 1:
        parser.error("need --n_samples >= 1, --n_mc >= 2, --vocab_size >= 2 and --t_max >= 1")
    if args.theta_min >= args.theta_max or args.n_theta < 2:
        parser.error("empty theta grid: need --theta_min < --theta_max and --n_theta >= 2")
    if not all(0.0 <= a <= 1.0 for a in args.alphas):
        parser.error(f"--alphas must lie in [0, 1], got {args.alphas}")
    return args


# ---------------------------------------------------------------- 1. correlation: a mixture and a Gaussian
MIX_WEIGHTS = np.array([0.3, 0.4, 0.3])  # mu = pi_ref = sum_k w_k N(m_k, 0.2^2)
MIX_MEANS = np.array([-0.8, 0.0, 0.8])
MIX_STD = 0.2
POLICY_STD = 0.1  # pi_theta = N(theta, 0.1^2)


def gaussian_logpdf(y, mean, std):
    return -0.5 * ((y - mean) / std) ** 2 - np.log(std * np.sqrt(2.0 * np.pi))


def mixture_logpdf(y):
    """log mu(y). A logsumexp over the components, so far in the tails log mu stays finite (never log 0)."""
    y = np.asarray(y, dtype=float)[..., None]
    return np.logaddexp.reduce(np.log(MIX_WEIGHTS) + gaussian_logpdf(y, MIX_MEANS, MIX_STD), axis=-1)


def sample_mixture(rng, n):
    component = rng.choice(len(MIX_WEIGHTS), size=n, p=MIX_WEIGHTS)
    return rng.normal(MIX_MEANS[component], MIX_STD)


def kl_quadrature(logp, logq, lo=-6.0, hi=6.0, n=20001):
    """KL(p || q) = int p(y) (log p(y) - log q(y)) dy by the trapezoid rule on a fine grid over [lo, hi].
    logp, logq: functions y -> log density. Working from log densities means that where p underflows the
    integrand is exactly 0, never 0 * (-inf) = nan."""
    y = np.linspace(lo, hi, n)
    log_p = logp(y)
    return float(np.trapezoid(np.exp(log_p) * (log_p - logq(y)), y))


def pair_losses(theta, y_w, y_l):
    """The two offline losses at one theta, from pairs drawn from mu. y_w, y_l: shape (n,).
      h(y) = log pi_theta(y) - log pi_ref(y),   rho = h(y_w) - h(y_l)
      mu-weighted loss = mean( rho^2 / 2 )
      mu-IS loss       = mean( w rho^2 / 2 ),   w = pi_theta(y_w) pi_theta(y_l) / (mu(y_w) mu(y_l))
    For iid pairs E[rho^2 / 2] = Var[h], so the first estimates Var_mu[h] and the second Var_pi_theta[h]:
    only the second looks at h where pi_theta lives, which is where KL = E_pi_theta[h] is decided.
    Returns (mu_loss, mu_is_loss)."""
    # BEGIN SOLUTION
    h_w = gaussian_logpdf(y_w, theta, POLICY_STD) - mixture_logpdf(y_w)
    h_l = gaussian_logpdf(y_l, theta, POLICY_STD) - mixture_logpdf(y_l)
    rho = h_w - h_l
    log_w = h_w + h_l  # mu = pi_ref here, so log w is the sum of the two log-ratios; exponentiate last
    return float(np.mean(0.5 * rho**2)), float(np.mean(np.exp(log_w) * 0.5 * rho**2))
    # END SOLUTION


def correlation_sweep(rng, thetas, n_samples):
    """KL and both losses for every theta (fresh pairs from mu at each), and the Pearson correlations."""
    kl = [kl_quadrature(functools.partial(gaussian_logpdf, mean=theta, std=POLICY_STD), mixture_logpdf)
          for theta in thetas]
    mu_loss, mu_is_loss = map(list, zip(*[pair_losses(theta, sample_mixture(rng, n_samples),
                                                       sample_mixture(rng, n_samples)) for theta in thetas]))
    log_kl = np.log(kl)
    return {"theta": list(map(float, thetas)), "kl": kl, "mu_loss": mu_loss, "mu_is_loss": mu_is_loss,
            "pearson_log_kl_vs_log_mu_loss": float(np.corrcoef(log_kl, np.log(mu_loss))[0, 1]),
            "pearson_log_kl_vs_log_mu_is_loss": float(np.corrcoef(log_kl, np.log(mu_is_loss))[0, 1])}


# ---------------------------------------------------------------- 2. variance: a uniform reference, V tokens
def policy_probs(vocab_size, peak):
    """pi_theta: softmax(peak * linspace(-1, 1, V)), the same categorical at every step. Shape (V,)."""
    logits = peak * np.linspace(-1.0, 1.0, vocab_size)
    return np.exp(logits - np.logaddexp.reduce(logits))


def exact_moments(log_r, alpha, T):
    """Exact log E[w^alpha] and log Var[w^alpha], w = prod_{t=1..T} r(y_t), y_t iid uniform, log_r shape (V,).
    The steps are independent, so E[w^a] = E[r^a]^T and Var[w^a] = E[r^(2a)]^T - E[r^a]^(2T). In log space:
      log Var = T log E[r^(2a)] + log(1 - exp(2T log E[r^a] - T log E[r^(2a)])),
    where the exponent is <= 0 by Jensen; alpha = 0 gives Var = 0, log Var = -inf."""
    # BEGIN SOLUTION
    def log_moment(a):  # log E_ref[r^a] = log mean(r^a), shifted by the max: exactly 0 at a = 0, no overflow
        top = np.max(a * log_r)
        return top + np.log(np.mean(np.exp(a * log_r - top)))
    log_mean, log_second = T * log_moment(alpha), T * log_moment(2 * alpha)
    with np.errstate(divide="ignore"):
        log_var = log_second + np.log(-np.expm1(min(2 * log_mean - log_second, 0.0)))
    return float(log_mean), float(log_var)
    # END SOLUTION


def mc_moments(log_w, alpha):
    """Monte Carlo log E[w^alpha] and log Var[w^alpha] from samples of log w, shape (n,), scaled by their
    largest value before exponentiating: nothing overflows however long the sequences are."""
    s = alpha * log_w
    top = s.max()
    x = np.exp(s - top)
    with np.errstate(divide="ignore"):
        return float(top + np.log(x.mean())), float(2 * top + np.log(x.var(ddof=1)))


def variance_sweep(rng, vocab_size, peak, t_max, alphas, n_mc):
    """Exact and Monte Carlo moments of w^alpha, T = 1..t_max, alpha = 1, 1/T, 1/sqrt(T) and each alpha."""
    log_r = np.log(policy_probs(vocab_size, peak)) + np.log(vocab_size)  # log pi_theta/pi_ref per token
    # n_mc sequences of length t_max from pi_ref; the prefix of length T gives the T-step log weight (cumsum),
    # so the MC points of neighbouring T share samples: one draw serves every T. Expect the MC points of the
    # full weight w to miss: its variance lives in sequences too rare for n_mc draws, which is the lesson.
    log_w = np.cumsum(log_r[rng.integers(vocab_size, size=(n_mc, t_max))], axis=1)
    exponents = {"w": lambda T: 1.0, "w^(1/T)": lambda T: 1.0 / T,
                 "w^(1/sqrt(T))": lambda T: 1.0 / np.sqrt(T)}
    exponents |= {f"w^{a:g}": (lambda T, a=a: a) for a in alphas}
    Ts, curves = range(1, t_max + 1), {}
    for name, alpha_of in exponents.items():
        exact = [exact_moments(log_r, alpha_of(T), T) for T in Ts]
        mc = [mc_moments(log_w[:, T - 1], alpha_of(T)) for T in Ts]
        curves[name] = {"alpha": [float(alpha_of(T)) for T in Ts],  # mean_* is E[w^alpha], the bias (<= 1)
                        "log_var_exact": [e[1] for e in exact], "log_var_mc": [m[1] for m in mc],
                        "mean_exact": [float(np.exp(e[0])) for e in exact],
                        "mean_mc": [float(np.exp(m[0])) for m in mc]}
    return {"T": list(Ts), "pi_theta": policy_probs(vocab_size, peak).tolist(), "curves": curves}


# ---------------------------------------------------------------- plots and output files
def plot_correlation(corr, path):
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.semilogy(corr["theta"], corr["kl"], "k-", lw=2, label="KL(pi_theta || pi_ref) (quadrature)")
    for key, style, name in (("mu_loss", "o-", "mu-weighted"), ("mu_is_loss", "s-", "mu-IS")):
        ax.semilogy(corr["theta"], corr[key], style, ms=3,
                    label=f"{name} loss (Pearson r of logs {corr[f'pearson_log_kl_vs_log_{key}']:.2f})")
    ax.set(xlabel="theta, the mean of pi_theta = N(theta, 0.1²)", ylabel="value (log scale)")
    ax.set_title("On a log scale the mu-IS loss tracks the KL, the mu-weighted loss does not\n"
                 "pairs drawn from mu = pi_ref = 0.3 N(-0.8, 0.2²) + 0.4 N(0, 0.2²) + 0.3 N(0.8, 0.2²)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_variance(var, path, vocab_size, peak):
    fig, (ax_var, ax_mean) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (name, c) in enumerate(var["curves"].items()):
        for ax, key in ((ax_var, "log_var"), (ax_mean, "mean")):
            ax.plot(var["T"], c[f"{key}_exact"], "-", color=f"C{i}", label=name)
            ax.plot(var["T"], c[f"{key}_mc"], "o", color=f"C{i}", ms=3, mfc="none")
    ax_var.set(xlabel="sequence length T", ylabel="log Var[w^alpha]",
               title=f"Variance (V = {vocab_size}, peak = {peak:g}): lines exact, circles Monte Carlo")
    ax_mean.axhline(1.0, color="gray", ls=":", lw=1)
    ax_mean.set(xlabel="sequence length T", ylabel="E[w^alpha]",
                title="Bias: E[w^alpha] <= 1 (Jensen), = 1 for w")
    ax_var.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


@stage.cleans_up
def main(args: Args):
    stage.one_process_only("toy_gaussian.py")
    output = stage.start_output(args.out_dir, "toy_gaussian")  # written whole, then renamed into place
    rng = np.random.default_rng(args.seed)  # the only source of randomness
    corr = correlation_sweep(rng, np.linspace(args.theta_min, args.theta_max, args.n_theta), args.n_samples)
    var = variance_sweep(rng, args.vocab_size, args.peak, args.t_max, args.alphas, args.n_mc)
    plot_correlation(corr, os.path.join(output.work, "correlation.png"))
    plot_variance(var, os.path.join(output.work, "variance.png"), args.vocab_size, args.peak)
    # -inf (a zero variance at alpha = 0) is not valid JSON: it is written as null
    clean = lambda x: x if not isinstance(x, float) or np.isfinite(x) else None  # noqa: E731
    var["curves"] = {k: {kk: list(map(clean, vv)) for kk, vv in c.items()} for k, c in var["curves"].items()}
    with open(os.path.join(output.work, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(args), "correlation": corr, "variance": var}, f, indent=1)
    output.publish()
    print(f"correlation over theta: Pearson(log KL, log mu-weighted loss) = "
          f"{corr['pearson_log_kl_vs_log_mu_loss']:.3f}, Pearson(log KL, log mu-IS loss) = "
          f"{corr['pearson_log_kl_vs_log_mu_is_loss']:.3f}")
    print(f"variance at T = {args.t_max}:   log Var exact   log Var MC   E[w^alpha] exact")
    for name, c in var["curves"].items():
        fmt = lambda x: f"{x:12.3f}" if x is not None else f"{'-inf':>12}"  # noqa: E731
        print(f"  {name:14s} {fmt(c['log_var_exact'][-1])} {fmt(c['log_var_mc'][-1])} "
              f"{c['mean_exact'][-1]:14.4f}")
    print(f"wrote {args.out_dir}/results.json, correlation.png, variance.png")


if __name__ == "__main__":
    main(parse_args())
