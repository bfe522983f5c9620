"""Tests for sft.py: encoding and masks, the loss against a naive computation, the loss going down,
generation = teacher forcing, and the command line (the contract, a local .jsonl, bad input).

The command lines are queued on the session's runner before the other tests (see test_toy_tldr.py)."""
import json
import math
import random
from contextlib import nullcontext

import pytest
import torch

import lm
import sft
import stage
import toy_tldr
from test_toy_tldr import (TINY_MODEL, assert_clean_error, assert_ran, no_partial_copy, pipeline_stage,
                           read_jsonl, start_pipeline, submit_cases, write_small_world)

SIZES = ["--steps", 2, "--batch_size", 8, "--val_size", 10, "--num_sample_eval", 4, *TINY_MODEL]


# ----------------------------------------------------------------------------------------------
# the command lines, queued before the other tests


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Queues the pipeline and this file's command lines on the runner:
    ({case: Future of its CompletedProcess}, the directory holding each case's --out_dir)."""
    start_pipeline(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("sft_cli")
    world = write_small_world(tmp / "world")
    with open(tmp / "rows.jsonl", "w") as f:  # a local .jsonl of the canonical form, one more column
        for r in read_jsonl(world / "sft.jsonl"):
            f.write(json.dumps({**r, "id": 7}) + "\n")
    with open(tmp / "posts.jsonl", "w") as f:  # other column names: scale/prepare.py maps them, not sft.py
        for r in read_jsonl(world / "sft.jsonl"):
            f.write(json.dumps({"post": r["prompt"], "summary": r["completion"]}) + "\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "rows.parquet").write_text("")
    local = ["--tokenizer_path", world / "tokenizer"]
    cases = {
        "local jsonl": ["--data", tmp / "rows.jsonl", *local],
        "other columns": ["--data", tmp / "posts.jsonl", *local],
        "not jsonl": ["--data", tmp / "rows.parquet", *local],
        "missing data file": ["--data", tmp / "no_such_file.jsonl", *local],
        "empty jsonl": ["--data", tmp / "empty.jsonl", *local],
        "no tokenizer": ["--data", tmp / "rows.jsonl"],
        "prompt too long": ["--data", world, "--max_prompt_len", 20],
        "zero steps": ["--data", world, "--steps", 0],
    }
    return submit_cases(tmp_path_factory, "sft.py", {k: [*SIZES, *v] for k, v in cases.items()}, tmp), tmp


@pytest.mark.before_the_rest
def test_command_lines_start(cli_runs):
    """The command lines start before the session's other tests, and run while they do."""
    assert len(cli_runs[0]) == 8


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tldr.build_tokenizer()


def tiny_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return lm.new_model(tokenizer, n_layer=1, n_embd=32, n_head=2, max_len=88)


def toy_rows(n, seed=0):
    return toy_tldr.make_world(toy_tldr.Args(seed=seed, num_sft=n, num_human_pairs=1, num_eval=1))[0]


def teacher_forced_logp(model, prompt, response):
    """Sum of log p(response | prompt) from one plain forward on prompt + response alone."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()


# ----------------------------------------------------------------------------------------------
# 1. encoding, batching, the loss


@pytest.mark.core
def test_encode_appends_eos_and_collate_masks_only_the_response(tokenizer):
    rows = toy_rows(2)
    examples = lm.encode(tokenizer, rows, "completion", 64, 24)
    for r, (p, resp) in zip(rows, examples):
        assert p == tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        assert resp[-1] == tokenizer.eos_token_id and tokenizer.decode(resp[:-1]) == r["completion"]
    batch = lm.collate(examples, tokenizer.pad_token_id)
    for i, (p, resp) in enumerate(examples):
        n = len(p) + len(resp)
        assert batch["input_ids"][i, :n].tolist() == p + resp
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["response_mask"][i].nonzero().squeeze(-1).tolist() == list(range(len(p), n))
    [(_, cut)] = lm.encode(tokenizer, rows[:1], "completion", 64, 3)
    assert len(cut) == 3 and tokenizer.eos_token_id not in cut  # cut at max_response_len: no EOS


@pytest.mark.core
def test_encode_rows_in_one_batch_equals_one_tokenizer_call_per_text(tokenizer):
    rows = toy_rows(40)
    got = lm.encode(tokenizer, rows, "completion", 64, 12)
    for r, (p, resp) in zip(rows, got):
        assert p == tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        assert resp == (tokenizer(" " + r["completion"],
                                  add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:12]
    assert any(len(resp) == 12 for _, resp in got) and any(len(resp) < 12 for _, resp in got)
    assert lm.encode(tokenizer, [], "completion", 64, 12) == []
    with pytest.raises(SystemExit, match="^error: a prompt is empty"):
        lm.encode(tokenizer, [{"prompt": "", "completion": "a"}, rows[0]], "completion", 64, 12)


@pytest.mark.core
def test_a_long_prompt_is_refused_with_the_way_to_cut_it(tokenizer):
    row = {**toy_rows(1)[0], "completion": "x"}
    with pytest.raises(SystemExit, match="^error: .*--max_prompt_len 10.*scale.prepare --truncate_prompts"):
        lm.encode(tokenizer, [row], "completion", 10, 24)


@pytest.mark.core
def test_rows_with_token_ids_are_used_as_they_are(tokenizer):
    """A row's prompt_ids and completion_ids (scale/prepare.py's, a sampler's) are the tokens, cut at
    max_response_len; a row without them is encoded from its text, in the same call."""
    rows = toy_rows(3)
    rows[0] = {**rows[0], "prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11]}
    got = lm.encode(tokenizer, rows, "completion", 64, 3)
    assert got[0] == ([5, 6, 7], [8, 9, 10])
    assert got[1:] == lm.encode(tokenizer, rows[1:], "completion", 64, 3)
    with pytest.raises(SystemExit, match="^error: .*beyond the tokenizer"):  # ids of another tokenizer
        lm.encode(tokenizer, [{**rows[1], "completion_ids": [len(tokenizer)]}], "completion", 64, 3)


@pytest.mark.core
def test_completion_loss_is_the_mean_nll_of_response_tokens(tokenizer):
    model = tiny_lm(tokenizer)
    examples = lm.encode(tokenizer, toy_rows(3), "completion", 64, 24)
    examples[1] = (examples[1][0][:20], examples[1][1])  # rows of different lengths: padding in the batch
    loss = sft.completion_loss(model, lm.collate(examples, tokenizer.pad_token_id))
    nll = []  # naive: each row alone, each response token predicted by the logits one step before it
    for p, r in examples:
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
        nll += [-logp[len(p) + t - 1, token].item() for t, token in enumerate(r)]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), abs=1e-5)


@pytest.mark.core
def test_sft_loss_goes_down_on_a_tiny_config(tokenizer):
    model = tiny_lm(tokenizer)
    batch = lm.collate(lm.encode(tokenizer, toy_rows(8), "completion", 64, 24), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = sft.completion_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(len(tokenizer)), rel=0.05)  # an untrained model is ~uniform
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < min(losses[:5])


# ----------------------------------------------------------------------------------------------
# 2. generation = teacher forcing


@pytest.fixture(scope="module")
def peaked_lm(tokenizer):
    """A random model with large weights (peaked, position-sensitive distributions: a bug in the
    padding or cache cannot hide in near-uniform ones) and EOS made likely enough that some rows end early."""
    model = tiny_lm(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        model.lm_head.weight[tokenizer.eos_token_id] *= 3
    return model.eval()


@pytest.fixture(scope="module")
def ragged_prompts(tokenizer):
    """Prompts of four different lengths: left padding differs for every row."""
    rng = random.Random(0)
    return [tokenizer(toy_tldr.make_post(rng)[1], add_special_tokens=False)["input_ids"][-n:]
            for n in (5, 17, 30, 44)]


@pytest.mark.core
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_sampled_logps_equal_teacher_forcing(tokenizer, peaked_lm, ragged_prompts, temperature):
    # the log-probs are those of the temperature-1 policy, whatever temperature the tokens were drawn at
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)
    responses, logps = lm.sample(peaked_lm, ragged_prompts, eos, tokenizer.pad_token_id, 12,
                                 temperature=temperature, generator=generator)
    assert any(r[-1] == eos for r in responses) and any(eos not in r for r in responses)  # both kinds of row
    for prompt, response, logp in zip(ragged_prompts, responses, logps):
        assert eos not in response[:-1] and tokenizer.pad_token_id not in response  # cut after the first EOS
        assert 1 <= len(response) <= 12
        assert logp == pytest.approx(teacher_forced_logp(peaked_lm, prompt, response), rel=1e-6, abs=1e-5)
    # the check has teeth: padding that is attended to (no attention mask) changes the log-probs
    prompt, response = ragged_prompts[0], responses[0]
    padded = torch.tensor([[tokenizer.pad_token_id] * 39 + prompt + response])
    logits = peaked_lm(input_ids=padded).logits[0, 39 + len(prompt) - 1:-1]
    unmasked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()
    assert abs(unmasked - logps[0]) > 1e-2


@pytest.mark.core
@torch.no_grad()
def test_greedy_batch_equals_each_prompt_alone(tokenizer, peaked_lm, ragged_prompts):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses, logps = lm.sample(peaked_lm, ragged_prompts, eos, pad, 12, temperature=0)
    assert len({len(r) for r in responses}) > 1  # rows end at different steps
    for prompt, response, logp in zip(ragged_prompts, responses, logps):
        [alone], [alone_logp] = lm.sample(peaked_lm, [prompt], eos, pad, 12, temperature=0)
        assert response == alone
        assert logp == pytest.approx(alone_logp, rel=1e-6, abs=1e-5)
    # batch_size splits the batch without changing a row
    assert lm.sample(peaked_lm, ragged_prompts, eos, pad, 12, temperature=0, batch_size=3)[0] == responses


@pytest.mark.core
def test_collate_grouped_pads_prompts_left_and_responses_right(tokenizer):
    examples = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([11], [12, 13, 14]), ([11], [15])]
    batch = lm.collate_grouped(examples, pad_id=0, k=2)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 11]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["response_ids"].tolist() == [[8, 9, 0], [10, 0, 0], [12, 13, 14], [15, 0, 0]]
    assert batch["response_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):  # a group must share its prompt
        lm.collate_grouped([([1], [2]), ([3], [4])], pad_id=0, k=2)


@pytest.mark.core
@pytest.mark.parametrize("k", [1, 2, 3])
@torch.no_grad()
def test_response_hidden_equals_the_full_forward_of_each_sequence(tokenizer, peaked_lm, ragged_prompts, k):
    rng = random.Random(k)
    examples = [(p, [rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(1, 6))])
                for p in ragged_prompts for _ in range(k)]
    batch = lm.collate_grouped(examples, tokenizer.pad_token_id, k=k)
    hidden = lm.response_hidden(peaked_lm.base_model, batch)
    for i, (p, r) in enumerate(examples):
        alone = peaked_lm.base_model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
        # hidden[i, t] has read the prompt and t response tokens: the full forward's position len(p) - 1 + t
        torch.testing.assert_close(hidden[i, :len(r) + 1], alone[len(p) - 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.core
def test_decode_response_reports_whether_eos_ended_it(tokenizer):
    ids = tokenizer("my mom lied to me .", add_special_tokens=False)["input_ids"]
    assert lm.decode_response(tokenizer, ids + [tokenizer.eos_token_id]) == ("my mom lied to me .", True)
    assert lm.decode_response(tokenizer, ids) == ("my mom lied to me .", False)


@pytest.mark.core
@torch.no_grad()
def test_samples_hold_no_special_token_but_eos(tokenizer):
    model = tiny_lm(tokenizer)  # untrained: every token about equally likely
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in toy_rows(8)]
    responses, _ = lm.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 24,
                             generator=torch.Generator().manual_seed(0),
                             suppress_ids=lm.banned_ids(tokenizer))
    other_specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    assert not [t for r in responses for t in r if t in other_specials]


# ----------------------------------------------------------------------------------------------
# 3. the command line


@pytest.mark.after_the_rest
def test_command_line_saves_pi_ref_of_the_contract(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, out = pipeline_stage(tmp_path_factory, "world"), pipeline_stage(tmp_path_factory, "sft")
    assert no_partial_copy(out) and stage.read_marker(out)["stage"] == "sft"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "args.json"):
        assert (out / name).is_file(), name
    assert not (out / "state.pt").exists()  # the resume state goes when the run ends
    args = json.loads((out / "args.json").read_text())
    assert args["steps"] == 40 and args["n_embd"] == 32 and args["data"] == str(world)
    log = read_jsonl(out / "train_log.jsonl")
    assert [row["step"] for row in log] == list(range(1, 41))
    assert all({"loss", "grad_norm", "lr"} <= set(row) for row in log)
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_loss", "sample_true_score", "reference_true_score"} <= set(metrics)
    # the saved model reopens with the Auto classes and gives the validation loss that was reported
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and tokenizer.get_vocab() == toy_tldr.build_tokenizer().get_vocab()
    val = lm.encode(tokenizer, read_jsonl(world / "sft.jsonl")[-20:], "completion", 64, 24)
    val_loss = sft.validation_loss(stage.Forward(sft.completion_loss, model), val, tokenizer.pad_token_id,
                                   8, torch.device("cpu"), nullcontext())
    assert val_loss == pytest.approx(metrics["val_loss"], abs=1e-4)
    assert val_loss < math.log(len(tokenizer))  # it learned something in 40 steps


@pytest.mark.after_the_rest
def test_command_line_trains_on_a_local_jsonl(cli_runs):
    runs, tmp = cli_runs
    assert_ran(runs["local jsonl"].result(timeout=600))
    out = tmp / "local_jsonl"
    assert no_partial_copy(out)
    metrics = json.loads((out / "metrics.json").read_text())
    # not the toy: no true score
    assert math.isfinite(metrics["val_loss"]) and "sample_true_score" not in metrics
    assert len(read_jsonl(out / "train_log.jsonl")) == 2
    assert json.loads((out / "args.json").read_text())["data"] == str(tmp / "rows.jsonl")


@pytest.mark.after_the_rest
@pytest.mark.parametrize("case, words", [
    ("other columns", ["'prompt'", "['post', 'summary']", "scale.prepare"]),
    ("not jsonl", ["rows.parquet", "scale.prepare"]),
    ("missing data file", ["no_such_file.jsonl", "not found"]),
    ("empty jsonl", ["empty.jsonl"]),
    ("no tokenizer", ["--tokenizer_path"]),
    ("prompt too long", ["--max_prompt_len 20"]),
    ("zero steps", ["--steps"]),
])
def test_command_line_bad_input_gives_one_clear_error(cli_runs, case, words):
    runs, tmp = cli_runs
    assert_clean_error(runs[case].result(timeout=600), tmp / case.replace(" ", "_"), *words)
