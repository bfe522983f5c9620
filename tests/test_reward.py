"""Tests for reward.py: the Bradley-Terry loss by hand, scores taken at the last real token, the two
command lines (gold RM, labelled pairs) against the contract, the gold RM reopened with the Auto
classes, and bad input.

The command lines are queued on the session's runner before the first test (see test_toy_tldr.py)."""
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import reward
import policy
import sft
import toy_tldr
from test_toy_tldr import assert_clean_error, pipeline_stage, read_jsonl, start_pipeline, submit_cases


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Queues the pipeline and this file's bad-input runs on the runner before its first test:
    ({case: Future of its CompletedProcess}, the directory holding each case's --out_dir).
    They fail before any model is read, so --sft_path is an empty directory."""
    start_pipeline(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("reward_cli")
    (tmp / "empty_sft").mkdir()
    base = ["--sft_path", tmp / "empty_sft", "--data", tmp / "no_such_world"]
    cases = {
        "unknown mode": ["--mode", "evaluate"],
        "label without a gold model": ["--mode", "label", "--judge", "rm", "--gold_path",
                                       tmp / "no_such_gold_rm"],
        "negative batch size": ["--mode", "train", "--batch_size", -1],
        "missing data dir": ["--mode", "train"],
    }
    return submit_cases(tmp_path_factory, "reward.py", {k: [*base, *v] for k, v in cases.items()}, tmp), tmp


# ----------------------------------------------------------------------------------------------
# 1. the loss and the scores


def test_bradley_terry_loss_matches_a_hand_computation():
    r_chosen, r_rejected = torch.tensor([1.0, -0.5, 2.0, 3.0]), torch.tensor([0.0, 0.5, 2.0, -7.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 0, 10
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e) + math.log(2)
                + math.log(1 + math.exp(-10))) / 4
    assert reward.bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    # swapping chosen and rejected of a pair with margin d costs exactly d more for that pair
    d = r_chosen - r_rejected
    loss = reward.bradley_terry_loss
    swapped = loss(r_rejected, r_chosen).item() - loss(r_chosen, r_rejected).item()
    assert swapped == pytest.approx(d.mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny GPT-NeoX saved as pi_ref would be, reopened as a reward model with a random (not zero) head."""
    tokenizer = toy_tldr.build_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_lm")
    policy.load_causal_lm(sft.Args(n_layer=1, n_embd=32, n_head=2), tokenizer).save_pretrained(path)
    model = reward.load_reward_model(str(path), tokenizer, new_head=True).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order one: the position they are read at shows
    return model, tokenizer, path


def toy_pairs(tokenizer, n):
    human = toy_tldr.make_world(toy_tldr.Args(num_sft=1, num_human_pairs=n, num_eval=1))[1]
    return [tuple(policy.encode(tokenizer, r["prompt"], r[k], 64, 24) for k in ("chosen", "rejected"))
            for r in human]


@torch.no_grad()
def test_reward_scores_read_the_last_real_token(tiny_rm):
    model, tokenizer, _ = tiny_rm
    pairs = toy_pairs(tokenizer, 3)
    batch = reward.pair_batch(pairs, tokenizer.pad_token_id)  # one prompt, two responses of different lengths
    assert (batch["response_mask"] == 0).any()
    scores = reward.reward_scores(model, batch)
    assert scores.shape == (6,)
    rows = [example for pair in pairs for example in pair]  # pair_batch: chosen, rejected, chosen, ...
    alone = torch.cat([reward.reward_scores(model, policy.collate_grouped([row], tokenizer.pad_token_id))
                       for row in rows])
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)
    # independent: the model's own pooling on full right-padded sequences (with pad != EOS, as on the
    # toy, it finds the last non-pad token itself)
    full = policy.collate(rows, tokenizer.pad_token_id)
    torch.testing.assert_close(model(input_ids=full["input_ids"],
                                     attention_mask=full["attention_mask"]).logits.squeeze(-1),
                               scores, rtol=1e-5, atol=1e-5)
    # the check has teeth: the head read at the last position (padding for the shorter rows) differs
    hidden = model.base_model(input_ids=full["input_ids"],
                              attention_mask=full["attention_mask"]).last_hidden_state
    at_end = model.score(hidden[:, -1]).squeeze(-1)
    padded = full["attention_mask"][:, -1] == 0
    assert padded.any() and (at_end[padded] - scores[padded]).abs().min() > 1e-3


def test_score_pairs_equals_scoring_each_response_from_its_text(tiny_rm):
    """The RM's validation scores (prompt run once per pair, batches of 2 pairs) against score_texts
    (every prompt + response on its own row, from the texts) for chosen and rejected separately."""
    model, tokenizer, _ = tiny_rm
    human = toy_tldr.make_world(toy_tldr.Args(num_sft=1, num_human_pairs=5, num_eval=1))[1]
    pairs = [tuple(policy.encode(tokenizer, r["prompt"], r[k], 64, 24) for k in ("chosen", "rejected"))
             for r in human]
    s_chosen, s_rejected = reward.score_pairs(model, pairs, tokenizer.pad_token_id, 2, "cpu", nullcontext())
    args = reward.Args(sample_batch_size=3)
    for side, ours in (("chosen", s_chosen), ("rejected", s_rejected)):
        theirs = reward.score_texts(model, tokenizer, [r["prompt"] for r in human], [r[side] for r in human],
                                    args, "cpu", nullcontext())
        assert ours.shape == (5,)
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-5)
    assert (s_chosen != s_rejected).all()  # so a swap of the two sides would show above


