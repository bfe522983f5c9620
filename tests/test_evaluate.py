"""evaluate.py and claims.py: the KL estimator against exact enumeration, win-rate ties, the claims'
statistics, the results file; then, on a tiny world with hand-made runs, the evaluation end to end: one row
per checkpoint, re-runs, step 0 shared, --shard and torchrun, retrained runs, a gold RM as the judge, bad
inputs."""
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import claims
import evaluate
import lm
import reward
import stage
import toy_tldr

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


@pytest.mark.core
def test_kl_of_policy_against_itself_is_zero():
    model = tiny_lm(5, 0)
    examples = [([0, 1, 2], [3, 4, 1]), ([1], [4]), ([2, 2, 2, 2], [0, 3])]
    kl = evaluate.sequence_kl(model, model, examples, pad_id=0)
    assert torch.equal(kl, torch.zeros(3, dtype=torch.float64))


def all_responses(tokens, eos, max_len):
    """Every response the sampler can return: cut after the first EOS, or at max_len."""
    out = []
    for n in range(max_len):
        out += [list(s) + [eos] for s in itertools.product(tokens, repeat=n)]
    return out + [list(s) for s in itertools.product(tokens, repeat=max_len)]


def seq_logp(model, prompt, response):
    logp = model(input_ids=torch.tensor([prompt + response])).logits.log_softmax(-1)[0, len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


@pytest.mark.core
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
    n, g = 3000, torch.Generator().manual_seed(0)
    outs, _ = lm.sample(model.float(), [prompt] * n, eos, 0, 3, temperature=1.0, batch_size=1000, generator=g)
    kl = evaluate.sequence_kl(model.double(), ref, [(prompt, o) for o in outs], pad_id=0)
    assert abs(kl.mean().item() - exact.item()) < 4 * kl.std().item() / math.sqrt(n)


@pytest.mark.core
def test_win_rate_counts_a_tie_as_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 3.5, -1.0]) == (0.5 + 1 + 0 + 1) / 4
    assert evaluate.win_rate([2.0, 2.0], [2.0, 2.0]) == 0.5
    assert evaluate.win_rate([3.0, 1.0], [2.0, 2.0]) == 0.5


@pytest.mark.core
def test_the_papers_strict_win_rate_differs_by_the_ties_half_and_is_not_the_default():
    """--ties loss (the paper's strict >) against --ties half (the default, unchanged): on scores with ties
    the two differ by exactly the share of ties times the half a tie counts; without ties they are equal."""
    rng = np.random.default_rng(0)
    ours, reference = rng.integers(0, 4, 1000), rng.integers(0, 4, 1000)  # discrete scores: many ties
    ties = np.mean(ours == reference)
    half, loss = evaluate.win_rate(ours, reference, "half"), evaluate.win_rate(ours, reference, "loss")
    assert ties > 0.2 and half - loss == pytest.approx(0.5 * ties, abs=1e-12)
    assert loss == np.mean(ours > reference)
    assert evaluate.win_rate(ours, reference) == half and evaluate.Args().ties == "half"
    continuous = rng.normal(size=100), rng.normal(size=100)
    assert evaluate.win_rate(*continuous, "loss") == evaluate.win_rate(*continuous) > 0


