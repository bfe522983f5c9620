"""evaluate.py: the KL estimator against exact enumeration, win-rate ties, re-runs, the main job end to end."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import sft
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


def test_win_rate_ties_count_as_losses():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 3.5, -1.0]) == 0.5
    assert evaluate.win_rate([2.0, 2.0], [2.0, 2.0]) == 0.0


def test_kl_of_policy_against_itself_is_zero():
    model = tiny_lm(5, 0)
    examples = [([0, 1, 2], [3, 4, 1]), ([1], [4]), ([2, 2, 2, 2], [0, 3])]
    assert torch.equal(evaluate.sequence_kl(model, model, examples, pad_id=0), torch.zeros(3, dtype=torch.float64))


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
    policy, ref = tiny_lm(3, 1), tiny_lm(3, 2)
    prompt, eos = [0, 1], 2
    ys = all_responses([0, 1], eos, 3)
    p = torch.tensor([math.exp(seq_logp(policy, prompt, y)) for y in ys], dtype=torch.float64)
    q = torch.tensor([math.exp(seq_logp(ref, prompt, y)) for y in ys], dtype=torch.float64)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    exact = (p * (p.log() - q.log())).sum()
    estimator = evaluate.sequence_kl(policy, ref, [(prompt, y) for y in ys], pad_id=0)
    assert exact.item() > 0.05  # the test means something only if the two models differ
    assert (p * estimator).sum().item() == pytest.approx(exact.item(), rel=1e-9)

    # and with the real sampler: the Monte Carlo mean lands within sampling error of the exact KL
    g = torch.Generator().manual_seed(0)
    n = 3000
    outs, _ = sft.sample(policy.float(), [prompt] * n, eos, 0, 3, temperature=1.0, batch_size=1000, generator=g)
    policy.double()
    kl = evaluate.sequence_kl(policy, ref, [(prompt, o) for o in outs], pad_id=0)
    assert abs(kl.mean().item() - exact.item()) < 4 * kl.std().item() / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# the main job end to end at a tiny size, then evaluate's re-run and bad inputs on its outputs

TINY = {
    "WORLD_FLAGS": "--num_sft 240 --num_human_pairs 96 --num_eval 12",
    "SFT_FLAGS": "--steps 20 --lr 0.01 --warmup_steps 0 --batch_size 16 --val_size 16 --num_sample_eval 4 --n_layer 1 --n_embd 32 --n_head 2",
    "RM_FLAGS": "--steps 3 --batch_size 8 --val_size 16",
    "LABEL_FLAGS": "--num_prompts 48",
    "DAA_FLAGS": "--num_epochs 4 --batch_size 2 --num_checkpoints 2 --warmup_steps 0 --lr 1e-2",
    "EVAL_FLAGS": "--num_prompts 6",
    "GAUSS_FLAGS": "--n_theta 5 --n_samples 100 --t_max 3 --n_mc 200",
    "BETAS": "0.01",
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
    for path in ["toy_tldr/sft.jsonl", "sft/metrics.json", "gold_rm/metrics.json", "prefs/train.jsonl",
                 "eval/results.jsonl", "eval/summary.md", "plots/tradeoff.png", "plots/dynamics.png",
                 "toy_gaussian/results.json", "toy_gaussian/correlation.png", "toy_gaussian/variance.png"]:
        assert (out / path).is_file(), path
    rows = evaluate.read_results(out / "eval" / "results.jsonl")
    assert sorted({r["method"] for r in rows}) == ["ais-dpo", "dpo", "is-dpo"]
    ckpts = list(out.glob("runs/*/ckpt-*"))
    assert len(rows) == len(ckpts) >= 3 * 2  # one row per checkpoint; each run has at least step 0 and its end
    for r in rows:
        assert {"run", "method", "beta", "seed", "step", "epoch", "kl", "win_rate", "true_win_rate", "mean_length"} <= set(r)
        assert 0 <= r["win_rate"] <= 1 and r["kl"] >= -1e-6
        if r["step"] == 0:  # the step-0 checkpoint is pi_ref itself
            assert abs(r["kl"]) < 1e-5
    assert "tradeoff.png" in stdout


def test_evaluate_rerun_adds_no_rows(main_job):
    out, _ = main_job
    before = (out / "eval" / "results.jsonl").read_text()
    evaluate.main(evaluate.Args(runs=str(out / "runs" / "*"), data=str(out / "toy_tldr"), gold_path=str(out / "gold_rm"),
                                out_dir=str(out / "eval"), plots_dir=str(out / "plots"), num_prompts=6))
    assert (out / "eval" / "results.jsonl").read_text() == before


def test_step_0_is_evaluated_once_and_equals_a_fresh_evaluation(main_job, tmp_path):
    """Every run starts at pi_ref, so evaluate.py evaluates step 0 once and shares the row: it must be what
    evaluating one run's ckpt-0 alone gives."""
    out, _ = main_job
    metric_keys = ["kl", "win_rate", "true_win_rate", "gold_score", "mean_length", "example"]
    rows = evaluate.read_results(out / "eval" / "results.jsonl")
    starts = [r for r in rows if r["step"] == 0]
    assert len(starts) == 3 and all([r[k] for k in metric_keys] == [starts[0][k] for k in metric_keys] for r in starts)
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
    assert len(shards) == len(list(out.glob("runs/*/ckpt-*"))) == len(evaluate.read_results(tmp_path / "e" / "results.jsonl"))
    whole = evaluate.read_results(out / "eval" / "results.jsonl")  # run.sh's shards, one thread each, like these
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
    base = ["--data", out / "toy_tldr", "--gold_path", out / "gold_rm", "--out_dir", tmp_path / "e", "--plots_dir", tmp_path / "p"]
    cases = []
    cases.append((["--runs", tmp_path / "nothing*", *base], "matches no run"))
    broken = tmp_path / "runs" / "broken"
    (broken / "ckpt-0").mkdir(parents=True)
    (broken / "args.json").write_text(json.dumps({"run_name": "broken"}))
    cases.append((["--runs", broken, *base], "holds no model"))
    noref = tmp_path / "noref.jsonl"
    noref.write_text(json.dumps({"prompt": "SUBREDDIT: r/tifu TITLE: x POST: hi . TL;DR:"}) + "\n")
    cases.append((["--runs", out / "runs" / "*", "--data", noref, *base[2:]], "reference"))
    other_tok = tmp_path / "gold_other"
    subprocess.run(["cp", "-r", str(out / "gold_rm"), str(other_tok)], check=True)
    vocab = json.loads((other_tok / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzz_new_word"] = len(vocab["model"]["vocab"])
    (other_tok / "tokenizer.json").write_text(json.dumps(vocab))
    cases.append((["--runs", out / "runs" / "*", "--data", out / "toy_tldr", "--gold_path", other_tok, *base[4:]], "tokenizer"))
    cases.append((["--runs", out / "runs" / "*", *base, "--shard", "2/2"], "--shard"))
    for flags, message in cases:
        proc = run_eval(tmp_path_factory, *flags)
        assert proc.returncode != 0, flags
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, last
        assert not (tmp_path / "e" / "results.jsonl").exists()


def test_evaluate_replaces_rows_of_a_retrained_run(main_job):
    out, _ = main_job
    args = evaluate.Args(runs=str(out / "runs" / "*"), data=str(out / "toy_tldr"), gold_path=str(out / "gold_rm"),
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
