"""evaluate.py: the KL estimator against exact enumeration, win-rate ties, re-runs, the main job end to
end."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import policy
from test_toy_tldr import submit_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_lm(vocab, seed):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).double().eval()
    with torch.no_grad():  # sharpen the random model so the two distributions differ clearly
        model.get_output_embeddings().weight.mul_(40)
    return model


def test_kl_of_policy_against_itself_is_zero():
    model = tiny_lm(5, 0)
    examples = [([0, 1, 2], [3, 4, 1]), ([1], [4]), ([2, 2, 2, 2], [0, 3])]
    assert torch.equal(evaluate.sequence_kl(model, model, examples, pad_id=0),
                       torch.zeros(3, dtype=torch.float64))


def all_responses(tokens, eos, max_len):
    """Every response the sampler can return: cut after the first EOS, or at max_len."""
    out = []
    for n in range(max_len):
        out += [list(s) + [eos] for s in itertools.product(tokens, repeat=n)]
    out += [list(s) for s in itertools.product(tokens, repeat=max_len)]
    return out


def seq_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits.log_softmax(-1)[0, len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


def test_kl_estimator_expectation_matches_exact_kl():
    """Vocabulary {0, 1, EOS=2}, responses of at most 3 tokens: enumerate all 15 of them."""
    model, ref = tiny_lm(3, 1), tiny_lm(3, 2)
    prompt, eos = [0, 1], 2
    ys = all_responses([0, 1], eos, 3)
    p = torch.tensor([math.exp(seq_logp(model, prompt, y)) for y in ys], dtype=torch.float64)
    q = torch.tensor([math.exp(seq_logp(ref, prompt, y)) for y in ys], dtype=torch.float64)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    exact = (p * (p.log() - q.log())).sum()
    estimator = evaluate.sequence_kl(model, ref, [(prompt, y) for y in ys], pad_id=0)
    assert exact.item() > 0.05  # the test means something only if the two models differ
    assert (p * estimator).sum().item() == pytest.approx(exact.item(), rel=1e-9)

    # and with the real sampler: the Monte Carlo mean lands within sampling error of the exact KL
    g = torch.Generator().manual_seed(0)
    n = 3000
    outs, _ = policy.sample(model.float(), [prompt] * n, eos, 0, 3, temperature=1.0, batch_size=1000,
                            generator=g)
    model.double()
    kl = evaluate.sequence_kl(model, ref, [(prompt, o) for o in outs], pad_id=0)
    assert abs(kl.mean().item() - exact.item()) < 4 * kl.std().item() / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# the main job end to end at a tiny size, then evaluate's re-run and bad inputs on its outputs

TINY = {
    "WORLD_FLAGS": "--num_sft 240 --num_human_pairs 96 --num_eval 12",
    "SFT_FLAGS": "--steps 20 --lr 0.01 --warmup_steps 0 --batch_size 16 --val_size 16 --num_sample_eval 4 "
                 "--n_layer 1 --n_embd 32 --n_head 2",
    "RM_FLAGS": "--steps 3 --batch_size 8 --val_size 16",
    "LABEL_FLAGS": "--num_prompts 48",
    "DAA_FLAGS": "--num_epochs 4 --batch_size 2 --num_checkpoints 2 --warmup_steps 0 --lr 1e-2",
    "EVAL_FLAGS": "--num_prompts 6",
    "GAUSS_FLAGS": "--n_theta 5 --n_samples 100 --t_max 3 --n_mc 200",
    "CAT_FLAGS": "--steps 10 --num_checkpoints 3 --num_pairs 300",
    "SEEDS": "0",
    "RUNS": "dpo:0.01 ais-dpo:0.01 is-dpo:0.01",
}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    env = {**os.environ, **TINY, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_main_job_writes_the_contract(main_job):
    out, stdout = main_job
    for path in ["toy_tldr/sft.jsonl", "sft/metrics.json", "prefs/train.jsonl", "eval/check.md",
                 "eval/results.jsonl", "eval/summary.md", "plots/tradeoff.png", "plots/dynamics.png",
                 "toy_gaussian/results.json", "toy_gaussian/correlation.png", "toy_gaussian/variance.png",
                 "toy_categorical/check.md", "toy_categorical/dynamics.png"]:
        assert (out / path).is_file(), path
    rows = evaluate.read_results(out / "eval" / "results.jsonl")
    assert sorted({r["method"] for r in rows}) == ["ais-dpo", "dpo", "is-dpo"]
    ckpts = list(out.glob("runs/*/ckpt-*"))
    # one row per checkpoint; each run has at least step 0 and its end
    assert len(rows) == len(ckpts) >= 3 * 2
    for r in rows:
        assert {"run", "method", "beta", "seed", "step", "epoch", "kl", "win_rate", "true_win_rate",
                "mean_length"} <= set(r)
        assert 0 <= r["win_rate"] <= 1 and r["kl"] >= -1e-6
        if r["step"] == 0:  # the step-0 checkpoint is pi_ref itself
            assert abs(r["kl"]) < 1e-5
    assert "tradeoff.png" in stdout and "| claim |" in stdout
    assert not (out / "gold_rm").exists()  # the true scorer judged: no gold reward model was trained
    prefs = [json.loads(line) for line in open(out / "prefs" / "train.jsonl")]
    assert all(r["chosen_score"] == r["chosen_true_score"] > r["rejected_score"] == r["rejected_true_score"]
               for r in prefs)


def test_evaluate_rerun_adds_no_rows(main_job):
    out, _ = main_job
    before = (out / "eval" / "results.jsonl").read_text()
    evaluate.main(evaluate.Args(runs=str(out / "runs" / "*"), data=str(out / "toy_tldr"),
                                gold_path=str(out / "gold_rm"),
                                out_dir=str(out / "eval"), plots_dir=str(out / "plots"), num_prompts=6))
    assert (out / "eval" / "results.jsonl").read_text() == before


def test_step_0_is_evaluated_once_and_equals_a_fresh_evaluation(main_job, tmp_path):
    """Every run starts at pi_ref, so evaluate.py evaluates step 0 once and shares the row: it must be what
    evaluating one run's ckpt-0 alone gives."""
    out, _ = main_job
    metric_keys = ["kl", "win_rate", "true_win_rate", "true_score", "mean_length", "example"]
    rows = evaluate.read_results(out / "eval" / "results.jsonl")
    starts = [r for r in rows if r["step"] == 0]
    assert len(starts) == 3
    assert all([r[k] for k in metric_keys] == [starts[0][k] for k in metric_keys] for r in starts)
    last = sorted(out.glob("runs/*"))[-1]
    evaluate.main(evaluate.Args(runs=str(last), data=str(out / "toy_tldr"), gold_path=str(out / "gold_rm"),
                                out_dir=str(tmp_path / "e"), plots_dir=str(tmp_path / "p"), num_prompts=6))
    alone = [r for r in evaluate.read_results(tmp_path / "e" / "results.jsonl") if r["step"] == 0]
    assert [alone[0][k] for k in metric_keys] == [starts[0][k] for k in metric_keys]
    later = [r for r in rows if r["step"] > 0]
    assert any(r["kl"] > 0 for r in later)  # later steps were evaluated for real, not copied from step 0


