"""Tests for toy_tldr.py: the tokenizer round trip, the hidden true scorer (hand computations, and
edits that must hurt), facts parsed back from prompts, determinism, and the command line.

This file also holds what the three stage tests share (test_sft.py and test_reward.py import it):
running command lines, checking a clean error, and the session's tiny pipeline (toy world ->
pi_ref -> gold RM -> labelled pairs, each stage through its command line). A command line that
imports torch and transformers pays ~5 s for it on a small CPU, so the session has one
command-line runner: an interpreter that does those imports once and forks a child for each
command line it is sent. Each test file sends its command lines in a test marked before_the_rest
(the session's first) and checks them in tests marked after_the_rest (its last); the in-process
tests run meanwhile. The in-process tests marked core are the quick tier (pytest -m core).
"""
import atexit
import json
import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import stage
import toy_tldr

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--n_layer", 1, "--n_embd", 32, "--n_head", 2]

# ----------------------------------------------------------------------------------------------
# shared helpers: command lines, the session's runner, and its tiny pipeline


def cli_env(home):
    """Offline, Hugging Face caches under `home`, one thread a run (runs share a small CPU)."""
    return dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run_cli(script, *args, home):
    """`python <script> <args>` from the repository root, in a fresh interpreter."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=cli_env(home),
                          capture_output=True, text=True, timeout=600)


# Reads one command line a line, [index, argv], and runs each in a forked child. The child of a fork
# is the same interpreter: it runs the script as `python <argv>` would, with the script's own exit
# status, stdout and stderr (sys.exit(message), an uncaught traceback), but without paying again for
# the imports the parent did once, nor for the interpreter's teardown at its end.
_FORKING_RUNNER = """
import json, os, runpy, sys, traceback
import datasets, torch, transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GPTNeoXForCausalLM, HfArgumentParser, get_cosine_schedule_with_warmup)
import lm, stage  # the core the scripts share, imported once for all of them
out = sys.argv[1]
for line in iter(sys.stdin.readline, ""):
    i, argv = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(os.path.join(out, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = argv
        code = 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:  # answered as the interpreter would, without its teardown (~2 s here)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    print("ended", i, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_runner = {}


def _start_runner(tmp_path_factory):
    """The session's command-line runner, started on first use. It forks only on Linux (on macOS a
    fork after importing torch is not safe); elsewhere one thread runs fresh interpreters in turn."""
    if _runner:
        return _runner
    out = tmp_path_factory.mktemp("command_lines")
    _runner.update(out=out, lock=threading.Lock(), futures=[])
    if not sys.platform.startswith("linux"):
        _runner["sequential"] = ThreadPoolExecutor(max_workers=1)
        return _runner
    process = subprocess.Popen([sys.executable, "-c", _FORKING_RUNNER, str(out)], cwd=ROOT,
                               env=cli_env(out / "hf_home"),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=open(out / "runner.stderr", "w"),
                               text=True, start_new_session=True)
    _runner["process"] = process
    threading.Thread(target=_collect_results, daemon=True).start()
    atexit.register(_stop_runner)
    return _runner


def _stop_runner():
    """At the end of the session, stop the runner and a command line it may still be running (its
    process group holds only those two): the tests that wanted them have finished."""
    try:
        os.killpg(_runner["process"].pid, signal.SIGTERM)
    except ProcessLookupError:  # it had already ended
        pass


def _collect_results():
    out, futures = _runner["out"], _runner["futures"]
    for line in _runner["process"].stdout:  # "ended <index> <exit status>" as each command line ends
        if line.startswith("ended "):
            i, code = map(int, line.split()[1:])
            argv, future = futures[i]
            stdout, stderr = (out / f"{i}.stdout").read_text(), (out / f"{i}.stderr").read_text()
            future.set_result(subprocess.CompletedProcess(argv, code, stdout, stderr))
    with _runner["lock"]:
        for _, future in futures:
            if not future.done():
                future.set_exception(RuntimeError("the runner stopped: "
                                                  f"{(out / 'runner.stderr').read_text()[-3000:]}"))


def submit_cli(tmp_path_factory, script, *args):
    """Queue `python <script> <args>` on the session's runner; a Future of its CompletedProcess.
    Command lines run one at a time, in the order they were queued."""
    runner = _start_runner(tmp_path_factory)
    argv = [script, *map(str, args)]
    if "sequential" in runner:
        return runner["sequential"].submit(run_cli, *argv, home=runner["out"] / "hf_home")
    with runner["lock"]:
        assert runner["process"].poll() is None, (runner["out"] / "runner.stderr").read_text()[-3000:]
        future = Future()
        runner["futures"].append((argv, future))
        runner["process"].stdin.write(json.dumps([len(runner["futures"]) - 1, argv]) + "\n")
        runner["process"].stdin.flush()
    return future


def submit_cases(tmp_path_factory, script, cases, tmp):
    """submit_cli for {case: args} of one script, each with --out_dir tmp/<case>: {case: Future}."""
    return {case: submit_cli(tmp_path_factory, script, *args, "--out_dir", tmp / case.replace(" ", "_"))
            for case, args in cases.items()}


def assert_ran(result):
    assert result.returncode == 0, \
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def no_partial_copy(out_dir):
    """Nothing of an unpublished output is left beside out_dir (stage.Output's work and aside copies)."""
    return not any(os.path.exists(stage.scratch_path(out_dir, kind)) for kind in ("partial", "old"))


def assert_clean_error(result, out_dir, *words):
    """A non-zero exit, one line starting with 'error:' last on stderr (naming `words`), no
    traceback, and nothing written: neither out_dir nor a partial copy of it exists."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert lines and lines[-1].startswith("error:"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    for word in words:
        assert word in lines[-1], lines[-1]
    assert not Path(out_dir).exists() and no_partial_copy(out_dir)


_pipeline = {}


def start_pipeline(tmp_path_factory):
    """Queue the session's pipeline (once): toy world -> pi_ref -> gold RM -> labelled pairs, tiny sizes.

    SFT takes 40 steps at lr 1e-2 (not 5 in warmup): --mode label drops pairs whose samples never
    reach EOS, and a policy that has not learned to stop leaves none."""
    if _pipeline:
        return
    base = tmp_path_factory.mktemp("pipeline")
    d = {name: base / name for name in ("world", "sft", "gold_rm", "prefs")}
    commands = {
        "world": ["toy_tldr.py", "--out_dir", d["world"], "--num_sft", 300, "--num_human_pairs", 300,
                  "--num_eval", 40],
        "sft": ["sft.py", "--data", d["world"], "--out_dir", d["sft"], "--steps", 40, "--lr", 1e-2,
                "--warmup_steps", 0,
                "--batch_size", 8, "--val_size", 20, "--num_sample_eval", 8, *TINY_MODEL],
        "gold_rm": ["reward.py", "--mode", "train", "--sft_path", d["sft"], "--data", d["world"], "--out_dir",
                    d["gold_rm"],
                    "--steps", 5, "--batch_size", 8, "--val_size", 20],
        "prefs": ["reward.py", "--mode", "label", "--judge", "rm", "--sft_path", d["sft"], "--gold_path",
                  d["gold_rm"],
                  "--data", d["world"],
                  "--out_dir", d["prefs"], "--num_prompts", 20],
    }
    for name, command in commands.items():
        _pipeline[name] = (d[name], submit_cli(tmp_path_factory, *command))


def pipeline_stage(tmp_path_factory, name):
    """The output directory of a stage of the session's pipeline, once it and those before it ran cleanly."""
    start_pipeline(tmp_path_factory)
    for stage, (out_dir, future) in _pipeline.items():  # each stage reads the output of those before it
        assert_ran(future.result(timeout=600))
        if stage == name:
            return out_dir


def write_small_world(out_dir, seed=0):
    """A small toy world written in-process (a fraction of a second): data for bad-input runs."""
    toy_tldr.main(toy_tldr.Args(out_dir=str(out_dir), seed=seed, num_sft=60, num_human_pairs=60, num_eval=10))
    return Path(out_dir)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Queues the pipeline, and starts this file's bad-input runs: {flag: (Future of the
    CompletedProcess, out_dir)}. toy_tldr.py imports no torch: these run in fresh interpreters."""
    start_pipeline(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("toy_cli")
    threads = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for flag, value in [("--num_sft", 0), ("--bt_temperature", 0)]:
        out_dir = tmp / flag.strip("-")
        runs[flag] = (threads.submit(run_cli, "toy_tldr.py", "--out_dir", out_dir, flag, value,
                                     home=tmp / "hf_home"),
                      out_dir)
    threads.shutdown(wait=False)
    return runs


@pytest.mark.before_the_rest
def test_command_lines_start(cli_runs):
    """The command lines start before the session's other tests, and run while they do."""
    assert len(cli_runs) == 2