@torch.no_grad()
def test_a_new_head_scores_every_response_zero(tiny_rm):
    _, tokenizer, path = tiny_rm
    model = reward.load_reward_model(str(path), tokenizer, new_head=True).eval()
    batch = reward.pair_batch(toy_pairs(tokenizer, 2), tokenizer.pad_token_id)
    assert (reward.reward_scores(model, batch) == 0).all()


# ----------------------------------------------------------------------------------------------
# 2. the command lines


def test_train_command_line_saves_the_gold_rm_of_the_contract(tmp_path_factory):
    gold = pipeline_stage(tmp_path_factory, "gold_rm")
    assert not Path(f"{gold}.tmp").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "args.json"):
        assert (gold / name).is_file(), name
    metrics = json.loads((gold / "metrics.json").read_text())
    assert metrics["val_pairs"] == 20
    for key in ("val_accuracy", "val_true_accuracy", "human_label_true_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    log = read_jsonl(gold / "train_log.jsonl")
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((gold / "args.json").read_text())["mode"] == "train"


@torch.no_grad()
def test_gold_rm_reopens_with_auto_classes_and_scores_the_same(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    world, gold = pipeline_stage(tmp_path_factory, "world"), pipeline_stage(tmp_path_factory, "gold_rm")
    auto_model = AutoModelForSequenceClassification.from_pretrained(gold).eval()
    tokenizer = AutoTokenizer.from_pretrained(gold)
    assert auto_model.config.num_labels == 1 and auto_model.config.pad_token_id == tokenizer.pad_token_id
    rows = read_jsonl(world / "prefs_human.jsonl")[-6:]
    examples = [policy.encode(tokenizer, r["prompt"], r["chosen"], 64, 24) for r in rows]
    batch = policy.collate_grouped(examples, tokenizer.pad_token_id)
    ours = reward.reward_scores(reward.load_reward_model(str(gold), tokenizer).eval(), batch)
    torch.testing.assert_close(reward.reward_scores(auto_model, batch), ours, rtol=1e-5, atol=1e-5)
    full = policy.collate(examples, tokenizer.pad_token_id)
    torch.testing.assert_close(auto_model(input_ids=full["input_ids"],
                                          attention_mask=full["attention_mask"]).logits[:, 0],
                               ours, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0  # the head was trained away from zero


def test_label_command_line_writes_preference_rows_of_the_contract(tmp_path_factory):
    world, gold, prefs = (pipeline_stage(tmp_path_factory, name) for name in ("world", "gold_rm", "prefs"))
    assert not Path(f"{prefs}.tmp").exists()
    rows = read_jsonl(prefs / "train.jsonl")
    metrics = json.loads((prefs / "metrics.json").read_text())
    assert 1 <= len(rows) == metrics["pairs"] and metrics["pairs"] + sum(metrics["dropped"].values()) == 20
    sft_prompts = [r["prompt"] for r in read_jsonl(world / "sft.jsonl")]
    assert [r["prompt"] for r in rows] == [p for p in sft_prompts[:20] if p in {r["prompt"] for r in rows}]
    for r in rows:
        assert r["chosen_score"] >= r["rejected_score"] and r["chosen"] != r["rejected"]
        for side in ("chosen", "rejected"):
            assert math.isfinite(r[f"{side}_behaviour_logp"]) and r[f"{side}_behaviour_logp"] < 0
            assert r[f"{side}_true_score"] == toy_tldr.true_score(r["prompt"], r[side])
    # the scores are the gold model's: score_texts on the saved model gives them back
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gold)
    for r in rows:  # the sampled ids; the toy's word-level tokenizer gives them back from the text
        for side in ("chosen", "rejected"):
            assert policy.decode_response(tokenizer, r[f"{side}_ids"]) == (r[side], True)
            assert policy.encode(tokenizer, r["prompt"], r[side], 64, 24)[1] == r[f"{side}_ids"]
    model = reward.load_reward_model(str(gold), tokenizer)
    for side in ("chosen", "rejected"):
        scores = reward.score_texts(model, tokenizer, [r["prompt"] for r in rows], [r[side] for r in rows],
                                    reward.Args(), torch.device("cpu"), nullcontext())
        assert scores == pytest.approx([r[f"{side}_score"] for r in rows], abs=1e-4)


@pytest.mark.parametrize("case, words", [
    ("unknown mode", ["--mode", "'evaluate'"]),
    ("label without a gold model", ["no_such_gold_rm", "not found"]),
    ("negative batch size", ["--batch_size", "-1"]),
    ("missing data dir", ["no_such_world"]),
])
def test_command_line_bad_input_gives_one_clear_error(cli_runs, case, words):
    runs, tmp = cli_runs
    assert_clean_error(runs[case].result(timeout=600), tmp / case.replace(" ", "_"), *words)