def test_shards_together_give_every_checkpoint_once_and_the_same_rows(main_job, tmp_path):
    out, _ = main_job
    kw = dict(runs=str(out / "runs" / "*"), data=str(out / "toy_tldr"), gold_path=str(out / "gold_rm"),
              out_dir=str(tmp_path / "e"), plots_dir=str(tmp_path / "p"), num_prompts=6)
    for i in (1, 0):  # the order does not matter: a shard's share is fixed by the list of all checkpoints
        evaluate.main(evaluate.Args(**kw, shard=f"{i}/2"))
    assert not (tmp_path / "p").exists()  # shards draw no plots
    shards = {(r["run"], r["step"]): r for r in evaluate.read_results(tmp_path / "e" / "results.jsonl")}
    written = evaluate.read_results(tmp_path / "e" / "results.jsonl")
    assert len(shards) == len(list(out.glob("runs/*/ckpt-*"))) == len(written)
    # run.sh's shards, one thread each, like these
    whole = evaluate.read_results(out / "eval" / "results.jsonl")
    for r in whole:
        s = shards[(r["run"], r["step"])]
        assert s["win_rate"] == r["win_rate"] and s["kl"] == pytest.approx(r["kl"], abs=1e-6)
    evaluate.main(evaluate.Args(**kw, plots_only=True))
    assert (tmp_path / "p" / "tradeoff.png").is_file() and (tmp_path / "e" / "summary.md").is_file()


def run_eval(tmp_path_factory, *flags):
    """`python evaluate.py <flags>` on the session's runner (see test_toy_tldr.py)."""
    return submit_cli(tmp_path_factory, "evaluate.py", *flags).result(timeout=600)


