"""dpo.py and is_dpo.py: the losses and the importance weights against hand computations, the reference
log-probs saved beside the pairs, and the scripts end to end."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import dpo
import is_dpo
import lm
import sft
import toy_tldr
from test_lm import encode, tiny_model, toy_examples  # noqa: F401  (tiny_model: a fixture)
from test_toy_tldr import submit_cli

# ---------------------------------------------------------------------------------------------
# the losses against hand computations


def sig(x):
    return 1 / (1 + math.exp(-x))


PI_W, PI_L, REF_W, REF_L, LEN_W, LEN_L = -10.0, -14.0, -12.0, -11.0, 5, 8


def loss_of(loss_type, **kw):
    args = dpo.Args(loss_type=loss_type, beta=kw.pop("beta", 0.1), **kw)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    losses, stats = dpo.daa_losses(args, t(PI_W), t(PI_L), t(REF_W), t(REF_L), t(LEN_W), t(LEN_L))
    return losses.item(), stats


@pytest.mark.core
def test_losses_by_hand():
    r_w, r_l = PI_W - REF_W, PI_L - REF_L  # 2, -3
    delta = r_w - r_l  # 5
    assert loss_of("dpo")[0] == pytest.approx(-math.log(sig(0.1 * 5)))
    assert loss_of("ipo", ipo_form="per_token")[0] == pytest.approx((2 / 5 - (-3) / 8 - 1 / 0.2) ** 2)
    assert loss_of("ipo", beta=0.2)[0] == pytest.approx((5 - 2.5) ** 2)  # the default: summed, target 2.5
    assert loss_of("ipo")[0] == pytest.approx((5 - 5.0) ** 2)
    assert loss_of("rpo", rpo_eta=0.005)[0] == pytest.approx(-math.log(sig(0.5)) - 0.005 * 0.1 * (-10.0))
    assert loss_of("rdpo", rdpo_alpha=0.01)[0] == pytest.approx(-math.log(sig(0.5 + 0.01 * (5 - 8))))
    phi_w, phi_l = 2 + math.exp(1.0), -3 + math.exp(-1.0)  # clip c = 1: r_w 2 -> 1, r_l -3 -> -1
    assert loss_of("chipo", chipo_form="isdaa", chipo_clip=1.0)[0] == pytest.approx(
        -math.log(sig(0.1 * (phi_w - phi_l))))
    # Huang et al.: phi(z) = z + log z with z = exp(r), the whole margin clipped to [-2R, 2R]
    margin = 0.1 * ((math.exp(2) + 2) - (math.exp(-3) - 3))  # 1.234
    assert loss_of("chipo")[0] == pytest.approx(-math.log(sig(margin)))
    assert loss_of("chipo", chipo_rmax=0.5)[0] == pytest.approx(-math.log(sig(1.0)))  # clipped at 2R = 1
    _, stats = loss_of("dpo")
    assert stats["margin"] == pytest.approx(0.1 * delta)
    assert stats["accuracy"] == 1.0
    assert delta == 5


@pytest.mark.core
def test_label_smoothing_is_the_expected_dpo_loss_over_wrong_labels():
    """cDPO: with probability eps a label is wrong; the loss is DPO's expectation over the two labels.
    Against the formula by hand, against DPO on the swapped pair, and its optimum in closed form:
    the loss of one pair is least where beta * Delta = log((1 - eps) / eps), 1/beta further out at a
    smaller beta (hard labels, eps = 0: no finite optimum)."""
    delta = (PI_W - REF_W) - (PI_L - REF_L)  # 5
    for eps in (0.1, 0.3):
        smoothed = loss_of("dpo", label_smoothing=eps)[0]
        assert smoothed == pytest.approx(-(1 - eps) * math.log(sig(0.5)) - eps * math.log(sig(-0.5)))
        assert smoothed == pytest.approx((1 - eps) * loss_of("dpo")[0] + eps * -math.log(sig(-0.1 * delta)))
        assert smoothed > loss_of("dpo")[0]  # a wrong label here costs more than a right one gains
    assert loss_of("dpo", label_smoothing=0.0)[0] == loss_of("dpo")[0]  # the default is DPO exactly
    for beta, eps in ((0.1, 0.3), (0.01, 0.3), (0.1, 0.2)):
        optimum = math.log((1 - eps) / eps) / beta  # Delta where d loss / d Delta = 0
        args = dpo.Args(beta=beta, label_smoothing=eps)
        margins = torch.tensor([optimum - 1, optimum, optimum + 1], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(3, dtype=torch.float64)
        losses, _ = dpo.daa_losses(args, margins, zero, zero, zero, zero, zero)
        grad, = torch.autograd.grad(losses.sum(), margins)
        assert grad[0] < 0 and abs(grad[1]) < 1e-12 and grad[2] > 0
        numeric = (loss_of_margin(args, optimum + 1e-4) - loss_of_margin(args, optimum - 1e-4)) / 2e-4
        assert abs(numeric) < 1e-7


def loss_of_margin(args, margin):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return dpo.daa_losses(args, t(margin), t(0.0), t(0.0), t(0.0), t(1), t(1))[0].item()


# ---------------------------------------------------------------------------------------------
# importance weights


def r_tensors(n=64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_w = scale * torch.randn(n, generator=g, dtype=torch.float64)
    r_l = scale * torch.randn(n, generator=g, dtype=torch.float64)
    len_w = torch.randint(1, 25, (n,), generator=g).double()
    len_l = torch.randint(1, 25, (n,), generator=g).double()
    return r_w, r_l, len_w, len_l


@pytest.mark.core
def test_weight_modes_by_hand():
    r_w, r_l, len_w, len_l = r_tensors()
    lw = lambda mode, **kw: is_dpo.log_importance_weights(mode, r_w, r_l, len_w, len_l, **kw)  # noqa: E731
    assert torch.equal(lw("none"), torch.zeros_like(r_w))
    assert torch.allclose(lw("full"), r_w + r_l)
    assert torch.allclose(lw("clipped", log_w_max=2.0),
                          torch.minimum(r_w + r_l, torch.tensor(2.0, dtype=torch.float64)))
    assert torch.allclose(lw("adaptive"), r_w / len_w + r_l / len_l)
    assert torch.allclose(lw("fixed", alpha=0.2), 0.2 * (r_w + r_l))
    assert torch.allclose(lw("sqrt"), r_w / len_w.sqrt() + r_l / len_l.sqrt())
    assert torch.equal(lw("fixed", alpha=0.0), torch.zeros_like(r_w))  # alpha = 0: plain DAA
    assert torch.equal(lw("fixed", alpha=1.0), lw("full"))  # alpha = 1: full IS


@pytest.mark.core
@pytest.mark.parametrize("mode", is_dpo.RATIO_MODES)
def test_weights_exactly_one_when_policy_is_reference(mode):
    ref_w, ref_l = -20 * torch.rand(16), -20 * torch.rand(16)
    logps = {"pi_w": ref_w.clone(), "pi_l": ref_l.clone(), "ref_w": ref_w, "ref_l": ref_l,
             "len_w": torch.randint(1, 20, (16,)), "len_l": torch.randint(1, 20, (16,))}
    w, stats = is_dpo.importance_weights(is_dpo.Args(weight=mode, alpha=0.3), logps, rows=None)
    assert torch.equal(w, torch.ones(16))
    assert stats["ess"] == pytest.approx(16)


@pytest.mark.core
def test_self_normalised_weights_by_hand():
    """--self_normalise: w_i / mean_j(w_j), from the same log w; the diagnostics stay those of the raw
    weights."""
    g = torch.Generator().manual_seed(1)
    ref_w, ref_l = -20 * torch.rand(16, generator=g), -20 * torch.rand(16, generator=g)
    logps = {"pi_w": ref_w - 8 * torch.rand(16, generator=g), "pi_l": ref_l - 8 * torch.rand(16, generator=g),
             "ref_w": ref_w, "ref_l": ref_l, "len_w": torch.randint(1, 20, (16,), generator=g),
             "len_l": torch.randint(1, 20, (16,), generator=g)}
    raw, raw_stats = is_dpo.importance_weights(is_dpo.Args(weight="adaptive"), logps, rows=None)
    w, stats = is_dpo.importance_weights(is_dpo.Args(weight="adaptive", self_normalise=True), logps,
                                         rows=None)
    assert raw.mean() < 0.5  # the raw weights have drifted below 1 ...
    assert torch.allclose(w, raw / raw.mean(), rtol=1e-5) and w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert stats == raw_stats  # ... and the logged diagnostics say so
    assert is_dpo.method_name(is_dpo.Args(weight="adaptive", self_normalise=True)) == "ais-sn-dpo"


@pytest.mark.core
def test_clipped_weights_never_exceed_bound():
    for seed in range(5):
        r_w, r_l, len_w, len_l = r_tensors(256, scale=50.0, seed=seed)
        for bound in (0.0, 2.0, 5.0):
            w = is_dpo.log_importance_weights("clipped", r_w, r_l, len_w, len_l, log_w_max=bound).exp()
            assert (w <= math.exp(bound)).all()


@pytest.mark.core
def test_ess_by_hand():
    log_w = torch.log(torch.tensor([1.0, 2.0, 3.0, 0.5]))
    stats = is_dpo.weight_stats(log_w)
    assert stats["ess"] == pytest.approx(6.5 ** 2 / (1 + 4 + 9 + 0.25))
    assert stats["weight_mean"] == pytest.approx(6.5 / 4)
    assert stats["weight_max"] == pytest.approx(3.0)


@pytest.mark.core
def test_detached_weight_scales_the_gradient(tiny_model):
    """grad of (w * loss) with w detached == w * grad of loss, w evaluated at the current policy."""
    model, tokenizer = tiny_model
    examples = toy_examples(tokenizer, 2, seed=3)
    pairs = [(examples[0], (examples[0][0], examples[1][1]))]  # one prompt, two responses
    pad = tokenizer.pad_token_id
    ref_w, ref_l, _, _ = lm.pair_logps(model, pairs, pad, "cpu", 16)
    ref_w, ref_l = ref_w.detach() + 0.7, ref_l.detach() - 0.4  # a policy that has moved from pi_ref

    def grad_of(weighted):
        model.zero_grad()
        pi_w, pi_l, len_w, len_l = lm.pair_logps(model, pairs, pad, "cpu", 16)
        logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": ref_w, "ref_l": ref_l, "len_w": len_w, "len_l": len_l}
        args = is_dpo.Args(weight="adaptive", beta=0.1)
        losses, _ = dpo.daa_losses(args, **logps)
        w, _ = is_dpo.importance_weights(args, logps, None)
        (w * losses if weighted else losses).mean().backward()
        return w.item(), [p.grad.clone() for p in model.parameters()]

    w, weighted = grad_of(True)
    _, plain = grad_of(False)
    assert w != pytest.approx(1.0)
    for a, b in zip(weighted, plain):
        assert torch.allclose(a, w * b, atol=1e-10, rtol=1e-8)


@pytest.mark.core
@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
@pytest.mark.parametrize("mode", is_dpo.RATIO_MODES)
def test_extreme_log_ratios_stay_finite(loss_type, mode):
    pi = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    pl = torch.tensor([-1e4, 1e4, 1e4, -1e4], requires_grad=True)
    zeros = torch.zeros(4)
    lens = torch.tensor([3, 7, 1, 24])
    args = is_dpo.Args(loss_type=loss_type, weight=mode, beta=0.01, alpha=0.5)
    logps = {"pi_w": pi, "pi_l": pl, "ref_w": zeros, "ref_l": zeros, "len_w": lens, "len_l": lens.flip(0)}
    losses, _ = dpo.daa_losses(args, **logps)
    w, stats = is_dpo.importance_weights(args, logps, None)
    loss = (w * losses).mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w).all()
    assert torch.isfinite(pi.grad).all() and torch.isfinite(pl.grad).all()
    assert all(math.isfinite(v) for v in stats.values())


# ---------------------------------------------------------------------------------------------
# end to end through the command line


def run(tmp_path_factory, script, *flags):
    """`python <script> <flags>` on the session's runner (see test_toy_tldr.py): no interpreter to start."""
    return submit_cli(tmp_path_factory, script, *flags).result(timeout=600)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny toy world, a 3-step SFT model, and preference pairs (the human ones, with fake
    behaviour log-probs) -- everything dpo.py needs, in a few seconds."""
    root = tmp_path_factory.mktemp("dpo")
    world = toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=48, num_eval=8)
    toy_tldr.main(world)
    sft.main(sft.Args(data=world.out_dir, out_dir=str(root / "sft"), steps=3, batch_size=8, val_size=8,
                      num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    rows = [json.loads(line) for line in open(root / "world" / "prefs_human.jsonl")]
    for i, r in enumerate(rows):
        r["chosen_behaviour_logp"], r["rejected_behaviour_logp"] = -10.0 - i % 3, -12.0 + i % 2
    rows[0]["rejected"] = rows[0]["chosen"]  # one identical pair: legal, loss constant
    rows[1]["chosen"] = ""  # an empty response: just EOS
    toy_tldr.write_jsonl(root / "prefs.jsonl", rows)
    return root


COMMON = ["--batch_size", 8, "--num_epochs", 1, "--num_checkpoints", 2, "--warmup_steps", 1, "--lr", 1e-3,
          "--seed", 3]


def read_log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]


def test_dpo_and_is_dpo_alpha0_write_the_same_log(tmp_path_factory, tiny_world):
    base = ["--sft_path", tiny_world / "sft", "--data", tiny_world / "prefs.jsonl", "--runs_dir",
            tiny_world / "runs", *COMMON]
    a = run(tmp_path_factory, "dpo.py", *base)
    assert a.returncode == 0, a.stderr[-2000:]
    b = run(tmp_path_factory, "is_dpo.py", *base, "--weight", "fixed", "--alpha", 0)
    assert b.returncode == 0, b.stderr[-2000:]
    plain = read_log(tiny_world / "runs" / "dpo_beta0.01_seed3")
    weighted = read_log(tiny_world / "runs" / "a0-dpo_beta0.01_seed3")
    assert len(plain) == len(weighted) == 6  # ceil(48 / 8)
    for p, w in zip(plain, weighted):
        assert {k: w[k] for k in p} == p  # identical numbers, not just close
        assert w["weight_mean"] == 1.0 and w["weight_max"] == 1.0
    names = sorted(os.listdir(tiny_world / "runs" / "dpo_beta0.01_seed3"))
    assert names == [".stage.json", "args.json", "ckpt-0", "ckpt-3", "ckpt-6", "train_log.jsonl"]
    assert not [d for d in os.listdir(tiny_world / "runs") if d.endswith(".tmp")]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny_world / "runs" / "dpo_beta0.01_seed3" / "ckpt-6")


def test_a_run_reading_the_saved_reference_logps_writes_the_same_log(tmp_path_factory, tiny_world):
    """--reference_only saves log pi_ref of the pairs beside them; a run reads them and logs what a run that
    computed them itself logs; a training run never writes beside its inputs."""
    data = tiny_world / "ref" / "prefs.jsonl"
    os.makedirs(data.parent)
    data.write_bytes((tiny_world / "prefs.jsonl").read_bytes())
    base = ["--sft_path", tiny_world / "sft", "--data", data, "--runs_dir", tiny_world / "runs_ref", *COMMON]
    first = run(tmp_path_factory, "dpo.py", *base, "--run_name", "first")
    assert first.returncode == 0 and "read from" not in first.stdout, first.stderr[-2000:]
    assert os.listdir(data.parent) == ["prefs.jsonl"]
    only = run(tmp_path_factory, "dpo.py", *base, "--reference_only")
    assert only.returncode == 0 and (data.parent / "reference_logps.pt").is_file(), only.stderr[-2000:]
    second = run(tmp_path_factory, "dpo.py", *base, "--run_name", "second")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reference log-probs: read from" in second.stdout
    assert read_log(tiny_world / "runs_ref" / "first") == read_log(tiny_world / "runs_ref" / "second")
    assert sorted(os.listdir(tiny_world / "runs_ref")) == ["first", "second"]  # no lock or partial copy left


def test_the_saved_reference_logps_are_recomputed_when_anything_they_came_from_changes(tiny_model, tmp_path):
    """Another pi_ref, other pairs, other lengths, a torn, foreign or tampered file: computed again."""
    model, tokenizer = tiny_model
    examples = toy_examples(tokenizer, 4, seed=5)
    pairs = [(examples[0], (examples[0][0], examples[1][1])), (examples[2], (examples[2][0], examples[3][1]))]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "model.safetensors").write_bytes(b"pi_ref")
    (tmp_path / "train.jsonl").write_text("pairs\n")
    args = dpo.Args(sft_path=str(tmp_path / "sft"), data=str(tmp_path), batch_size=1, logit_chunk=16,
                    reference_only=True)
    path = tmp_path / "reference_logps.pt"
    ref = lambda: dpo.reference_logps(args, model, pairs, tokenizer.pad_token_id, torch.device("cpu"))  # noqa
    direct = [lm.sequence_logps_plain(model, lm.collate([p[k] for p in pairs], tokenizer.pad_token_id))[0]
              for k in (0, 1)]
    first = ref()
    for a, b in zip(first, direct):
        torch.testing.assert_close(a.double(), b.detach(), atol=1e-5, rtol=0)
    saved = path.stat().st_mtime_ns
    assert all(torch.equal(a, b) for a, b in zip(ref(), first)) and path.stat().st_mtime_ns == saved  # read

    def recomputed(change):
        before = path.read_bytes()
        change()
        ref()
        return path.read_bytes() != before or not path.exists()

    assert recomputed(lambda: (tmp_path / "sft" / "model.safetensors").write_bytes(b"another pi_ref"))
    assert recomputed(lambda: (tmp_path / "train.jsonl").write_text("other pairs\n"))
    assert recomputed(lambda: setattr(args, "max_response_len", 12))
    for damage in (lambda: path.write_bytes(path.read_bytes()[:50]), lambda: path.write_bytes(b"garbage")):
        damage()
        assert all(torch.equal(a, b) for a, b in zip(ref(), first))
    saved = torch.load(path, weights_only=True)
    saved["logps"] = tuple(t + 1.0 for t in saved["logps"])  # shifted values, the checksum of the old ones
    torch.save(saved, path)
    assert all(torch.equal(a, b) for a, b in zip(ref(), first))


@pytest.mark.parametrize("flags", [["--weight", "adaptive"], ["--weight", "clipped", "--loss_type", "ipo"],
                                   ["--weight", "full", "--behaviour_logps", "--loss_type", "chipo"]])
def test_is_dpo_runs_and_logs_weights(tmp_path_factory, tiny_world, flags):
    out = run(tmp_path_factory, "is_dpo.py", "--sft_path", tiny_world / "sft", "--data",
              tiny_world / "prefs.jsonl", "--runs_dir", tiny_world / "runs_is", *COMMON,
              "--num_checkpoints", 1, *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    name = [n for n in os.listdir(tiny_world / "runs_is") if n.startswith(is_dpo.method_name(is_dpo.Args(
        weight=flags[1],
        loss_type=flags[flags.index("--loss_type") + 1] if "--loss_type" in flags else "dpo")))][0]
    log = read_log(tiny_world / "runs_is" / name)
    for row in log:
        assert {"weight_mean", "weight_max", "ess", "loss", "margin", "accuracy", "epoch"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    if "--behaviour_logps" not in flags:  # first step: the policy is pi_ref, every weight is 1
        assert log[0]["weight_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("script,flags,message", [
    ("dpo", {"beta": 0}, "--beta"),
    ("dpo", {"beta": -0.1}, "--beta"),
    ("dpo", {"loss_type": "kto"}, "--loss_type"),
    ("is_dpo", {"weight": "huge"}, "--weight"),
    ("is_dpo", {"weight": "fixed", "alpha": 1.5}, "--alpha"),
    ("dpo", {"sft_path": "/nonexistent/sft"}, "not found"),
    ("dpo", {"data": "/nonexistent/prefs.jsonl"}, "not found"),
    ("dpo", {"batch_size": 0}, "--batch_size"),
    ("is_dpo", {"behaviour_logps": True, "data": "WORLD"}, "chosen_behaviour_logp"),
    ("dpo", {"num_checkpoints": 0}, "--num_checkpoints"),
    ("dpo", {"label_smoothing": 0.5}, "--label_smoothing"),
    ("dpo", {"label_smoothing": -0.1}, "--label_smoothing"),
    ("dpo", {"label_smoothing": 0.2, "loss_type": "ipo"}, "--label_smoothing"),
    ("is_dpo", {"weight": "clipped", "log_w_max": -50.0}, "--log_w_max"),
])
def test_bad_input_gives_one_line(tiny_world, script, flags, message):
    base = {"sft_path": str(tiny_world / "sft"), "data": str(tiny_world / "prefs.jsonl"),
            "runs_dir": str(tiny_world / "bad"), **flags}
    base["data"] = (str(tiny_world / "world" / "prefs_human.jsonl") if base["data"] == "WORLD"
                    else base["data"])
    with pytest.raises(SystemExit) as e:
        if script == "dpo":
            dpo.train(dpo.Args(**base))
        else:
            is_dpo.main(is_dpo.Args(**base))
    assert str(e.value).startswith("error:") and message in str(e.value)
    assert not os.path.exists(tiny_world / "bad")


def test_bad_input_on_the_command_line_is_one_line(tmp_path_factory, tiny_world):
    out = run(tmp_path_factory, "dpo.py", "--sft_path", tiny_world / "sft", "--data",
              tiny_world / "prefs.jsonl", "--beta", 0)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: --beta must be > 0, got 0.0"]


def test_shared_prompt_benchmark_runs_and_its_variants_agree(tmp_path_factory):
    flags = ["--pairs", "3", "--prompt_len", "9", "--response_len", "4", "--n_embd", "32", "--reps", "1",
             "--threads", "1"]
    proc = run(tmp_path_factory, "bench/shared_prompt.py", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = float(proc.stdout.split("max |difference| of the log-probs ")[1].split()[0])
    assert diff < 1e-4
    assert "two full sequences" in proc.stdout and "shared prompt (ours)" in proc.stdout


def test_chipo_matches_huang_naive_formula_values_and_gradients():
    # naive: phi(z) = z + log z with z = pi_theta / pi_ref formed explicitly, float64, no overflow guard
    torch.manual_seed(0)
    r_w, r_l = torch.randn(64, dtype=torch.float64) * 3, torch.randn(64, dtype=torch.float64) * 3
    for beta, r_max in [(0.1, 5.0), (0.01, 5.0), (0.5, 0.7)]:
        a, b = r_w.clone().requires_grad_(), r_l.clone().requires_grad_()
        zero = torch.zeros(64, dtype=torch.float64)
        ours = dpo.chipo_loss(a, b, zero, zero, beta, r_max)
        ours.sum().backward()
        c, d = r_w.clone().requires_grad_(), r_l.clone().requires_grad_()
        z_w, z_l = torch.exp(c), torch.exp(d)
        naive = -F.logsigmoid(torch.clamp(beta * ((z_w + torch.log(z_w)) - (z_l + torch.log(z_l))),
                                          -2 * r_max, 2 * r_max))
        naive.sum().backward()
        torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-12)


def test_chipo_keeps_its_chi2_gradient_where_the_isdaa_form_is_dpo():
    # r_w = 6 > c = 5: the IS-DAAs form's exp term is clamped (no gradient); Huang's is not (margin 0.41 < 10)
    beta, r = 0.001, torch.tensor([6.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo.chipo_loss(r, zero, zero, zero, beta, 5.0).sum().backward()
    margin = beta * (6 + math.exp(6) - 1)
    assert r.grad.item() == pytest.approx(-sig(-margin) * beta * (1 + math.exp(6)), rel=1e-10)
    r.grad = None
    dpo.chipo_isdaa_loss(r, zero, zero, zero, beta, 5.0).sum().backward()
    assert r.grad.item() == pytest.approx(-sig(-beta * (6 + math.exp(5) - 1)) * beta, rel=1e-10)


def test_chipo_never_overflows_and_stops_past_its_clip():
    for dtype in (torch.float32, torch.float64):
        r_w = torch.tensor([1000.0, 999.0, -1000.0, 80.0, 90.0], dtype=dtype, requires_grad=True)
        r_l = torch.tensor([999.0, 1000.0, -999.0, 80.0, 89.9], dtype=dtype)
        zero = torch.zeros(5, dtype=dtype)
        losses = dpo.chipo_loss(r_w, r_l, zero, zero, 0.01, 5.0)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(r_w.grad).all()
        # past the clip: -log sigmoid(+-10) and no gradient; tiny ratios: the DPO-like term alone, margin
        # 0.01 * (-1); equal ratios: margin 0, loss log 2
        expected = [-math.log(sig(10)), -math.log(sig(-10)), -math.log(sig(-0.01)), math.log(2),
                    -math.log(sig(10))]
        torch.testing.assert_close(losses, torch.tensor(expected, dtype=dtype), rtol=1e-5, atol=1e-6)
        assert r_w.grad[[0, 1, 4]].abs().max() == 0 and r_w.grad[2] != 0


def test_a_full_disk_while_saving_the_reference_logps_is_one_line_and_leaves_nothing(tiny_world, tmp_path,
                                                                                     monkeypatch):
    """torch.save reports a full disk as a RuntimeError and leaves a torn file: one error line, no file beside
    the pairs (neither torn nor whole); once there is room again the same command saves them."""
    data = tmp_path / "prefs.jsonl"
    data.write_bytes((tiny_world / "prefs.jsonl").read_bytes())
    args = dict(sft_path=str(tiny_world / "sft"), data=str(data), runs_dir=str(tmp_path / "runs"),
                batch_size=8, reference_only=True)
    save = torch.save

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"torn")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . "
                           "PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        dpo.train(dpo.Args(**args))
    assert str(e.value).startswith("error: could not write") and "reference_logps.pt" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["prefs.jsonl"]
    monkeypatch.setattr(torch, "save", save)
    dpo.train(dpo.Args(**args))
    assert sorted(os.listdir(tmp_path)) == ["prefs.jsonl", "reference_logps.pt"]