def small_world_rows(seed=0, n=100):
    args = toy_tldr.Args(seed=seed, num_sft=n, num_human_pairs=n, num_eval=n)
    return toy_tldr.make_world(args)


# ----------------------------------------------------------------------------------------------
# 1. the tokenizer


@pytest.mark.core
def test_tokenizer_round_trips_world_text_without_unk(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = toy_tldr.build_tokenizer()
    sft_rows, human, evals = small_world_rows()
    texts = ([r["prompt"] for r in sft_rows] + [r["completion"] for r in sft_rows]
             + [r[k] for r in human for k in ("chosen", "rejected")] + [r["reference"] for r in evals])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    reopened = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(reopened) == len(tokenizer) == len(toy_tldr.vocabulary())
    assert (reopened.pad_token, reopened.eos_token, reopened.unk_token) == ("<pad>", "<eos>", "<unk>")
    assert reopened.pad_token_id != reopened.eos_token_id  # so HF's own last-non-pad pooling finds EOS too
    for tok in (tokenizer, reopened):
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, text
            assert len(ids) == len(text.split())  # word level: one token a word
            assert tok.decode(ids) == text
    # a word outside the world is <unk>: the check above can fail
    assert reopened("my unicorn lied", add_special_tokens=False)["input_ids"][1] == reopened.unk_token_id


@pytest.mark.core
def test_vocabulary_has_no_duplicates_and_specials_first():
    vocab = toy_tldr.vocabulary()
    assert len(vocab) == len(set(vocab))
    assert vocab[:4] == toy_tldr.SPECIAL_TOKENS


# ----------------------------------------------------------------------------------------------
# 2. the true scorer

PROMPT = ("SUBREDDIT: r/tifu TITLE: need advice POST: we have a dog . my roommate lied to me last night . "
          "my boss says i should leave . i feel so sad . should i confront ? TL;DR:")


@pytest.mark.core
def test_parse_facts_of_a_hand_written_prompt_ignores_the_distractor():
    assert toy_tldr.parse_facts(PROMPT) == {"who": "roommate", "event": "lied", "feeling": "sad",
                                            "question": "confront"}
    with pytest.raises(ValueError, match="not a toy_tldr prompt"):
        toy_tldr.parse_facts("SUBREDDIT: r/tifu TITLE: help POST: we have a dog . TL;DR:")


@pytest.mark.core
@pytest.mark.parametrize("summary, finished, expected", [
    # weights of METHOD.md, section 8: +1 who, +1 event, +0.8 feeling, +0.8 question; -1 a wrong slot word;
    # -0.6 a repeated content word; -0.3 a word of when it happened; -0.15 a word over 14, -0.3 a word under
    # 5; +0.5 '.'/'?' then EOS; -1.5 no EOS
    ("my roommate lied to me . i feel sad . should i confront ?", True, 1 + 1 + 0.8 + 0.8 + 0.5),  # 13 words
    # event; 'boss', 'leave' are the distractor's
    ("my boss lied to me . should i leave ?", True, 1 - 1 - 1 + 0.5),
    ("roommate lied to me roommate lied to me sad", True, 1 + 1 + 0.8 - 0.6 - 0.6),  # 2 repeats, no end mark
    ("roommate lied to me roommate lied to me sad", False, 1 + 1 + 0.8 - 0.6 - 0.6 - 1.5),
    ("roommate lied", True, 1 + 1 - 3 * 0.3),  # 2 words: 3 under 5
    ("my roommate lied to me last night and i feel sad and hurt so should i confront or not ?", True,
     1 + 1 + 0.8 + 0.8 - 1 - 2 * 0.3 - 6 * 0.15 + 0.5),  # 'hurt': a wrong feeling; 20 words: 6 over 14
    ("my roommate lied to me last night . sad . confront ?", True, 1 + 1 + 0.8 + 0.8 - 2 * 0.3 + 0.5),
    ("my roommate lied to me . i feel sad . should i confront ?", False, 1 + 1 + 0.8 + 0.8 - 1.5),
])
def test_true_score_matches_a_hand_computation(summary, finished, expected):
    assert toy_tldr.true_score(PROMPT, summary, finished) == pytest.approx(expected, abs=1e-9)


@pytest.mark.core
def test_equal_scores_are_equal_numbers():
    # scored in hundredths (integers): sums that are equal on paper compare equal, whatever their order
    # (summed as floats, 0.8s and 0.6s land beside the hundredths: this total came out as 1.0999999999999996,
    # and equal totals reached in another order can differ in the last bit)
    a = toy_tldr.true_score(PROMPT, "roommate lied sad boss lied lied .")  # 1+1+0.8-1-0.6-0.6+0.5
    b = toy_tldr.true_score(PROMPT, "roommate lied to me boss sad sad sad .")  # 1+1+0.8-1-0.6-0.6+0.5
    assert a == b == 1.1
    rng = random.Random(0)
    for _ in range(2000):  # every score is a whole number of hundredths
        facts, prompt = toy_tldr.make_post(rng)
        summary = toy_tldr.corrupt(prompt, toy_tldr.reference_summary(facts, rng), rng)
        score = toy_tldr.true_score(prompt, summary, rng.random() < 0.9)
        assert round(score * 100) / 100 == score


@pytest.mark.core
def test_event_phrases_hold_no_slot_word_but_their_keyword():
    # "Slot lists are disjoint, so every summary word has one meaning": a phrase like "invited my ex"
    # would put a wrong 'who' into every correct summary of that event.
    for keyword, phrase in toy_tldr.EVENTS.items():
        assert [w for w in phrase.split() if w in toy_tldr.SLOT_WORDS] == [keyword], phrase


@pytest.mark.core
@pytest.mark.parametrize("event", sorted(toy_tldr.EVENTS))
def test_a_complete_correct_summary_scores_the_maximum(event):
    rng = random.Random(event)
    while True:  # a post of this event
        facts, prompt = toy_tldr.make_post(rng)
        if facts["event"] == event:
            break
    summary = f"{facts['who']} {toy_tldr.EVENTS[event]} , {facts['feeling']} . {facts['question']} ?"
    assert toy_tldr.true_score(prompt, summary) == pytest.approx(4.1)


def _edits_that_must_hurt(facts, reference, rng):
    """Edited copies of a reference, each of which must score lower."""
    words = reference.split()
    slot_pos = [i for i, w in enumerate(words) if w in toy_tldr.SLOT_WORDS]
    pools = (toy_tldr.WHO, list(toy_tldr.EVENTS), toy_tldr.FEELINGS, toy_tldr.QUESTIONS)
    i = rng.choice(slot_pos)
    pool = next(p for p in pools if words[i] in p)
    swapped = words[:i] + [rng.choice([w for w in pool if w != words[i]])] + words[i + 1:]
    slots = {facts[k] for k in ("who", "event", "feeling", "question")}
    wrong = rng.choice(sorted(toy_tldr.SLOT_WORDS - slots))
    j = rng.randint(0, len(words) - 1)
    distractor = words[:j] + [wrong] + words[j:]
    who = words.index(facts["who"])
    repeated = words[:who] + words[who:who + 2] + words[who:]  # 'who' and the next word, twice
    return {"swap a slot word": " ".join(swapped), "insert a distractor": " ".join(distractor),
            "drop the who": " ".join(w for w in words if w != facts["who"]),
            "drop the event": " ".join(w for w in words if w != facts["event"]),
            "repeat a span": " ".join(repeated)}


@pytest.mark.core
def test_true_score_prefers_the_reference_to_edits_that_must_hurt():
    for seed in range(300):
        rng = random.Random(seed)
        facts, prompt = toy_tldr.make_post(rng)
        reference = toy_tldr.reference_summary(facts, rng)
        ref_score = toy_tldr.true_score(prompt, reference)
        assert toy_tldr.true_score(prompt, reference, finished=False) < ref_score
        for kind, edited in _edits_that_must_hurt(facts, reference, rng).items():
            assert toy_tldr.true_score(prompt, edited) < ref_score, (kind, reference, edited)


@pytest.mark.core
def test_parse_facts_recovers_the_facts_make_post_used():
    for seed in range(500):
        facts, prompt = toy_tldr.make_post(random.Random(seed))
        assert toy_tldr.parse_facts(prompt) == {k: facts[k] for k in ("who", "event", "feeling", "question")}


@pytest.mark.core
def test_human_pairs_carry_their_true_scores():
    _, human, _ = small_world_rows(n=200)
    for row in human:
        assert row["chosen_score"] == toy_tldr.true_score(row["prompt"], row["chosen"])
        assert row["rejected_score"] == toy_tldr.true_score(row["prompt"], row["rejected"])
    # Bradley-Terry labels at temperature 0.3: mostly, not always, the higher true score wins
    agree = sum(r["chosen_score"] > r["rejected_score"] for r in human) / len(human)
    assert 0.7 < agree < 1.0


@pytest.mark.core
def test_world_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert small_world_rows(seed=0, n=30) == small_world_rows(seed=0, n=30)
    a, b = small_world_rows(seed=0, n=30), small_world_rows(seed=1, n=30)
    for split_a, split_b in zip(a, b):
        assert [r["prompt"] for r in split_a] != [r["prompt"] for r in split_b]
    sft_rows, _, evals = a  # the splits draw from separate streams
    assert [r["prompt"] for r in sft_rows] != [r["prompt"] for r in evals]


# ----------------------------------------------------------------------------------------------
# 3. the command line (runs started by the `cli_runs` fixture)


@pytest.mark.after_the_rest
def test_command_line_writes_the_world_of_the_contract(tmp_path_factory):
    from transformers import AutoTokenizer

    world = pipeline_stage(tmp_path_factory, "world")
    assert no_partial_copy(world) and json.loads((world / stage.MARKER).read_text())["stage"] == "toy_tldr"
    sft_rows = read_jsonl(world / "sft.jsonl")
    human = read_jsonl(world / "prefs_human.jsonl")
    evals = read_jsonl(world / "eval.jsonl")
    assert (len(sft_rows), len(human), len(evals)) == (300, 300, 40)
    assert all(set(r) == {"prompt", "completion"} for r in sft_rows)
    assert all({"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} <= set(r) for r in human)
    assert all(set(r) == {"prompt", "reference"} for r in evals)
    # the command line writes what make_world makes for the same arguments
    args = toy_tldr.Args(num_sft=300, num_human_pairs=300, num_eval=40)
    assert [sft_rows, human, evals] == list(toy_tldr.make_world(args))
    config = json.loads((world / "config.json").read_text())
    assert config["num_sft"] == 300 and config["seed"] == 0
    assert config["vocab_size"] == len(toy_tldr.vocabulary())
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    for row in sft_rows[:20]:
        for text in row.values():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


@pytest.mark.after_the_rest
@pytest.mark.parametrize("flag", ["--num_sft", "--bt_temperature"])
def test_command_line_refuses_a_non_positive_size(cli_runs, flag):
    future, out_dir = cli_runs[flag]
    assert_clean_error(future.result(), out_dir, flag)