def test_evaluate_bad_inputs(tmp_path_factory, main_job, tmp_path):
    out, _ = main_job
    base = ["--data", out / "toy_tldr", "--gold_path", out / "gold_rm", "--out_dir", tmp_path / "e",
            "--plots_dir", tmp_path / "p"]
    cases = []
    cases.append((["--runs", tmp_path / "nothing*", *base], "matches no run"))
    broken = tmp_path / "runs" / "broken"
    (broken / "ckpt-0").mkdir(parents=True)
    (broken / "args.json").write_text(json.dumps({"run_name": "broken"}))
    cases.append((["--runs", broken, *base], "holds no model"))
    noref = tmp_path / "noref.jsonl"
    noref.write_text(json.dumps({"prompt": "SUBREDDIT: r/tifu TITLE: x POST: hi . TL;DR:"}) + "\n")
    cases.append((["--runs", out / "runs" / "*", "--data", noref, *base[2:]], "hidden scorer"))
    mixed = tmp_path / "mixed"  # two runs, the second with a tokenizer of another vocabulary
    mixed.mkdir()
    for name in ("a", "b"):
        subprocess.run(["cp", "-r", str(out / "runs" / "dpo_beta0.01_seed0"), str(mixed / name)], check=True)
    for ckpt in (mixed / "b").glob("ckpt-*"):
        vocab = json.loads((ckpt / "tokenizer.json").read_text())
        vocab["model"]["vocab"]["zzz_new_word"] = len(vocab["model"]["vocab"])
        (ckpt / "tokenizer.json").write_text(json.dumps(vocab))
    cases.append((["--runs", mixed / "*", *base], "tokenizer"))
    cases.append((["--runs", out / "runs" / "*", *base, "--judge", "rm", "--gold_path", tmp_path / "no_rm"],
                  "not found"))
    cases.append((["--runs", out / "runs" / "*", *base, "--shard", "2/2"], "--shard"))
    for flags, message in cases:
        proc = run_eval(tmp_path_factory, *flags)
        assert proc.returncode != 0, flags
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, last
        assert not (tmp_path / "e" / "results.jsonl").exists()


def test_evaluate_replaces_rows_of_a_retrained_run(main_job):
    out, _ = main_job
    args = evaluate.Args(runs=str(out / "runs" / "*"), data=str(out / "toy_tldr"),
                         gold_path=str(out / "gold_rm"),
                         out_dir=str(out / "eval"), plots_dir=str(out / "plots"), num_prompts=6)
    run_args = out / "runs" / "dpo_beta0.01_seed0" / "args.json"
    a = json.loads(run_args.read_text())
    a["run_id"] = "retrained"  # what dpo.py writes when the run is trained again
    run_args.write_text(json.dumps(a))
    evaluate.main(args)
    rows = evaluate.read_results(out / "eval" / "results.jsonl")
    mine = [r for r in rows if r["run"] == "dpo_beta0.01_seed0"]
    assert len(rows) == len(list(out.glob("runs/*/ckpt-*")))
    assert len(mine) == len(list(out.glob("runs/dpo_beta0.01_seed0/ckpt-*")))
    assert all(r["run_id"] == "retrained" for r in mine)


def test_win_rate_counts_a_tie_as_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 3.5, -1.0]) == (0.5 + 1 + 0 + 1) / 4
    assert evaluate.win_rate([2.0, 2.0], [2.0, 2.0]) == 0.5
    assert evaluate.win_rate([3.0, 1.0], [2.0, 2.0]) == 0.5


