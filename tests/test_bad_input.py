"""Bad input, table-driven, through every script's command line: each case must end with one `error:` line
(or argparse's usage and its error line), a non-zero exit, no traceback, nothing written and nothing of
the user's touched.

Each case runs in a directory of its own holding a user's folder with a file in it ("thesis"); the case
directory must be exactly as it was afterwards (no output, no lock, no temporary directory, the user's
file intact), and so must the shared inputs (world, pi_ref, gold RM, pairs), some of which the cases
name as their output. The inputs are built in-process at tiny sizes; the command lines are queued on the
session's runner when the session starts (see test_toy_tldr.py) and checked after every other test.
"""
import hashlib
import json
import os
import re
import shutil

import pytest

import reward
import sft
from test_toy_tldr import TINY_MODEL, read_jsonl, start_pipeline, submit_cli, write_small_world

# the placeholders: W world, S pi_ref, G gold RM, P pairs, D bad data files, R a run to evaluate, T a run
# whose args.json is torn, X a truncated pi_ref, C the case's own directory, O its output, U the user's folder
# (C/thesis, holding a file)
BASE = {
    "toy_tldr": ["toy_tldr.py", "--out_dir", "{O}", "--num_sft", 20, "--num_human_pairs", 20,
                 "--num_eval", 5],
    "sft": ["sft.py", "--data", "{W}", "--out_dir", "{O}", "--steps", 2, "--batch_size", 4, "--val_size", 4,
            "--num_sample_eval", 0, *TINY_MODEL],
    "rm": ["reward.py", "--mode", "train", "--sft_path", "{S}", "--data", "{W}", "--out_dir", "{O}",
           "--steps", 1, "--batch_size", 4, "--val_size", 4],
    "label": ["reward.py", "--mode", "label", "--sft_path", "{S}", "--gold_path", "{G}", "--data", "{W}",
              "--out_dir", "{O}", "--num_prompts", 4],
    "dpo": ["dpo.py", "--sft_path", "{S}", "--data", "{P}", "--runs_dir", "{O}", "--run_name", "run",
            "--batch_size", 4, "--num_checkpoints", 1],
    "is_dpo": ["is_dpo.py", "--sft_path", "{S}", "--data", "{P}", "--runs_dir", "{O}", "--run_name", "run",
               "--batch_size", 4, "--num_checkpoints", 1],
    "evaluate": ["evaluate.py", "--runs", "{R}", "--data", "{W}", "--gold_path", "{G}", "--out_dir", "{O}",
                 "--plots_dir", "{O}_plots", "--num_prompts", 2],
    "toy_gaussian": ["toy_gaussian.py", "--out_dir", "{O}", "--n_theta", 3, "--n_samples", 10, "--t_max", 2,
                     "--n_mc", 10],
}
USAGE = None  # argparse's answer: usage, then "<script>: error: ...", exit 2

