"""The recipes (recipes/): the shared learning-rate schedule (stage.py) against its closed form, both recipes
end to end on stand-ins (recipes/pythia_tldr.sh: a tiny GPT-NeoX stored in float16 with a Pythia-like
tokenizer, snapshots of trl-lib/tldr and trl-lib/tldr-preference in their schemas; recipes/
llama3_ultrafeedback.sh: a tiny base Llama in bfloat16, snapshots of ultrachat_200k and
ultrafeedback_binarized), their torchrun launches (NPROC), and their hyperparameters against the tables of
recipes/README.md. How scale/prepare.py cuts TL;DR prompts is tests/test_prepare.py's."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm
import stage
import test_prepare as chat
import toy_tldr
from test_chat import save_tiny_llama
from test_prepare import write_snapshot
from test_sampled_ids import build_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# the schedule


def lrs(warmup, total, steps, peak=2.0, **kw):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = stage.lr_schedule(optimizer, warmup, total, **kw)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_matches_its_closed_form_at_warmup_middle_and_end():
    """Peak 2.0, 10 warm-up steps, 110 in all: step 5 is half the peak, step 60 (half way through the decay)
    the mean of peak and floor, step 110 the floor; no floor: the same with 0."""
    for floor in (0.0, 0.1):
        got = lrs(10, 110, 111, min_lr_ratio=floor)  # the stages take total_steps steps
        assert got[0] == 0.0 and got[5] == pytest.approx(1.0) and got[10] == pytest.approx(2.0)
        assert got[60] == pytest.approx(2.0 * (floor + (1 - floor) * 0.5))
        assert got[35] == pytest.approx(2.0 * (floor + (1 - floor) * (1 + math.cos(math.pi / 4)) / 2))
        assert got[110] == pytest.approx(2.0 * floor, abs=1e-12)
        assert min(got[10:]) == pytest.approx(2.0 * floor, abs=1e-12)
    assert lrs(3, 50, 10, shape="constant")[2:] == pytest.approx([4 / 3] + [2.0] * 7)


def test_wsd_schedule_is_constant_then_the_cosine_over_its_last_fraction():
    """wsd (warm-up, stable, decay): peak 2.0, 10 warm-up steps, 110 in all, the last 0.3 (33 steps, from
    step 77) a half cosine to the floor: the constant schedule until step 77, half way down at step 93.5,
    the floor at 110, written out here from its definition."""
    for floor in (0.0, 0.1):
        got = lrs(10, 110, 111, shape="wsd", min_lr_ratio=floor, decay_fraction=0.3)
        assert got[:78] == pytest.approx(lrs(10, 110, 78, shape="constant"))
        for step in (80, 93, 100, 109, 110):
            left = (110 - step) / 33
            expected = 2.0 * (floor + (1 - floor) * (1 - math.cos(math.pi * left)) / 2)
            assert got[step] == pytest.approx(expected)
        assert got[93] > 2.0 * (floor + 1) / 2 > got[94] and got[110] == pytest.approx(2.0 * floor, abs=1e-12)
        assert all(a >= b for a, b in zip(got[10:], got[11:]))  # never up again after the warm-up
    for shape in ("constant", "cosine", "wsd"):  # no warm-up: the first step already takes the peak
        assert lrs(0, 110, 2, shape=shape) == [2.0, pytest.approx(2.0, rel=1e-3)]
    decayed = lrs(10, 110, 111, shape="wsd", decay_fraction=1.0)  # the cosine spans the whole run
    assert decayed[60] == pytest.approx(2.0 * (1 - math.cos(math.pi * 50 / 110)) / 2) and decayed[110] == 0.0


def test_schedule_is_transformers_cosine_and_constant_to_the_last_bit():
    """stage.lr_schedule computes every shape itself; the cosine (with and without a floor) and the constant
    equal transformers' schedules to the last bit, so the toy's numbers are as they were before."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_cosine_with_min_lr_schedule_with_warmup)

    cases = [(lambda o: get_cosine_schedule_with_warmup(o, 20, 124), {}),
             (lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 20, 124, min_lr_rate=0.1),
              {"min_lr_ratio": 0.1}),
             (lambda o: get_constant_schedule_with_warmup(o, 20), {"shape": "constant"})]
    for make, ours in cases:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        theirs = make(optimizer)
        expected = []
        for _ in range(126):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            theirs.step()
        assert lrs(20, 124, 126, peak=3e-4, **ours) == expected


