"""Tests for reward.py: the Bradley-Terry loss by hand, scores taken at the last real token, the two
command lines (gold RM, labelled pairs) against the contract, the gold RM reopened with the Auto
classes, and bad input.

The command lines are queued on the session's runner before the first test (see test_toy_tldr.py)."""
import json
import math
from contextlib import nullcontext

import pytest
import torch

import lm
import reward
import stage
import toy_tldr
from test_toy_tldr import (assert_clean_error, no_partial_copy, pipeline_stage, read_jsonl, start_pipeline,
                           submit_cases)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Queues the pipeline and this file's bad-input runs on the runner:
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
        "unknown label": ["--mode", "label", "--label", "maybe"],
        "negative batch size": ["--mode", "train", "--batch_size", -1],
        "missing data dir": ["--mode", "train"],
    }
    return submit_cases(tmp_path_factory, "reward.py", {k: [*base, *v] for k, v in cases.items()}, tmp), tmp


@pytest.mark.before_the_rest
def test_command_lines_start(cli_runs):
    """The command lines start before the session's other tests, and run while they do."""
    assert len(cli_runs[0]) == 5


# ----------------------------------------------------------------------------------------------
# 1. the loss and the scores


@pytest.mark.core
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
    lm.new_model(tokenizer, n_layer=1, n_embd=32, n_head=2, max_len=88).save_pretrained(path)
    model = reward.load_reward_model(str(path), tokenizer, new_head=True).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order one: the position they are read at shows
    return model, tokenizer, path


def toy_pairs(tokenizer, n):
    human = toy_tldr.make_world(toy_tldr.Args(num_sft=1, num_human_pairs=n, num_eval=1))[1]
    return list(zip(*(lm.encode(tokenizer, human, side, 64, 24) for side in ("chosen", "rejected"))))


def pair_batch(pairs, pad_id):
    """Every pair's prompt once, with its two responses: chosen, rejected, chosen, ... (reward.py's loop)."""
    return lm.collate_grouped([example for pair in pairs for example in pair], pad_id, k=2)


@pytest.mark.core
@torch.no_grad()
def test_reward_scores_read_the_last_real_token(tiny_rm):
    model, tokenizer, _ = tiny_rm
    pairs = toy_pairs(tokenizer, 3)
    batch = pair_batch(pairs, tokenizer.pad_token_id)  # one prompt, two responses of different lengths
    assert (batch["response_mask"] == 0).any()
    scores = reward.reward_scores(model, batch)
    assert scores.shape == (6,)
    rows = [example for pair in pairs for example in pair]  # pair_batch: chosen, rejected, chosen, ...
    alone = torch.cat([reward.reward_scores(model, lm.collate_grouped([row], tokenizer.pad_token_id))
                       for row in rows])
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)
    # independent: the model's own pooling on full right-padded sequences (with pad != EOS, as on the
    # toy, it finds the last non-pad token itself)
    full = lm.collate(rows, tokenizer.pad_token_id)
    torch.testing.assert_close(model(input_ids=full["input_ids"],
                                     attention_mask=full["attention_mask"]).logits.squeeze(-1),
                               scores, rtol=1e-5, atol=1e-5)
    # the check has teeth: the head read at the last position (padding for the shorter rows) differs
    hidden = model.base_model(input_ids=full["input_ids"],
                              attention_mask=full["attention_mask"]).last_hidden_state
    at_end = model.score(hidden[:, -1]).squeeze(-1)
    padded = full["attention_mask"][:, -1] == 0
    assert padded.any() and (at_end[padded] - scores[padded]).abs().min() > 1e-3


@pytest.mark.core
def test_pair_scores_equal_scoring_each_response_from_its_text(tiny_rm):
    """The RM's validation scores (score_examples, k=2: the prompt run once per pair, batches of 2 pairs)
    against every prompt + response on its own row, encoded from the texts (k=1, batches of 3), for chosen
    and rejected separately."""
    model, tokenizer, _ = tiny_rm
    human = toy_tldr.make_world(toy_tldr.Args(num_sft=1, num_human_pairs=5, num_eval=1))[1]
    pairs = toy_pairs(tokenizer, 5)
    scores = reward.score_examples(model, [ex for pair in pairs for ex in pair], tokenizer.pad_token_id, 2,
                                   "cpu", nullcontext(), k=2)
    s_chosen, s_rejected = torch.tensor(scores[0::2]), torch.tensor(scores[1::2])
    for side, ours in (("chosen", s_chosen), ("rejected", s_rejected)):
        rows = [{"prompt": r["prompt"], "text": r[side]} for r in human]
        examples = lm.encode(tokenizer, rows, "text", 64, 24)
        theirs = reward.score_examples(model, examples, tokenizer.pad_token_id, 3, "cpu", nullcontext())
        assert ours.shape == (5,)
        torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-5, atol=1e-5)
    assert (s_chosen != s_rejected).all()  # so a swap of the two sides would show above