CASES = [  # (script, flags added to its BASE, words the error line must hold)
    ("toy_tldr", ["--seed", -1], ["--seed"]),
    ("toy_tldr", ["--bt_temperature", "nan"], ["--bt_temperature", "finite"]),
    ("toy_tldr", ["--num_eval", 0], ["--num_eval"]),
    ("toy_tldr", ["--num_sfts", 5], USAGE),
    ("toy_tldr", ["--out_dir", "{U}"], ["thesis", "no stage"]),
    ("toy_tldr", ["--out_dir", "{U}/chapter1.tex"], ["not a directory"]),
    ("toy_tldr", ["--out_dir", "{S}"], ["another stage (sft)"]),
    ("sft", ["--lr", "nan"], ["--lr", "finite"]),
    ("sft", ["--lr", "inf"], ["--lr", "finite"]),
    ("sft", ["--grad_clip", -1], ["--grad_clip", "> 0"]),
    ("sft", ["--weight_decay", -0.1], ["--weight_decay"]),
    ("sft", ["--threads", -2], ["--threads"]),
    ("sft", ["--precision", "fp8"], ["--precision", "auto"]),
    ("sft", ["--seed", 2 ** 32], ["--seed"]),
    ("sft", ["--batch_size", 0], ["--batch_size"]),
    ("sft", ["--steps", "ten"], USAGE),
    ("sft", ["--learning_rate", 0.1], USAGE),
    ("sft", ["--out_dir", "{W}"], ["input"]),
    ("sft", ["--out_dir", "{W}/tokenizer/sft"], ["input"]),
    ("sft", ["--out_dir", "{U}"], ["thesis", "no stage"]),
    ("sft", ["--data", "{D}/null_completion.jsonl"], ["row 2", "'completion'", "null"]),
    ("sft", ["--data", "{D}/number_prompt.jsonl"], ["row 1", "'prompt'", "a string"]),
    ("sft", ["--data", "{D}/list_completion.jsonl"], ["row 3", "'completion'"]),
    ("sft", ["--data", "{D}/torn.jsonl"], ["line 4", "torn"]),
    ("sft", ["--data", "{D}/null_completion.json"], ["not a .jsonl", "scale.prepare"]),
    ("sft", ["--data", "{D}/other_columns.jsonl"], ["row 1", "'prompt'", "scale.prepare"]),
    ("sft", ["--model_name_or_path", "{G}"], ["not a policy"]),
    ("sft", ["--lr", 1e10], ["non-finite"]),
    ("rm", ["--grad_clip", "nan"], ["--grad_clip"]),
    ("rm", ["--lr", -1], ["--lr"]),
    ("rm", ["--warmup_steps", -1], ["--warmup_steps"]),
    ("rm", ["--out_dir", "{S}"], ["input"]),
    ("rm", ["--data", "{D}/null_chosen.jsonl"], ["row 1", "'chosen'"]),
    ("rm", ["--mode", "evaluate"], ["--mode"]),
    ("rm", ["--gold_rm", "{G}"], USAGE),
    ("label", ["--temperature", "inf"], ["--temperature"]),
    ("label", ["--temperature", 0], ["--temperature"]),
    ("label", ["--num_prompts", 0], ["--num_prompts"]),
    ("label", ["--judge", "rm", "--gold_path", "{S}"], ["not a reward model"]),
    ("label", ["--judge", "oracle"], ["--judge"]),
    ("label", ["--bt_temperature", "0"], ["--bt_temperature"]),
    ("label", ["--out_dir", "{G}"], ["input"]),
    ("dpo", ["--beta", "nan"], ["--beta", "finite"]),
    ("dpo", ["--beta", "inf"], ["--beta", "finite"]),
    ("dpo", ["--lr", "nan"], ["--lr"]),
    ("dpo", ["--grad_clip", -1], ["--grad_clip"]),
    ("dpo", ["--precision", "half"], ["--precision"]),
    ("dpo", ["--rdpo_alpha", "nan"], ["--rdpo_alpha"]),
    ("dpo", ["--rpo_eta", "inf"], ["--rpo_eta"]),
    ("dpo", ["--rpo_eta", -1], ["--rpo_eta"]),
    ("dpo", ["--chipo_clip", 0], ["--chipo_clip"]),
    ("dpo", ["--num_epochs", "inf"], ["--num_epochs"]),
    ("dpo", ["--threads", -1], ["--threads"]),
    ("dpo", ["--betas", 0.1], USAGE),
    ("dpo", ["--sft_path", "{G}"], ["not a policy"]),
    ("dpo", ["--sft_path", "{X}"], ["could not load a policy"]),
    ("dpo", ["--runs_dir", "{C}", "--run_name", "thesis"], ["thesis", "no stage"]),
    ("dpo", ["--run_name", "../escape"], ["--run_name"]),
    ("dpo", ["--runs_dir", "{W}", "--run_name", "tokenizer"], ["input"]),
    ("dpo", ["--data", "{D}/list_chosen.jsonl"], ["row 2", "'chosen'"]),
    ("dpo", ["--loss_type", "ipo", "--beta", 1e-300], ["non-finite loss", "step 1"]),
    ("dpo", ["--num_checkpoints", 0], ["--num_checkpoints"]),
    ("dpo", ["--data", "{D}/beyond_vocab.jsonl"], ["beyond the tokenizer"]),
    ("is_dpo", ["--log_w_max=-50"], ["--log_w_max"]),
    ("is_dpo", ["--alpha", "nan"], ["--alpha"]),
    ("is_dpo", ["--weight", "fixed", "--alpha", 2], ["--alpha"]),
    ("is_dpo", ["--log_w_max", "inf"], ["--log_w_max"]),
    ("is_dpo", ["--behaviour_logps", "--data", "{D}/nan_behaviour.jsonl"],
     ["row 3", "'chosen_behaviour_logp'", "NaN"]),
    ("is_dpo", ["--behaviour_logps", "--data", "{D}/positive_behaviour.jsonl"], ["row 2", "above 0"]),
    ("sft", ["--out_dir", ""], ["--out_dir", "empty"]),
    ("is_dpo", ["--behaviour_logps", "--data", "{D}/text_behaviour.jsonl"],
     ["row 1", "'rejected_behaviour_logp'"]),
    ("evaluate", ["--temperature", "nan"], ["--temperature"]),
    ("evaluate", ["--num_prompts", -1], ["--num_prompts"]),
    ("evaluate", ["--seed", -1], ["--seed"]),
    ("evaluate", ["--num_prompt", 3], USAGE),  # no abbreviations: a misspelt flag is not taken for another
    ("evaluate", ["--judge", "rm", "--gold_path", "{S}"], ["not a reward model"]),
    ("evaluate", ["--judge", "oracle"], ["--judge"]),
    ("evaluate", ["--out_dir", "{U}"], ["thesis", "no stage"]),
    ("evaluate", ["--plots_dir", "{U}"], ["thesis", "no stage"]),
    ("evaluate", ["--runs", "{T}"], ["args.json", "not valid JSON"]),
    ("evaluate", ["--out_dir", "{G}"], ["input"]),
    ("toy_gaussian", ["--peak", "nan"], ["--peak"]),
    ("toy_gaussian", ["--theta_min", "-inf"], ["--theta_min"]),
    ("toy_gaussian", ["--seed", -1], ["--seed"]),
    ("toy_gaussian", ["--out_dir", "{U}"], ["thesis", "no stage"]),
]
IDS = [f"{i:02d}-{script}-{' '.join(map(str, flags))}" for i, (script, flags, _) in enumerate(CASES)]


