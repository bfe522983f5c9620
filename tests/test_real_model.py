"""Real checkpoints and data layouts, through stand-ins this file builds (no download): a tiny GPT-NeoX stored
by save_pretrained in float16 and in bfloat16, with a byte-level BPE tokenizer as Pythia ships one (one
special token, <|endoftext|>, no pad token) and a padded vocabulary (more logits than tokens, as Pythia's
50,304 for 50,277); and local snapshots of trl-lib/tldr (prompt, completion; train, validation, test) and
trl-lib/tldr-preference (prompt, chosen, rejected; train, validation), laid out as
huggingface_hub.snapshot_download leaves them, prepared by scale/prepare.py for the stages (how prepare reads
snapshots and globs is tests/test_prepare.py's).
"""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import dpo
import evaluate
import lm
import reward
import sft
import stage
import toy_tldr
from scale import prepare
from test_prepare import write_snapshot
from test_sampled_ids import build_bpe_tokenizer

PADDED, MAX_PROMPT, MAX_RESPONSE = 8, 96, 16
SPLITS = {"tldr": {"train": "sft.jsonl", "validation": "eval.jsonl", "test": "eval.jsonl"},
          "tldr-preference": {"train": "prefs_human.jsonl", "validation": "prefs_human.jsonl"}}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """The toy world's rows as the two TRL data sets, prepared (data/tldr: sft.jsonl, data/tldr-preference:
    train.jsonl), and pi_ref stored in float16, bfloat16, and float32 (the float16 weights, widened)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("real")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=40, num_eval=8))
    read = {name: lm.read_jsonl(root / "world" / name) for name in ("sft.jsonl", "eval.jsonl",
                                                                     "prefs_human.jsonl")}
    for rows in (read["sft.jsonl"], read["eval.jsonl"]):
        for r in rows:  # trl-lib/tldr's completions start with a space
            r["completion"] = " " + r.get("completion", r.get("reference", ""))
    write_snapshot(root / "tldr", {s: read[f] for s, f in SPLITS["tldr"].items()}, ("prompt", "completion"))
    write_snapshot(root / "tldr-preference", {s: read[f] for s, f in SPLITS["tldr-preference"].items()},
                   ("prompt", "chosen", "rejected"))
    tokenizer = build_bpe_tokenizer([r["prompt"] + r["completion"] for r in read["sft.jsonl"]], pythia=True)
    assert tokenizer.pad_token is None
    config = GPTNeoXConfig(vocab_size=len(tokenizer) + PADDED, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float16)):
        stored = copy.deepcopy(model).to(dtype)
        if name == "fp32":
            stored = stored.float()  # the float16 weights, exactly, stored as float32
        stored.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for kind, name in (("sft", "tldr"), ("prefs", "tldr-preference")):
        prepare.main(prepare.Args(kind=kind, data=str(root / name), tokenizer_path=str(root / "fp16"),
                                  max_prompt_len=MAX_PROMPT, truncate_prompts=True,
                                  out_dir=str(root / "data" / name)))
    return root


def test_weights_load_and_train_as_float32_whatever_the_dtype_stored(standins):
    from transformers import AutoModelForCausalLM

    for name, stored in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert AutoModelForCausalLM.from_pretrained(standins / name).dtype == stored  # transformers' "auto"
        for model in (lm.load_model(str(standins / name)),  # pi_ref, a checkpoint, sft.py's start
                      reward.load_reward_model(str(standins / name), new_head=True)):
            assert {p.dtype for p in model.parameters()} == {torch.float32}


def train_logs(standins, name, tmp_path, monkeypatch, precision="auto"):
    """sft.py on the prepared tldr snapshot, then dpo.py on the prepared tldr-preference snapshot, from the
    checkpoint `name`; every update checked to find float32 weights and gradients. Their train_log rows."""
    dtypes = set()
    step = stage.optimizer_step

    def checked_step(step_no, model, *rest):
        dtypes.update(t.dtype for p in model.parameters() for t in (p, p.grad) if t is not None)
        return step(step_no, model, *rest)

    monkeypatch.setattr(stage, "optimizer_step", checked_step)
    out = tmp_path / name
    common = dict(max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE, seed=0, precision=precision)
    sft.main(sft.Args(model_name_or_path=str(standins / name), tokenizer_path=str(standins / name),
                      data=str(standins / "data" / "tldr"), out_dir=str(out / "sft"), steps=4, batch_size=8,
                      val_size=10, lr=1e-3, warmup_steps=1, **common))
    dpo.train(dpo.Args(sft_path=str(out / "sft"), data=str(standins / "data" / "tldr-preference"),
                       runs_dir=str(out), run_name="dpo", batch_size=8, num_epochs=0.5, lr=1e-3,
                       warmup_steps=1, num_checkpoints=1, beta=0.1, **common))
    assert dtypes == {torch.float32}
    return [lm.read_jsonl(out / stage_name / "train_log.jsonl") for stage_name in ("sft", "dpo")]


def assert_logs_close(logs, other, rel, skip=()):
    for rows, other_rows in zip(logs, other):
        assert len(rows) == len(other_rows) >= 2
        for row, other_row in zip(rows, other_rows):
            assert row.keys() == other_row.keys()
            for key, value in row.items():
                assert key in skip or value == pytest.approx(other_row[key], rel=rel, abs=rel), key


def test_a_float16_checkpoint_trains_to_the_numbers_of_its_float32_copy(standins, tmp_path, monkeypatch):
    """The chain (sft.py, then dpo.py) from the float16-stored pi_ref: sft.py writes the float32 copy's train
    log, and saves pi_ref in float16 (its weights rounded), so dpo.py's log is the float32 chain's to
    float16's rounding; the bfloat16-stored one trains too, in float32."""
    fp32 = train_logs(standins, "fp32", tmp_path, monkeypatch)
    fp16 = train_logs(standins, "fp16", tmp_path, monkeypatch)
    assert_logs_close(fp16[:1], fp32[:1], rel=1e-6)
    assert_logs_close(fp16[1:], fp32[1:], rel=1e-2)
    assert lm.load_model(str(tmp_path / "fp16" / "sft")).stored_dtype == torch.float16
    bf16 = train_logs(standins, "bf16", tmp_path, monkeypatch)
    assert all(row["loss"] > 0 for rows in bf16 for row in rows)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_close_to_float32_with_float32_weights(standins, tmp_path, monkeypatch,
                                                                        precision):
    """--precision bf16 and fp16 (with torch's GradScaler) on the CPU: float32 weights, the float32 numbers
    to the precision's rounding. (Not the accuracy: pi_ref's log-probs are float32 under any precision, so
    near step 0 the sign of a margin of about 0 is the policy's rounding.)"""
    fp32 = train_logs(standins, "fp32", tmp_path / "fp32", monkeypatch, precision="fp32")
    assert_logs_close(train_logs(standins, "fp16", tmp_path, monkeypatch, precision), fp32, rel=0.05,
                      skip={"accuracy"})


