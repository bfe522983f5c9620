"""extras/rloo.py and extras/online_dpo.py: the leave-one-out advantage by hand, the RLOO gradient against the
exact policy gradient of a small categorical policy, online DPO on given pairs against dpo.py, both end to
end."""
import itertools
import json
import os

import pytest
import torch

import dpo
import lm
from extras import online_dpo, rloo
from test_dpo import read_log, run, tiny_world  # noqa: F401 (tiny_world is a fixture)


def test_leave_one_out_advantage_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.5, 0.5, -1.0]])
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0.5 - (-0.25), 0.5 - (-0.25), -1 - 0.5]])
    assert torch.allclose(rloo.leave_one_out_advantages(rewards), expected)
    pair = rloo.leave_one_out_advantages(torch.tensor([[3.0, 1.0]]))  # k = 2: each against the other
    assert pair.tolist() == [[2.0, -2.0]]


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_gradient_is_the_exact_policy_gradient(k):
    """A categorical policy over 4 responses, softmax(theta). Enumerate every k-tuple of samples: the
    expected gradient of the RLOO surrogate, weighted by the tuple's probability, equals the exact gradient
    of E_pi[r] (the leave-one-out baseline adds no bias)."""
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    exact, = torch.autograd.grad((theta.softmax(0) * r).sum(), theta)
    expected = torch.zeros(4, dtype=torch.float64)
    p = theta.softmax(0).detach()
    for ys in itertools.product(range(4), repeat=k):
        ys = torch.tensor(ys)
        logps = theta.log_softmax(0)[ys]
        adv = rloo.leave_one_out_advantages(r[ys][None])[0]
        g, = torch.autograd.grad(-rloo.rloo_loss(logps, adv), theta)  # ascent direction
        expected += p[ys].prod() * g
    assert torch.allclose(expected, exact, atol=1e-12)


def test_online_dpo_on_given_pairs_is_offline_dpo(tmp_path_factory, tiny_world, tmp_path):  # noqa: F811
    """A sampler that returns the offline pairs every step: the same train_log as dpo.py, one batch of
    all 48 pairs a step for two steps."""
    common = ["--sft_path", tiny_world / "sft", "--seed", 3, "--lr", 1e-3, "--warmup_steps", 1]
    off = run(tmp_path_factory, "dpo.py", *common, "--data", tiny_world / "prefs.jsonl", "--runs_dir",
              tmp_path / "off", "--batch_size", 48, "--num_epochs", 2, "--num_checkpoints", 1)
    assert off.returncode == 0, off.stderr[-2000:]
    d_args = dpo.Args(sft_path=str(tiny_world / "sft"), data=str(tiny_world / "prefs.jsonl"))
    _, pairs = dpo.load_pairs(d_args, lm.load_tokenizer(d_args.sft_path))
    args = online_dpo.Args(sft_path=str(tiny_world / "sft"), data=str(tiny_world / "world"), judge="true",
                           seed=3, lr=1e-3, warmup_steps=1, steps=2, prompts_per_step=4, num_checkpoints=1,
                           runs_dir=str(tmp_path / "on"))
    online_dpo.main(args, sampler=lambda a, r, prompts: pairs)
    offline = read_log(tmp_path / "off" / "dpo_beta0.01_seed3")
    online = read_log(tmp_path / "on" / "online-dpo_beta0.01_seed3")
    assert len(offline) == len(online) == 2
    for a, b in zip(offline, online):
        for key in a:
            if key != "epoch":
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert sorted(os.listdir(tmp_path / "on" / "online-dpo_beta0.01_seed3")) == \
        [".stage.json", "args.json", "ckpt-0", "ckpt-2", "train_log.jsonl"]


def test_rloo_and_online_dpo_end_to_end(tmp_path_factory, tiny_world, tmp_path):  # noqa: F811
    """The proxy on the pairs, RLOO and online DPO at a tiny size, and evaluate.py reading their runs."""
    proxy = run(tmp_path_factory, "reward.py", "--mode", "train", "--sft_path", tiny_world / "sft", "--data",
                tiny_world / "prefs.jsonl", "--out_dir", tmp_path / "proxy", "--steps", 2, "--batch_size", 8,
                "--val_size", 8)
    assert proxy.returncode == 0, proxy.stderr[-2000:]
    tiny = ["--sft_path", tiny_world / "sft", "--data", tiny_world / "world", "--proxy_path",
            tmp_path / "proxy", "--runs_dir", tmp_path / "runs", "--steps", 2, "--prompts_per_step", 4,
            "--num_prompts", 16, "--num_checkpoints", 2, "--max_response_len", 8, "--seed", 1]
    cases = (("extras/rloo.py", ["--k", 3]), ("extras/online_dpo.py", []),
             ("extras/online_dpo.py", ["--judge", "true", "--run_name", "od-true"]))
    for script, flags in cases:
        result = run(tmp_path_factory, script, *tiny, *flags)
        assert result.returncode == 0, result.stderr[-2000:]
    log = read_log(tmp_path / "runs" / "rloo_beta0.01_seed1")
    assert [row["step"] for row in log] == [1, 2] and all("advantage_abs" in row for row in log)
    ev = run(tmp_path_factory, "evaluate.py", "--runs", f"{tmp_path / 'runs'}/*", "--data",
             tiny_world / "world",
             "--out_dir", tmp_path / "eval", "--plots_dir", tmp_path / "plots", "--num_prompts", 4,
             "--kl_prompts", 4, "--max_response_len", 8)
    assert ev.returncode == 0, ev.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "results.jsonl")]
    assert {(r["method"], r["step"]) for r in rows} >= {("rloo", 0), ("rloo", 2), ("online-dpo", 2)}
    assert {r["run"] for r in rows} == {"rloo_beta0.01_seed1", "online-dpo_beta0.01_seed1", "od-true"}
    assert json.load(open(tmp_path / "runs" / "rloo_beta0.01_seed1" / "args.json"))["k"] == 3


def test_experiment_report_from_rows(tmp_path):
    """experiments/online.py's table and figure from evaluate.py rows: means over seeds, each method once."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "experiments"))
    import online

    rows = [{"method": m, "beta": 0.01, "seed": seed, "step": step, "fraction": step / 2, "kl": step * 1.0,
             "true_win_rate": 0.4 + 0.1 * step * (m == "rloo") + 0.01 * seed, "gold_win_rate": 0.5,
             "true_score": 3.0} for m in ("dpo", "rloo") for seed in (0, 1) for step in (0, 1, 2)]
    online.report(rows, str(tmp_path), "proxy", {"total_s": 1})
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| rloo | 2 | 0.61 ± 0.01 | 0.61 ± 0.01 | 0.50 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 |" in table
    assert "| dpo | 2 | 0.41 ± 0.01 |" in table and "online-dpo" not in table
    assert (tmp_path / "report" / "online.png").stat().st_size > 0