def snapshot(root):
    """Every path under root with its content's hash (directories: None)."""
    out = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(parent, name), root)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                out[os.path.relpath(os.path.join(parent, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_bad_data(d, world):
    """Data files with one bad field each (the row and column the error must name)."""
    d.mkdir()
    rows = read_jsonl(world / "sft.jsonl")[:12]
    pairs = read_jsonl(world / "prefs_human.jsonl")[:12]

    def write(name, rows, raw_tail=""):
        with open(d / name, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) + raw_tail)

    write("null_completion.jsonl", [rows[0], {**rows[1], "completion": None}, *rows[2:]])
    (d / "null_completion.json").write_text(json.dumps([rows[0], {**rows[1], "completion": None}, *rows[2:]]))
    write("number_prompt.jsonl", [{**rows[0], "prompt": 42}, *rows[1:]])
    write("list_completion.jsonl", [*rows[:2], {**rows[2], "completion": ["my", "mom"]}, *rows[3:]])
    write("torn.jsonl", rows[:3], raw_tail=json.dumps(rows[3])[:25])  # a fourth line cut short
    write("null_chosen.jsonl", [{**pairs[0], "chosen": None}, *pairs[1:]])
    behaviour = [{**p, "chosen_behaviour_logp": -10.0, "rejected_behaviour_logp": -12.0} for p in pairs]
    write("list_chosen.jsonl", [behaviour[0], {**behaviour[1], "chosen": ["a"]}, *behaviour[2:]])
    with open(d / "nan_behaviour.jsonl", "w") as f:  # json.dumps writes NaN, as Python's json reads it
        f.write("".join(json.dumps({**r, "chosen_behaviour_logp": float("nan") if i == 2 else -10.0}) + "\n"
                        for i, r in enumerate(behaviour)))
    write("positive_behaviour.jsonl",
          [behaviour[0], {**behaviour[1], "rejected_behaviour_logp": 0.5}, *behaviour[2:]])
    write("text_behaviour.jsonl", [{**behaviour[0], "rejected_behaviour_logp": "-12.0"}, *behaviour[1:]])
    write("prefs.jsonl", behaviour)
    write("other_columns.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in rows])
    write("beyond_vocab.jsonl", [behaviour[0], {**behaviour[1], "chosen_ids": [10 ** 6, 3]}, *behaviour[2:]])


def build_inputs(root):
    """World, pi_ref, gold RM, pairs and a run, in-process at tiny sizes (a few seconds)."""
    world = write_small_world(root / "world")
    sft.main(sft.Args(data=str(world), out_dir=str(root / "sft"), steps=2, batch_size=8, val_size=8,
                      num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    reward.main(reward.Args(mode="train", sft_path=str(root / "sft"), data=str(world),
                            out_dir=str(root / "gold"), steps=1, batch_size=8, val_size=8))
    write_bad_data(root / "data", world)
    shutil.copytree(root / "sft", root / "truncated_sft")  # a checkpoint cut short (a full disk at its save)
    weights = root / "truncated_sft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name, args_json in (("run", None), ("torn_run", '{"run_name": "torn", "method": ')):
        run = root / "runs" / name
        shutil.copytree(root / "sft", run / "ckpt-0")
        (run / "args.json").write_text(args_json or json.dumps(
            {"run_name": name, "method": "dpo", "beta": 0.1, "seed": 0, "total_steps": 1, "num_epochs": 1.0,
             "sft_path": str(root / "sft")}))
    return {"W": world, "S": root / "sft", "G": root / "gold", "P": root / "data" / "prefs.jsonl",
            "D": root / "data", "R": root / "runs" / "run", "T": root / "runs" / "torn_run",
            "X": root / "truncated_sft"}


@pytest.fixture(scope="session")
def bad_runs(tmp_path_factory):
    """Queues every case on the session's runner (after the pipeline the other files wait for): [Future of
    each case's CompletedProcess], [each case's directory and its snapshot], the inputs, their snapshot."""
    start_pipeline(tmp_path_factory)
    root = tmp_path_factory.mktemp("bad_input")
    inputs = build_inputs(root / "inputs")
    futures, cases = [], []
    for i, (script, flags, _) in enumerate(CASES):
        case = root / f"case{i:02d}"
        (case / "thesis").mkdir(parents=True)
        (case / "thesis" / "chapter1.tex").write_text("the user's work\n")
        paths = {**inputs, "C": case, "O": case / "out", "U": case / "thesis"}
        argv = [str(a).format(**paths) for a in BASE[script] + flags]
        futures.append(submit_cli(tmp_path_factory, *argv))
        cases.append((case, snapshot(case)))
    return futures, cases, root / "inputs", snapshot(root / "inputs")


@pytest.mark.before_the_rest
def test_the_cases_are_many_and_queued_first(bad_runs):
    """Runs first (the cases then run on the runner while the other tests do): the table's size."""
    assert len(CASES) >= 40 and len({script for script, _, _ in CASES}) == len(BASE)


@pytest.mark.after_the_rest
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_bad_input_is_one_error_line_and_changes_nothing(bad_runs, i):
    futures, cases, _, _ = bad_runs
    script, _, words = CASES[i]
    result = futures[i].result(timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if words is USAGE:  # argparse: "usage: ..." (toy_gaussian.py prints none), then one error line, exit 2
        assert result.returncode == 2 and lines, result.stderr[-2000:]
        assert re.match(r"\S+\.py: error: ", lines[-1]), result.stderr[-2000:]
        assert "usage:" in result.stderr or script == "toy_gaussian"
    else:  # "error: ...", or toy_gaussian.py's own argparse line "toy_gaussian.py: error: ..."
        error = re.compile(r"(toy_gaussian\.py: )?error: ")
        assert lines and error.match(lines[-1]), result.stderr[-3000:]
        assert sum(bool(error.match(line)) for line in lines) == 1, result.stderr[-3000:]
        for word in words:
            assert word in lines[-1], lines[-1]
    case, before = cases[i]
    assert snapshot(case) == before  # nothing written (no output, lock or temporary), the user's file intact


@pytest.mark.after_the_rest
def test_no_case_touched_the_inputs(bad_runs):
    futures, _, inputs, before = bad_runs
    for future in futures:
        future.result(timeout=600)
    assert snapshot(inputs) == before