def pulled_pi_ref(standins):
    """The float16 stand-in with a constant hidden channel (the final layer norm's first), which its output
    layer reads as a strong pull toward the padded ids and a weaker one toward EOS."""
    model = lm.load_model(str(standins / "fp16")).eval()
    tokenizer = lm.load_tokenizer(str(standins / "fp16"))
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = 0.0
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[len(tokenizer):, 0] = 6.0
        model.get_output_embeddings().weight[tokenizer.eos_token_id, 0] = 4.0
    return model, tokenizer


def test_padded_vocabulary_ids_are_never_sampled(standins):
    """Ids past the tokenizer (the output layer's padding) decode to nothing: banned_ids with the model bans
    them. Made likely here, they would be drawn otherwise."""
    model, tokenizer = pulled_pi_ref(standins)
    prompts = [tokenizer("TL;DR:")["input_ids"]] * 8
    banned = lm.banned_ids(tokenizer, model)
    assert banned == list(range(len(tokenizer), len(tokenizer) + PADDED))  # <|endoftext|> is EOS
    for suppress, padded_drawn in ((lm.banned_ids(tokenizer), True), (banned, False)):
        outs, _ = lm.sample(model, prompts, tokenizer.eos_token_id, tokenizer.eos_token_id, MAX_RESPONSE,
                            generator=torch.Generator().manual_seed(0), suppress_ids=suppress)
        assert any(t >= len(tokenizer) for o in outs for t in o) == padded_drawn