def student_t_cdf(x, df, steps=200_000):
    """P(T <= x) for Student's t, by the trapezoid rule on its density (an independent check of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    grid = torch.linspace(0.0, x, steps, dtype=torch.float64)
    return 0.5 + torch.trapezoid(c * (1 + grid ** 2 / df) ** (-(df + 1) / 2), grid).item()


@pytest.mark.core
@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_quantiles_are_the_975_points(df):
    assert student_t_cdf(claims.T975[df - 1], df) == pytest.approx(0.975, abs=2e-4)


@pytest.mark.core
def test_mean_ci_by_hand():
    mean, low, high = claims.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # sample sd sqrt(2.5), t_{0.975, 4} = 2.776
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert math.isnan(claims.mean_ci([1.0])[1])


def synthetic_rows(curves, hold=claims.LAST):
    """results rows from {(method, beta, seed): [(win_rate, kl), ...]} over evenly spaced steps, each point
    held for `hold` checkpoints in a row (so that a mean of LAST checkpoints in a row equals the point)."""
    curves = {k: [p for p in c for _ in range(hold)] for k, c in curves.items()}
    return [{"run": f"{m}_{b}_{s}", "method": m, "beta": b, "seed": s, "step": i,
             "fraction": i / (len(c) - 1), "win_rate": w, "kl": kl}
            for (m, b, s), c in curves.items() for i, (w, kl) in enumerate(c)]


@pytest.mark.core
def test_peak_and_final_are_means_of_last_checkpoints_in_a_row():
    # one lucky checkpoint is not a peak, and the last checkpoint alone is not the final value
    run = synthetic_rows({("dpo", 0.01, 0): [(0.4, 0.0), (0.4, 0.1), (0.9, 0.2), (0.4, 0.3), (0.5, 0.4),
                                              (0.6, 0.5), (0.1, 0.6)]}, hold=1)
    assert claims.LAST == 3
    assert claims.peak(run) == pytest.approx((0.9 + 0.4 + 0.5) / 3)  # the best of 5 windows of three
    assert claims.final(run) == pytest.approx((0.5 + 0.6 + 0.1) / 3)
    assert claims.final(run, "kl") == pytest.approx(0.5)
    assert claims.hump(run) == pytest.approx(0.6 - 0.4)
    short = run[:2]  # fewer checkpoints than a window: their mean
    assert claims.peak(short) == claims.final(short) == pytest.approx(0.4)


def clear_effect():
    clear = {}
    for s in range(5):
        e = 0.01 * s  # replicates differ a little
        clear[("dpo", 0.01, s)] = [(0.40, 0.0), (0.60 + e, 2.0), (0.42 + e, 10.0)]  # hump 0.18
        clear[("ais-dpo", 0.01, s)] = [(0.40, 0.0), (0.58, 1.0), (0.57 - e, 3.0)]  # 0.15 - 2e above, KL 0.3
        clear[("dpo", 0.1, s)] = [(0.40, 0.0), (0.50, 1.0), (0.49 + e / 2, 1.5)]  # hump 0.01 - e/2
    return clear


@pytest.mark.core
def test_claims_hold_for_a_clear_effect_and_fail_without_one():
    clear = clear_effect()
    results = claims.claims(synthetic_rows(clear), weights=True)
    assert [c.replicates for c in results] == [5, 5, 5, 5] and all(c.holds for c in results)
    control = dict(clear)  # another method beside the claims: compared with DPO by seed, never a verdict
    for s in range(5):
        control[("ais-sn-dpo", 0.01, s)] = [(0.40, 0.0), (0.55, 2.0), (0.45 + 0.01 * s, 5.0)]
    extra = [c for c in claims.claims(synthetic_rows(control), weights=True) if c.holds is None]
    assert len(extra) == 2
    assert extra[0].ci.mean == pytest.approx(0.45 - 0.42) and extra[1].ci.mean == pytest.approx(0.5)
    assert claims.check_table(synthetic_rows(control), weights=True)[1] is True
    # without weights=True (the language toy) AIS-DPO is compared with DPO beside the claims, no verdict
    plain = claims.claims(synthetic_rows(control))
    assert [c.holds for c in plain] == [True, None, None, None, None, True]
    assert [c.text.split()[3] for c in plain[1:5]] == ["ais-dpo", "ais-dpo", "ais-sn-dpo", "ais-sn-dpo"]
    assert plain[1].ci.mean == pytest.approx(results[1].ci.mean) and plain[2].ci.mean == pytest.approx(0.3)
    bad = {**clear, **{("ais-dpo", 0.01, s): [(0.40, 0.0), (0.1, 9.0)] for s in range(5)}}
    assert claims.check_table(synthetic_rows(bad))[1] is True  # not claimed: cannot fail
    assert claims.check_table(synthetic_rows(bad), weights=True)[1] is False
    hump = results[0].ci
    assert hump.mean == pytest.approx(0.18) and hump.low < hump.mean < hump.high
    assert results[1].ci.mean == pytest.approx(np.mean([0.15 - 2 * 0.01 * s for s in range(5)]))
    assert results[2].ci.mean == pytest.approx(0.3)
    # no hump, AIS no better, same KL: every claim but the beta-0.1 one fails
    flat = {k: [(0.40, 0.0), (0.50, 2.0), (0.50 + 0.01 * k[2], 4.0)] for k in clear}
    assert [c.holds for c in claims.claims(synthetic_rows(flat), weights=True)] == [False, False, False, True]
    # one seed alone carries a hump: the mean passes 0.10 but the CI does not clear 0.05
    lucky = dict(clear)
    for s in range(1, 5):
        lucky[("dpo", 0.01, s)] = [(0.40, 0.0), (0.50, 2.0), (0.50, 4.0)]
    lucky[("dpo", 0.01, 0)] = [(0.40, 0.0), (0.90, 2.0), (0.40, 4.0)]
    assert claims.claims(synthetic_rows(lucky))[0].holds is False


@pytest.mark.core
def test_claims_pair_methods_by_seed():
    """AIS-DPO's seeds are compared with DPO's seeds of the same number: a replicate effect both share
    cancels."""
    curves = {}
    for s in range(5):
        base = 0.1 * s
        curves[("dpo", 0.01, s)] = [(0.3 + base, 1.0), (0.3 + base, 2.0)]
        curves[("ais-dpo", 0.01, s)] = [(0.3 + base, 1.0), (0.42 + base, 1.0)]
    mean, low, high = claims.claims(synthetic_rows(curves), weights=True)[1].ci
    assert mean == pytest.approx(0.12) and low == pytest.approx(0.12) and high == pytest.approx(0.12)


@pytest.mark.core
def test_check_writes_check_md_and_exits_1_when_a_claim_fails(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    for curves, code in ((clear_effect(), None), ({k: [(0.4, 0.0), (0.5, 1.0)] for k in clear_effect()}, 1)):
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(curves)))
        if code is None:
            evaluate.main(evaluate.Args(out_dir=str(out), check=True))
        else:
            with pytest.raises(SystemExit) as stop:
                evaluate.main(evaluate.Args(out_dir=str(out), check=True))
            assert stop.value.code == 1
        assert (out / "check.md").read_text().startswith("| claim |")
    assert "every claim holds" in capsys.readouterr().out


def result_row(step, run="dpo_beta0.1_seed0", run_id="a", settings=None):
    return {"run": run, "run_id": run_id, "method": "dpo", "beta": 0.1, "seed": 0, "step": step,
            "fraction": step / 2, "win_rate": 0.5, "kl": 0.1 * step,
            "settings": settings or {"num_prompts": 4}}


@pytest.mark.core
def test_results_file_a_torn_line_other_settings_and_retrained_runs(tmp_path):
    path = tmp_path / "results.jsonl"
    whole = "".join(json.dumps(result_row(s)) + "\n" for s in (0, 1))
    path.write_text(whole + '{"run": "dpo_be')  # a write cut short
    assert evaluate.read_results(path) == [result_row(0), result_row(1)]
    assert evaluate.read_results(path, repair=True) == [result_row(0), result_row(1)]
    assert path.read_text() == whole
    path.write_text(whole + "not json\n" + whole)
    with pytest.raises(SystemExit, match="line 3 is not a JSON object"):
        evaluate.read_results(path)
    path.write_text(whole)
    run = [evaluate.Run("runs/r", {"run_name": "dpo_beta0.1_seed0", "run_id": "a"}, [])]
    assert evaluate.current_results(path, run, {"num_prompts": 4}) == [result_row(0), result_row(1)]
    with pytest.raises(SystemExit, match=r"2 rows evaluated with other settings \(num_prompts\)"):
        evaluate.current_results(path, run, {"num_prompts": 6})
    retrained = [evaluate.Run("runs/r", {"run_name": "dpo_beta0.1_seed0", "run_id": "b"}, [])]
    assert evaluate.current_results(path, retrained, {"num_prompts": 6}) == []
    assert evaluate.read_results(path) == []


@pytest.mark.core
def test_shard_flag_and_torchrun_are_one_or_the_other(monkeypatch, tmp_path):
    """Under torchrun (here: a World of 2 processes set by hand; init_distributed keeps it) --shard is refused
    with one error line, before any work."""
    monkeypatch.setattr(stage, "WORLD", stage.World(rank=0, size=2))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(evaluate.Args(shard="0/2", runs=str(tmp_path / "none*"), out_dir=str(tmp_path / "e")))
    assert str(stop.value) == ("error: --shard splits the checkpoints between separate commands, torchrun "
                               "between its processes: use one or the other")


# ---------------------------------------------------------------------------------------------
# a tiny toy world, pi_ref (a random tiny model), two runs of hand-made checkpoints, a gold reward model


def save_run(runs_dir, name, method, seed, sft, tokenizer):
    """A run as dpo.py writes one: args.json, ckpt-0 (pi_ref itself) and ckpt-2 (pi_ref moved at random)."""
    run = runs_dir / name
    shutil.copytree(sft, run / "ckpt-0")
    model = lm.load_model(str(sft))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(run / "ckpt-2")
    tokenizer.save_pretrained(run / "ckpt-2")
    (run / "args.json").write_text(json.dumps({
        "run_name": name, "run_id": f"id-{name}", "method": method, "beta": 0.01, "seed": seed,
        "total_steps": 2, "num_epochs": 1.0, "sft_path": str(sft)}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import GPTNeoXForSequenceClassification

    root = tmp_path_factory.mktemp("eval_world")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "w"), num_sft=60, num_human_pairs=60, num_eval=8))
    tokenizer = lm.load_tokenizer(str(root / "w" / "tokenizer"))
    torch.manual_seed(0)
    pi_ref = lm.new_model(tokenizer, 1, 32, 2, 128)
    pi_ref.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    for name, method, seed in (("dpo_beta0.01_seed0", "dpo", 0), ("ais-dpo_beta0.01_seed0", "ais-dpo", 1)):
        save_run(root / "runs", name, method, seed, root / "sft", tokenizer)
    config = pi_ref.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    GPTNeoXForSequenceClassification(config).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return root


def eval_args(root, out, **kw):
    return evaluate.Args(**{"runs": str(root / "runs" / "*"), "data": str(root / "w"),
                            "gold_path": str(root / "rm"), "out_dir": str(out / "e"),
                            "plots_dir": str(out / "p"), "num_prompts": 6, **kw})


def rows_by_checkpoint(path):
    return {(r["run"], r["step"]): r for r in evaluate.read_results(path)}


@pytest.fixture(scope="module")
def evaluated(world, tmp_path_factory):
    """One evaluation of every checkpoint, in this process."""
    out = tmp_path_factory.mktemp("evaluated")
    evaluate.main(eval_args(world, out))
    return out


def test_one_row_per_checkpoint_step_0_shared_and_a_rerun_adds_nothing(world, evaluated):
    rows = evaluate.read_results(evaluated / "e" / "results.jsonl")
    assert len(rows) == len(list(world.glob("runs/*/ckpt-*"))) == 4
    for r in rows:
        assert {"run", "run_id", "method", "beta", "seed", "step", "fraction", "epoch", "kl", "win_rate",
                "true_win_rate", "true_score", "mean_length", "finished", "example", "settings"} <= set(r)
        assert 0 <= r["win_rate"] <= 1 and r["win_rate"] == r["true_win_rate"] and r["kl"] >= -1e-6
    starts = [r for r in rows if r["step"] == 0]  # pi_ref itself: evaluated once, the row shared
    assert len(starts) == 2 and abs(starts[0]["kl"]) < 1e-5
    keys = ["kl", "win_rate", "true_score", "mean_length", "example"]
    assert [starts[0][k] for k in keys] == [starts[1][k] for k in keys]
    assert all(r["kl"] > 1e-3 for r in rows if r["step"] == 2)  # evaluated for real, not copied
    assert (evaluated / "p" / "tradeoff.png").is_file() and (evaluated / "p" / "dynamics.png").is_file()
    assert (evaluated / "e" / "summary.md").read_text().startswith("| method | beta |")
    before = (evaluated / "e" / "results.jsonl").read_text()
    evaluate.main(eval_args(world, evaluated))
    assert (evaluated / "e" / "results.jsonl").read_text() == before


def test_ties_loss_is_recorded_in_every_row_and_the_summary_and_never_mixed(world, evaluated, tmp_path):
    """--ties loss on the same samples: each row's win-rate below the default's by a whole number of half-ties
    (6 prompts; the test above has the ties), the convention in each row's settings and under summary.md's
    table; evaluating into the default's results file is refused in one line."""
    evaluate.main(eval_args(world, tmp_path, ties="loss"))
    half, loss = (rows_by_checkpoint(d / "e" / "results.jsonl") for d in (evaluated, tmp_path))
    assert half.keys() == loss.keys()
    for key, row in loss.items():
        assert row["settings"]["ties"] == "loss"
        assert half[key]["settings"] == {**row["settings"], "ties": "half"}
        assert row["true_score"] == half[key]["true_score"] and row["example"] == half[key]["example"]
        gap = (half[key]["win_rate"] - row["win_rate"]) * 2 * 6  # ties among the 6 prompts
        assert gap == pytest.approx(round(gap), abs=1e-9) and round(gap) >= 0
    summary = (tmp_path / "e" / "summary.md").read_text()
    assert summary.startswith("| method |")
    assert summary.endswith("win-rate: a tie counts as a loss (the paper's >)\n")
    assert "win-rate: a tie with the reference counts half" in (evaluated / "e" / "summary.md").read_text()
    with pytest.raises(SystemExit, match=r"rows evaluated with other settings \(ties\)"):
        evaluate.main(eval_args(world, evaluated, ties="loss"))