@pytest.mark.core
@torch.no_grad()
def test_a_new_head_scores_every_response_zero(tiny_rm):
    _, tokenizer, path = tiny_rm
    model = reward.load_reward_model(str(path), tokenizer, new_head=True).eval()
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 32)
    batch = pair_batch(toy_pairs(tokenizer, 2), tokenizer.pad_token_id)
    assert (reward.reward_scores(model, batch) == 0).all()
    with pytest.raises(SystemExit, match="^error: .* is not a reward model"):  # pi_ref is no gold model
        reward.load_reward_model(str(path), tokenizer)


# ----------------------------------------------------------------------------------------------
# 2. the command lines


@pytest.mark.after_the_rest
def test_train_command_line_saves_the_gold_rm_of_the_contract(tmp_path_factory):
    gold = pipeline_stage(tmp_path_factory, "gold_rm")
    assert no_partial_copy(gold) and stage.read_marker(gold)["stage"] == "reward train"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "args.json"):
        assert (gold / name).is_file(), name
    metrics = json.loads((gold / "metrics.json").read_text())
    assert metrics["val_pairs"] == 20
    for key in ("val_accuracy", "val_true_accuracy", "human_label_true_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    log = read_jsonl(gold / "train_log.jsonl")
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((gold / "args.json").read_text())["mode"] == "train"


@pytest.mark.after_the_rest
@torch.no_grad()
def test_gold_rm_reopens_with_auto_classes_and_scores_the_same(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    world, gold = pipeline_stage(tmp_path_factory, "world"), pipeline_stage(tmp_path_factory, "gold_rm")
    auto_model = AutoModelForSequenceClassification.from_pretrained(gold).eval()
    tokenizer = AutoTokenizer.from_pretrained(gold)
    assert auto_model.config.num_labels == 1 and auto_model.config.pad_token_id == tokenizer.pad_token_id
    rows = read_jsonl(world / "prefs_human.jsonl")[-6:]
    examples = lm.encode(tokenizer, rows, "chosen", 64, 24)
    batch = lm.collate_grouped(examples, tokenizer.pad_token_id)
    ours = reward.reward_scores(reward.load_reward_model(str(gold), tokenizer).eval(), batch)
    torch.testing.assert_close(reward.reward_scores(auto_model, batch), ours, rtol=1e-5, atol=1e-5)
    full = lm.collate(examples, tokenizer.pad_token_id)
    torch.testing.assert_close(auto_model(input_ids=full["input_ids"],
                                          attention_mask=full["attention_mask"]).logits[:, 0],
                               ours, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0  # the head was trained away from zero


@pytest.mark.after_the_rest
def test_label_command_line_writes_preference_rows_of_the_contract(tmp_path_factory):
    world, gold, prefs = (pipeline_stage(tmp_path_factory, name) for name in ("world", "gold_rm", "prefs"))
    assert no_partial_copy(prefs) and stage.read_marker(prefs)["stage"] == "reward label"
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
    assert all("prompt_ids" not in r for r in rows)  # the toy's prompts are text only
    # the scores are the gold model's on the texts: scoring them again with the saved model gives them back
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gold)
    for r in rows:  # the sampled ids; the toy's word-level tokenizer gives them back from the text
        for side in ("chosen", "rejected"):
            assert lm.decode_response(tokenizer, r[f"{side}_ids"]) == (r[side], True)
            assert lm.encode(tokenizer, [{"prompt": r["prompt"], side: r[side]}], side, 64, 24)[0][1] == \
                r[f"{side}_ids"]
    model = reward.load_reward_model(str(gold), tokenizer)
    for side in ("chosen", "rejected"):
        examples = lm.encode(tokenizer, [{"prompt": r["prompt"], side: r[side]} for r in rows], side, 64, 24)
        scores = reward.score_examples(model, examples, tokenizer.pad_token_id, 256, torch.device("cpu"),
                                       nullcontext())
        assert scores == pytest.approx([r[f"{side}_score"] for r in rows], abs=1e-4)


@pytest.mark.after_the_rest
@pytest.mark.parametrize("case, words", [
    ("unknown mode", ["--mode", "'evaluate'"]),
    ("unknown label", ["--label", "'maybe'"]),
    ("label without a gold model", ["no_such_gold_rm", "not found"]),
    ("negative batch size", ["--batch_size", "-1"]),
    ("missing data dir", ["no_such_world"]),
])
def test_command_line_bad_input_gives_one_clear_error(cli_runs, case, words):
    runs, tmp = cli_runs
    assert_clean_error(runs[case].result(timeout=600), tmp / case.replace(" ", "_"), *words)