def test_the_label_stage_samples_no_padded_id_and_drops_unfinished_samples(standins, tmp_path):
    """reward.py --mode label --judge rm on the prepared tldr snapshot: no padded id in any pair, every kept
    response ended with EOS, the prepared prompt ids carried along, and the pairs with an unfinished sample
    were dropped before the gold RM scored any."""
    model, tokenizer = pulled_pi_ref(standins)
    gold = reward.load_reward_model(str(standins / "fp16"), tokenizer, new_head=True)
    torch.nn.init.normal_(gold.score.weight, generator=torch.Generator().manual_seed(0))
    for name, saved in (("pi_ref", model), ("gold", gold)):
        saved.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    reward.main(reward.Args(mode="label", judge="rm", sft_path=str(tmp_path / "pi_ref"),
                            gold_path=str(tmp_path / "gold"), data=str(standins / "data" / "tldr"),
                            out_dir=str(tmp_path / "prefs"), num_prompts=40, max_prompt_len=MAX_PROMPT,
                            max_response_len=MAX_RESPONSE, sample_batch_size=16))
    rows = lm.read_jsonl(tmp_path / "prefs" / "train.jsonl")
    metrics = json.load(open(tmp_path / "prefs" / "metrics.json"))
    assert rows and metrics["dropped"]["unfinished"] > 0
    prepared = lm.read_jsonl(standins / "data" / "tldr" / "sft.jsonl")
    prompt_ids = {r["prompt"]: r["prompt_ids"] for r in prepared}
    for row in rows:
        assert row["prompt_ids"] == prompt_ids[row["prompt"]]
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            assert ids[-1] == tokenizer.eos_token_id and max(ids) < len(tokenizer)


def test_the_gold_rm_scores_an_unfinished_sample_as_it_is_without_eos(standins, monkeypatch):
    """evaluate.py's gold scoring: a finished sample is scored with its EOS, an unfinished one as it is,
    without; the same numbers as reward.score_examples on those ids alone (to float rounding: another batch
    shape, another padding). evaluate.judge_samples passes each sample's finished flag."""
    tokenizer = lm.load_tokenizer(str(standins / "fp16"))
    gold = reward.load_reward_model(str(standins / "fp16"), tokenizer, new_head=True).eval()
    torch.nn.init.normal_(gold.score.weight, generator=torch.Generator().manual_seed(0))
    args = evaluate.Args(max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE, sample_batch_size=4)
    device, autocast = stage.device_and_autocast()
    setup = SimpleNamespace(tokenizer=tokenizer, gold=gold, device=device, autocast=autocast, toy=False)
    rows = [{"prompt": "TL;DR:", "sample": "my car broke"}] * 2 + [
        {"prompt": "TL;DR: a longer one", "sample": "my car broke down on the way"}]
    finished, unfinished, longer = evaluate.gold_scores(setup, args, rows, "sample", [True, False, True])
    (prompt, response), = lm.encode(tokenizer, rows[:1], "sample", MAX_PROMPT, MAX_RESPONSE)
    assert response[-1] == tokenizer.eos_token_id
    with_eos, without_eos = reward.score_examples(gold, [(prompt, response), (prompt, response[:-1])],
                                                  tokenizer.pad_token_id, 4, device, autocast)
    assert finished == pytest.approx(with_eos, rel=1e-4, abs=1e-5)
    assert unfinished == pytest.approx(without_eos, rel=1e-4, abs=1e-5)
    assert abs(with_eos - without_eos) > 1e-3  # EOS is read: the two differ
    alone = evaluate.gold_scores(setup, args, rows[2:], "sample", [True])
    assert alone == pytest.approx([longer], rel=1e-4, abs=1e-5)
    seen = {}

    def recorded(setup, args, rows, column, finished=None):
        seen["finished"] = finished
        return [0.0] * len(rows)

    monkeypatch.setattr(evaluate, "gold_scores", recorded)
    setup.rows, setup.ref_gold = [{"prompt": "p"}] * 2, [0.0, 0.0]
    evaluate.judge_samples(setup, args, [("a", True), ("b", False)])
    assert seen["finished"] == [True, False]