def test_schedule_refuses_a_floor_outside_0_1():
    with pytest.raises(SystemExit, match="min_lr_ratio"):
        lrs(1, 10, 1, min_lr_ratio=1.5)
    with pytest.raises(SystemExit, match="lr_schedule"):
        lrs(1, 10, 1, shape="linear")
    with pytest.raises(SystemExit, match="decay_fraction"):
        lrs(1, 10, 1, shape="wsd", decay_fraction=0.0)


# ----------------------------------------------------------------------------------------------
# stand-ins: the toy world's rows in the real TL;DR frame, each post in paragraphs


def reddit_frame(toy_prompt):
    """'SUBREDDIT: r/s TITLE: t POST: a . b . c . TL;DR:' -> trl-lib/tldr's frame, a paragraph per two
    sentences."""
    s, t, post = re.fullmatch(r"SUBREDDIT: r/(.*?) TITLE: (.*?) POST: (.*) TL;DR:", toy_prompt).groups()
    sentences = [x.strip() + " ." for x in post.split(" .") if x.strip()]
    paragraphs = [" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2)]
    return f"SUBREDDIT: r/{s}\n\nTITLE: {t}\n\nPOST: " + "\n".join(paragraphs) + "\n\nTL;DR:"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("recipe")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=60, num_eval=8))
    read = {n: lm.read_jsonl(root / "world" / f"{n}.jsonl") for n in ("sft", "eval", "prefs_human")}
    sft = [{"prompt": reddit_frame(r["prompt"]), "completion": " " + r["completion"]} for r in read["sft"]]
    test = [{"prompt": reddit_frame(r["prompt"]), "completion": " " + r["reference"]} for r in read["eval"]]
    prefs = [{"prompt": reddit_frame(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in read["prefs_human"]]
    write_snapshot(root / "tldr", {"train": sft, "validation": test, "test": test}, ("prompt", "completion"))
    write_snapshot(root / "tldr-preference", {"train": prefs, "validation": prefs},
                   ("prompt", "chosen", "rejected"))
    tokenizer = build_bpe_tokenizer([r["prompt"] + r["completion"] for r in sft], pythia=True)
    config = GPTNeoXConfig(vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():  # a constant channel, read by the output layer as a bias toward EOS: samples end
        model.gpt_neox.final_layer_norm.weight[0] = 0.0
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[tokenizer.eos_token_id, 0] = 4.5
    model.half().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


# ----------------------------------------------------------------------------------------------
# the recipes, end to end at a tiny size


TINY = dict(MAX_PROMPT_LEN="64", MAX_RESPONSE_LEN="16", WARMUP_STEPS="1", SFT_LR="1e-3", SFT_BATCH="8",
            SFT_ACCUM="1", SFT_STEPS="2", SFT_VAL="8", RM_LR="1e-3", RM_BATCH="8", RM_ACCUM="1", RM_STEPS="2",
            RM_VAL="8", LABEL_PROMPTS="24", DAA_LR="1e-3", DAA_BATCH="4", DAA_ACCUM="1", DAA_EPOCHS="0.5",
            BETAS="0.1", SEEDS="1", NUM_CHECKPOINTS="1", EVAL_PROMPTS="4", SAMPLE_BATCH="8", GOLD_FSDP="0")


SHIM = """#!/usr/bin/env bash
# the recipe's $PYTHON in the test: the test process runs the command (its imports paid once) and answers
printf '%s\\0' "$PWD" "$@" > "$RECIPE_REQUEST"
read -r rc < "$RECIPE_REPLY"
exit "$rc"
"""


def run_in_process(cwd, argv):
    """`python argv...` in this process, in cwd: the script (or `-m module`) run as __main__; its exit
    status."""
    import runpy

    old = os.getcwd(), sys.argv
    try:
        os.chdir(cwd)
        if argv[0] == "-m":  # sys.argv[0] becomes the module's file, as with python -m
            sys.argv = list(argv[1:])
            imported = sys.modules.pop(argv[1], None)  # run afresh as __main__, as python -m does
            try:
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            finally:
                if imported is not None:
                    sys.modules[argv[1]] = imported
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        print(e.code)
        return 0 if e.code in (None, 0) else e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old[0])
        sys.argv = old[1]


def run_recipe(script, env, tmp_path):
    """bash script with $PYTHON a shim that hands every command to this process (one Python process for all
    the stages: each would otherwise pay torch's and transformers' imports again); the commands it ran."""
    import threading

    request, reply, shim = tmp_path / "request", tmp_path / "reply", tmp_path / "python"
    os.mkfifo(request)
    os.mkfifo(reply)
    shim.write_text(SHIM)
    shim.chmod(0o755)
    env = {**env, "PYTHON": str(shim), "RECIPE_REQUEST": str(request), "RECIPE_REPLY": str(reply)}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    def finished():  # wakes the loop below once bash has exited
        proc.wait()
        with open(request, "w") as f:
            f.write("")

    threading.Thread(target=finished, daemon=True).start()
    ran = []
    while True:
        with open(request) as f:
            message = f.read()
        if not message:
            break
        cwd, *argv = message.rstrip("\0").split("\0")
        ran.append(argv)
        rc = run_in_process(cwd, argv)
        with open(reply, "w") as f:
            f.write(f"{rc}\n")
    return proc.returncode, proc.stdout.read(), ran


def commands(ran):
    """The recipe's commands by what they run: the script, or `-m module`."""
    return [" ".join(a[:2]) if a[0] == "-m" else a[0] for a in ran]


def test_pythia_recipe_runs_end_to_end_on_standins(standins, tmp_path, capsys):
    """Data first (scale.prepare: the two snapshots, --tldr_truncation), the SFTs, the gold RM, the labels,
    log pi_ref of the pairs once (dpo.py --reference_only, saved beside them), DPO and IS-DPO, the evaluation;
    run again, only the evaluation (it skips the rows it has)."""
    root = standins
    out = tmp_path / "out"
    env = {**os.environ, **TINY, "MODEL": str(root / "model"), "GOLD_MODEL": str(root / "model"),
           "TLDR": str(root / "tldr"), "TLDR_PREF": str(root / "tldr-preference"), "OUT": str(out)}
    rc, stdout, ran = run_recipe(ROOT / "recipes" / "pythia_tldr.sh", env, tmp_path)
    assert rc == 0, stdout[-3000:]
    assert commands(ran) == ["-m scale.prepare"] * 3 + ["sft.py"] * 2 + ["reward.py"] * 2 + [
        "dpo.py"] * 2 + ["is_dpo.py", "evaluate.py"]
    assert "--reference_only" in ran[7] and "--reference_only" not in ran[8]
    for path in ("data/tldr_train/sft.jsonl", "data/tldr_test/eval.jsonl", "data/tldr_pref_train/train.jsonl",
                 "data/tldr_train/tokenizer", "sft", "gold_sft", "gold_rm", "prefs/train.jsonl",
                 "prefs/reference_logps.pt", "runs/dpo_beta0.1_seed1/train_log.jsonl",
                 "runs/is-dpo_beta0.1_seed1/train_log.jsonl", "eval/summary.md", "plots/tradeoff.png"):
        assert (out / path).exists(), path
    budget = int(TINY["MAX_PROMPT_LEN"])
    for name in ("tldr_train/sft.jsonl", "tldr_test/eval.jsonl", "tldr_pref_train/train.jsonl"):
        rows = lm.read_jsonl(out / "data" / name)
        assert rows and all(len(r["prompt_ids"]) <= budget and r["prompt"].endswith("TL;DR:") for r in rows)
    assert all("reference_ids" in r for r in lm.read_jsonl(out / "data" / "tldr_test" / "eval.jsonl"))
    rows = lm.read_jsonl(out / "eval" / "results.jsonl")
    assert {r["run"] for r in rows} == {"dpo_beta0.1_seed1", "is-dpo_beta0.1_seed1"}
    config = json.load(open(out / "runs" / "is-dpo_beta0.1_seed1" / "args.json"))
    assert config["weight"] == "clipped" and config["min_lr_ratio"] == 0.1 and config["warmup_steps"] == 1
    said = capsys.readouterr().out  # what the stages (run in this process) printed
    assert said.count("reference log-probs: read from") == 2  # the DAA runs read what --reference_only saved
    (tmp_path / "again").mkdir()
    rc, stdout, ran = run_recipe(ROOT / "recipes" / "pythia_tldr.sh", env, tmp_path / "again")
    assert rc == 0 and commands(ran) == ["evaluate.py"] and "sft exists, skipped" in stdout, stdout[-3000:]


@pytest.mark.parametrize("script", ["pythia_tldr.sh", "llama3_ultrafeedback.sh"])
def test_nproc_launches_torchrun_and_keeps_the_examples_per_step(script, tmp_path):
    """NPROC=2: every stage but the data preparation starts under torchrun with half the accumulation (a
    step keeps BATCH x ACCUM examples: --batch_size is one process's); NPROC=3 with ACCUM 8: one error line.
    The stages are not run: $PYTHON is a stand-in that writes down its command line."""
    log, fake = tmp_path / "commands", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "SEEDS": "1", "BETAS": "0.1"}
    done = subprocess.run(["bash", str(ROOT / "recipes" / script)], env={**env, "NPROC": "2"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stages = [line for line in log.read_text().splitlines() if not line.startswith("-m scale.prepare ")]
    assert len(stages) >= 3
    launcher = "-m torch.distributed.run --standalone --nproc_per_node 2 "
    assert all(line.startswith(launcher) for line in stages), stages
    assert all(re.search(r"--grad_accum 4 ", line) for line in stages if "--grad_accum" in line)
    assert sum("--grad_accum" in line for line in stages) >= 3
    done = subprocess.run(["bash", str(ROOT / "recipes" / script)], env={**env, "NPROC": "3"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "NPROC=3" in done.stderr


def test_pythia_recipe_fits_its_hardware(tmp_path):
    """The 6.9B gold RM's SFT and training run under --fsdp --gradient_checkpointing (the policy's do not);
    one process with GOLD_FSDP=1 is refused before any work; per-stage flags reach their stages; the disk
    arithmetic (runs x checkpoints x size) is printed first; IS_LOSS=ipo names the IS runs' loss."""
    log, fake = tmp_path / "commands", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "NPROC": "2", "IS_LOSS": "ipo",
           "SFT_FLAGS": "--sft_x", "RM_FLAGS": "--rm_x", "DAA_FLAGS": "--daa_x", "EVAL_FLAGS": "--eval_x"}
    done = subprocess.run(["bash", str(ROOT / "recipes" / "pythia_tldr.sh")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "== disk: 18 runs x 11 checkpoints x 2.0 GB = 396 GB, + pi_ref 2.0 GB + the gold SFT and RM"
        " 2 x 13.7 GB = 425 GB (a running stage also keeps its --resume state: 16 bytes a parameter)")
    stages = {}
    for line in log.read_text().splitlines():
        if not line.startswith("-m scale.prepare "):
            script = line.split("--nproc_per_node 2 ")[1].split()[0]
            named = re.search(r"--(?:out_dir|run_name) (\S+)", line)
            stages[f"{script} {os.path.basename(named.group(1)) if named else 'reference'}"] = line
    sharded = {k for k, line in stages.items() if "--fsdp --gradient_checkpointing" in line}
    assert sharded == {"sft.py gold_sft", "reward.py gold_rm"}, sharded
    for key, line in stages.items():
        flag = {"sft.py": "--sft_x", "reward.py": "--rm_x", "dpo.py": "--daa_x", "is_dpo.py": "--daa_x",
                "evaluate.py": "--eval_x"}[key.split()[0]]
        assert line.endswith(flag) or f"{flag} " in line, line
    assert sum(key.startswith("is_dpo.py is-ipo_beta") for key in stages) == 9
    assert all("--loss_type ipo" in line for key, line in stages.items() if key.startswith("is_dpo.py"))
    ran = log.read_text()
    done = subprocess.run(["bash", str(ROOT / "recipes" / "pythia_tldr.sh")], env={**env, "NPROC": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: GOLD_FSDP=1")
    assert log.read_text() == ran


LLAMA_TINY = dict(WARMUP_STEPS="1", SFT_LR="1e-3", SFT_BATCH="4", SFT_ACCUM="1", SFT_STEPS="2", SFT_VAL="4",
                  SFT_PROMPT_LEN="96", SFT_RESPONSE_LEN="16", DAA_LR="1e-3", DAA_BATCH="4", DAA_ACCUM="1",
                  DAA_EPOCHS="0.5", DAA_PROMPT_LEN="96", DAA_RESPONSE_LEN="16", SEEDS="1",
                  NUM_CHECKPOINTS="1")


def test_llama3_recipe_runs_end_to_end_on_standins(tmp_path):
    """recipes/llama3_ultrafeedback.sh on a tiny base Llama (bfloat16, no chat template) and snapshots of
    ultrachat_200k (train_sft / test_sft) and ultrafeedback_binarized (train_prefs / test_prefs): the data
    prepared through the recipe's default template, recipes/llama3.jinja (saved with the data's tokenizer and
    then with pi_ref, <|eot_id|> its EOS, rendering Llama-3's format as written out by hand), SFT, log pi_ref
    of the pairs once, then DPO and IS-DPO with clipped weights; run again, nothing."""
    from scale import data

    train, test = chat.conversations(0, 16), chat.conversations(1, 4)
    write_snapshot(tmp_path / "ultrachat_200k", {"train_sft": chat.ultrachat_rows(train),
                                                 "test_sft": chat.ultrachat_rows(test)})
    write_snapshot(tmp_path / "ultrafeedback_binarized", {"train_prefs": chat.h4_feedback_rows(train),
                                                          "test_prefs": chat.h4_feedback_rows(test)})
    save_tiny_llama(tmp_path / "base", [m["content"] for c, o in train for m in c + [o]])
    assert lm.load_tokenizer(str(tmp_path / "base")).chat_template is None
    out = tmp_path / "out"
    env = {**os.environ, **LLAMA_TINY, "MODEL": str(tmp_path / "base"), "OUT": str(out),
           "ULTRACHAT": str(tmp_path / "ultrachat_200k"),
           "ULTRAFEEDBACK": str(tmp_path / "ultrafeedback_binarized")}
    env.pop("CHAT_TEMPLATE", None)
    rc, stdout, ran = run_recipe(ROOT / "recipes" / "llama3_ultrafeedback.sh", env, tmp_path)
    assert rc == 0, stdout[-3000:]
    assert commands(ran) == ["-m scale.prepare"] * 2 + ["sft.py", "dpo.py", "dpo.py", "is_dpo.py"]
    assert ran[0][ran[0].index("--chat_template") + 1] == "recipes/llama3.jinja"
    assert "--reference_only" in ran[3] and (out / "data" / "ultrafeedback" / "reference_logps.pt").is_file()
    template = (ROOT / "recipes" / "llama3.jinja").read_text()
    for saved in (lm.load_tokenizer(str(out / "data" / "ultrachat" / "tokenizer")),
                  lm.load_tokenizer(str(out / "sft"))):
        assert saved.chat_template == template and saved.eos_token == chat.EOT
    messages = train[0][0] + [chat.user("And then?")]
    for generation_prompt in (True, False):
        assert data.render(saved, messages, generation_prompt) == chat.by_hand(messages, generation_prompt)
    pairs = lm.read_jsonl(out / "data" / "ultrafeedback" / "train.jsonl")
    assert len(pairs) == len(train) and all(r["chosen_ids"][-1] == saved.eos_token_id for r in pairs)
    prepared = json.load(open(out / "data" / "ultrafeedback" / "prepare.json"))["args"]
    assert prepared["data"] == env["ULTRAFEEDBACK"] and prepared["split"] == "train_prefs"
    for run, weight in (("dpo_beta0.05_seed1", "uniform"), ("is-dpo_beta0.05_seed1", "clipped")):
        assert (out / "runs" / run / "train_log.jsonl").exists() and list((out / "runs" / run).glob("ckpt-*"))
        config = json.load(open(out / "runs" / run / "args.json"))
        assert config["min_lr_ratio"] == 0.1 and config["warmup_steps"] == 1 and config["beta"] == 0.05
        assert config["data"] == str(out / "data" / "ultrafeedback" / "train.jsonl")
        assert config.get("weight", "uniform") == weight
    assert json.load(open(out / "runs" / "is-dpo_beta0.05_seed1" / "args.json"))["log_w_max"] == 2.0
    (tmp_path / "again").mkdir()
    rc, stdout, ran = run_recipe(ROOT / "recipes" / "llama3_ultrafeedback.sh", env, tmp_path / "again")
    assert rc == 0 and ran == [] and stdout.count("exists, skipped") == 6, stdout


# ----------------------------------------------------------------------------------------------
# the table and the script cannot drift apart


def script_defaults(path):
    return dict(re.findall(r"^([A-Z_]+)=\$\{\1:-\"?([^}\"]*)\"?\}", path.read_text(), re.M))


def readme_table(path, title):
    """{VARIABLE: our value} from the rows '| setting (`VARIABLE`) | our value | paper | source |' of the
    table under the heading `title`."""
    text = path.read_text().split(title, 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip().strip("`") for m in
            re.finditer(r"^\|[^|\n]*\(`([A-Z_]+)`\)[^|\n]*\|([^|\n]*)\|", text, re.M)}


@pytest.mark.parametrize("script, title", [
    ("pythia_tldr.sh", "## TL;DR (Pythia)"),
    ("llama3_ultrafeedback.sh", "## Instruction following (Llama-3.2-3B)")])
def test_readme_table_lists_the_recipes_defaults(script, title):
    defaults = script_defaults(ROOT / "recipes" / script)
    table = readme_table(ROOT / "recipes" / "README.md", title)
    skip = {"OUT", "NPROC", "PYTHON", "CHAT_TEMPLATE"}  # where things go and run, not settings
    assert len(table) >= 10
    assert {k: v for k, v in defaults.items() if k not in skip} == table
    lines = (ROOT / "recipes" / script).read_text().splitlines()
    body = "\n".join(line for line in lines if not re.match(r"\s*#|[A-Z_]+=\$\{", line))
    for name in table:  # every listed value reaches a command (not only a comment or its own default)
        assert re.search(r"\$\{?" + name + r"\b", body), name