def test_step_0_alone_equals_the_shared_row(world, evaluated, tmp_path):
    evaluate.main(eval_args(world, tmp_path, runs=str(world / "runs" / "dpo_beta0.01_seed0")))
    alone = rows_by_checkpoint(tmp_path / "e" / "results.jsonl")[("dpo_beta0.01_seed0", 0)]
    shared = rows_by_checkpoint(evaluated / "e" / "results.jsonl")[("ais-dpo_beta0.01_seed0", 0)]
    for k in ("win_rate", "true_score", "mean_length", "example"):
        assert alone[k] == shared[k]
    assert alone["kl"] == pytest.approx(shared["kl"], abs=1e-6)


def same_rows(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for k, v in a[key].items():
            expected = pytest.approx(v, abs=1e-6) if isinstance(v, float) else v
            assert b[key][k] == expected, (key, k)


def test_shards_and_torchrun_give_every_checkpoint_once_and_the_same_rows(world, evaluated, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "evaluate.py", "--runs", str(world / "runs" / "*"), "--data", str(world / "w"),
                "--num_prompts", "6", "--out_dir", str(tmp_path / "t" / "e"), "--plots_dir",
                str(tmp_path / "t" / "p"), "--threads", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    two = subprocess.Popen(torchrun, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    for i in (1, 0):  # the order does not matter: a shard's share is fixed by the list of all checkpoints
        evaluate.main(eval_args(world, tmp_path / "s", shard=f"{i}/2"))
    assert not (tmp_path / "s" / "p").exists()  # shards draw no plots
    evaluate.main(eval_args(world, tmp_path / "s", plots_only=True))
    assert (tmp_path / "s" / "p" / "tradeoff.png").is_file()
    assert (tmp_path / "s" / "e" / "summary.md").is_file()
    printed, _ = two.communicate(timeout=300)
    assert two.returncode == 0, printed[-4000:]
    assert "evaluate: 2 checkpoints to do (0 already in" in printed and "(process 0 of 2)" in printed
    assert "(process 1 of 2)" not in printed  # the other process prints nothing
    one = rows_by_checkpoint(evaluated / "e" / "results.jsonl")
    for path in (tmp_path / "s" / "e" / "results.jsonl", tmp_path / "t" / "e" / "results.jsonl"):
        assert len(evaluate.read_results(path)) == 4  # each checkpoint once
        same_rows(one, rows_by_checkpoint(path))
    assert (tmp_path / "t" / "p" / "dynamics.png").is_file()


def test_rows_of_a_retrained_run_are_replaced(world, evaluated, tmp_path):
    shutil.copytree(world / "runs", tmp_path / "runs")
    shutil.copytree(evaluated / "e", tmp_path / "e")
    run_args = tmp_path / "runs" / "dpo_beta0.01_seed0" / "args.json"
    run_args.write_text(json.dumps({**json.loads(run_args.read_text()), "run_id": "retrained"}))
    evaluate.main(eval_args(world, tmp_path, runs=str(tmp_path / "runs" / "*")))
    rows = evaluate.read_results(tmp_path / "e" / "results.jsonl")
    assert len(rows) == 4
    assert [r["run_id"] for r in rows if r["run"] == "dpo_beta0.01_seed0"] == ["retrained"] * 2


def test_a_gold_reward_model_judges_and_the_truth_is_reported_beside_it(world, evaluated, tmp_path):
    evaluate.main(eval_args(world, tmp_path, judge="rm"))
    rows = evaluate.read_results(tmp_path / "e" / "results.jsonl")
    truth = rows_by_checkpoint(evaluated / "e" / "results.jsonl")
    assert len(rows) == 4 and all(r["win_rate"] == r["gold_win_rate"] for r in rows)
    for r in rows:  # the same samples (same seed and prompts): the truth's verdict is unchanged
        assert r["true_win_rate"] == truth[(r["run"], r["step"])]["true_win_rate"]
    assert r["settings"]["judge"].startswith(os.path.realpath(world / "rm"))


def test_gold_scores_give_an_unfinished_sample_no_eos(world):
    tokenizer = lm.load_tokenizer(str(world / "rm"))
    gold = reward.load_reward_model(str(world / "rm"), tokenizer).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        gold.score.weight.normal_()
    setup = SimpleNamespace(tokenizer=tokenizer, gold=gold, device=torch.device("cpu"),
                            autocast=contextlib.nullcontext())
    prompt = json.loads((world / "w" / "eval.jsonl").read_text().splitlines()[0])["prompt"]
    rows = [{"prompt": prompt, "sample": "my car ."}] * 2
    args = evaluate.Args()
    scores = evaluate.gold_scores(setup, args, rows, "sample", finished=[True, False])
    (p, ids), = lm.encode(tokenizer, rows[:1], "sample", 64, 24)
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        by_hand = [reward.reward_scores(gold, lm.collate_grouped([(p, r)], tokenizer.pad_token_id)).item()
                   for r in (ids, ids[:-1])]
    assert scores == pytest.approx(by_hand, abs=1e-5) and abs(by_hand[0] - by_hand[1]) > 1e-4


def test_bad_inputs_end_in_one_error_line_before_any_work(world, tmp_path):
    broken = tmp_path / "runs" / "broken"
    (broken / "ckpt-0").mkdir(parents=True)
    (broken / "args.json").write_text(json.dumps({"run_name": "broken"}))
    noref = tmp_path / "noref.jsonl"
    noref.write_text(json.dumps({"prompt": "SUBREDDIT: r/tifu TITLE: x POST: hi . TL;DR:"}) + "\n")
    mixed = tmp_path / "mixed"  # two runs, the second with a tokenizer of another vocabulary
    for name in ("a", "b"):
        shutil.copytree(world / "runs" / "dpo_beta0.01_seed0", mixed / name)
    for ckpt in (mixed / "b").glob("ckpt-*"):
        vocab = json.loads((ckpt / "tokenizer.json").read_text())
        vocab["model"]["vocab"]["zzz_new_word"] = len(vocab["model"]["vocab"])
        (ckpt / "tokenizer.json").write_text(json.dumps(vocab))
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    damaged = tmp_path / "damaged"
    shutil.copytree(world / "runs" / "dpo_beta0.01_seed0", damaged)
    (damaged / "args.json").write_text("{")
    cases = [({"runs": str(tmp_path / "nothing*")}, "matches no run"),
             ({"runs": str(broken)}, "holds no model"),
             ({"data": str(noref)}, "hidden scorer"), ({"runs": str(mixed / "*")}, "tokenizer"),
             ({"judge": "rm", "gold_path": str(tmp_path / "no_rm")}, "not found"),
             ({"shard": "2/2"}, "--shard"),
             ({"judge": "oracle"}, "--judge"), ({"out_dir": str(foreign)}, "no stage"),
             ({"runs": str(damaged)}, "not valid JSON"), ({"temperature": float("nan")}, "--temperature"),
             ({"out_dir": str(world / "rm")}, "input")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            evaluate.main(eval_args(world, tmp_path, **flags))
        assert str(stop.value).startswith("error:") and message in str(stop.value), (flags, str(stop.value))
        assert not (tmp_path / "e" / "results.jsonl").exists()