def student_t_cdf(x, df, steps=200_000):
    """P(T <= x) for Student's t, by the trapezoid rule on its density (an independent check of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    grid = torch.linspace(0.0, x, steps, dtype=torch.float64)
    density = c * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + torch.trapezoid(density, grid).item()


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_quantiles_are_the_975_points(df):
    q = evaluate.T975[df - 1]
    assert student_t_cdf(q, df) == pytest.approx(0.975, abs=2e-4)


def test_mean_ci_by_hand():
    mean, low, high = evaluate.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # sample sd sqrt(2.5), t_{0.975, 4} = 2.776
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert math.isnan(evaluate.mean_ci([1.0])[1])


def synthetic_rows(curves):
    """results rows from {(method, beta, seed): [(win_rate, kl), ...]} over evenly spaced steps."""
    return [{"run": f"{m}_{b}_{s}", "method": m, "beta": b, "seed": s, "step": i,
             "fraction": i / (len(c) - 1),
             "win_rate": w, "kl": kl} for (m, b, s), c in curves.items() for i, (w, kl) in enumerate(c)]


def test_claims_hold_for_a_clear_effect_and_fail_without_one():
    clear = {}
    for s in range(5):
        e = 0.01 * s  # replicates differ a little
        clear[("dpo", 0.01, s)] = [(0.40, 0.0), (0.60 + e, 2.0), (0.42 + e, 10.0)]  # hump 0.18
        # ends 0.15 - 2e above, KL 0.3
        clear[("ais-dpo", 0.01, s)] = [(0.40, 0.0), (0.58, 1.0), (0.57 - e, 3.0)]
        clear[("dpo", 0.1, s)] = [(0.40, 0.0), (0.50, 1.0), (0.49 + e / 2, 1.5)]     # hump 0.01 - e/2
    results = evaluate.claims(synthetic_rows(clear))
    assert [c.replicates for c in results] == [5, 5, 5, 5] and all(c.holds for c in results)
    control = dict(clear)  # another method beside the claims: compared with DPO by seed, never a verdict
    for s in range(5):
        control[("ais-sn-dpo", 0.01, s)] = [(0.40, 0.0), (0.55, 2.0), (0.45 + 0.01 * s, 5.0)]
    extra = [c for c in evaluate.claims(synthetic_rows(control)) if c.holds is None]
    assert len(extra) == 2
    assert extra[0].ci.mean == pytest.approx(0.45 - 0.42) and extra[1].ci.mean == pytest.approx(0.5)
    assert evaluate.check_table(synthetic_rows(control))[1] is True
    hump = results[0].ci
    assert hump.mean == pytest.approx(0.18 - 0.0) and hump.low < hump.mean < hump.high
    diff = results[1].ci
    assert diff.mean == pytest.approx(np.mean([0.15 - 2 * 0.01 * s for s in range(5)]))
    assert results[2].ci.mean == pytest.approx(0.3)
    # no hump, AIS no better, same KL: every claim but the beta-0.1 one fails
    flat = {k: [(0.40, 0.0), (0.50, 2.0), (0.50 + 0.01 * k[2], 4.0)] for k in clear}
    results = evaluate.claims(synthetic_rows(flat))
    assert [c.holds for c in results] == [False, False, False, True]
    # one seed alone carries a hump: the mean passes 0.10 but the CI does not clear 0.05
    lucky = dict(clear)
    for s in range(1, 5):
        lucky[("dpo", 0.01, s)] = [(0.40, 0.0), (0.50, 2.0), (0.50, 4.0)]
    lucky[("dpo", 0.01, 0)] = [(0.40, 0.0), (0.90, 2.0), (0.40, 4.0)]
    assert evaluate.claims(synthetic_rows(lucky))[0].holds is False


def test_claims_pair_methods_by_seed():
    """AIS-DPO's seeds are compared with DPO's seeds of the same number: a difference between replicates
    that both methods share cancels."""
    curves = {}
    for s in range(5):
        base = 0.1 * s  # a strong replicate effect, the same for both methods
        curves[("dpo", 0.01, s)] = [(0.3 + base, 1.0), (0.3 + base, 2.0)]
        curves[("ais-dpo", 0.01, s)] = [(0.3 + base, 1.0), (0.42 + base, 1.0)]
    results = evaluate.claims(synthetic_rows(curves))
    mean, low, high = results[1].ci
    assert mean == pytest.approx(0.12) and low == pytest.approx(0.12) and high == pytest.approx(0.12)


def test_a_gold_reward_model_can_judge_and_the_truth_is_reported_beside_it(
        tmp_path_factory, main_job, tmp_path):
    """--judge rm: win_rate is the gold RM's (a tie would count half); true_win_rate is still the scorer's."""
    from test_toy_tldr import pipeline_stage

    out, _ = main_job
    gold = pipeline_stage(tmp_path_factory, "gold_rm")  # another world's RM: the toy vocabulary is fixed
    evaluate.main(evaluate.Args(runs=str(out / "runs" / "dpo_*"), data=str(out / "toy_tldr"), judge="rm",
                                gold_path=str(gold), out_dir=str(tmp_path / "e"),
                                plots_dir=str(tmp_path / "p"),
                                num_prompts=6))
    rows = evaluate.read_results(tmp_path / "e" / "results.jsonl")
    truth = {(r["run"], r["step"]): r for r in evaluate.read_results(out / "eval" / "results.jsonl")}
    assert rows and all(r["win_rate"] == r["gold_win_rate"] for r in rows)
    for r in rows:  # same samples (same seed and prompts), so the truth's verdict is unchanged
        assert r["true_win_rate"] == truth[(r["run"], r["step"])]["true_win_rate"]
