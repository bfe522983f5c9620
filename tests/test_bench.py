"""bench/: dpo_step.py at its tiny size on the CPU (both variants take a DPO step, agree on the loss, report
tokens/s and MFU by their formulas; its naive arm computes the fused arm's numbers); logps.py, tiny."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import dpo_step  # noqa: E402


def test_dpo_step_benchmark_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    args = dpo_step.parse_args(["--size", "tiny", "--precision", "fp32", "--pairs", "2", "--prompt_len", "12",
                                "--response_len", "5", "--steps", "2", "--warmup", "1", "--peak_tflops", "2",
                                "--json_out", str(out)])
    rows = dpo_step.main(args)
    assert [r["variant"] for r in rows] == ["fused", "naive"] and json.loads(out.read_text()) == rows
    tiny = dpo_step.SIZES["tiny"]
    h, v, f = tiny["hidden_size"], tiny["vocab_size"], tiny["intermediate_size"]
    n_layer = tiny["num_hidden_layers"]
    # a layer: 2 layer norms, fused QKV and output projections, the MLP; then the final norm, the output layer
    layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    assert rows[0]["matmul_params"] == n_layer * layer + 2 * h + v * h
    for r in rows:  # the output layer (v x h) is charged on the 2 x 2 x 5 response tokens only
        assert r["tokens"] == 2 * (12 + 2 * 5) and r["peak_gib"] is None and r["device"] == "cpu"
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        flops = 6 * ((n_layer * layer + 2 * h) * 2 * (12 + 2 * 5) + v * h * 2 * 2 * 5)
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / 2e12)
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], abs=1e-5)
    assert abs(rows[0]["first_loss"] - math.log(2)) > 1e-3  # the shifted reference makes the loss informative


def test_one_logit_chunk_default_for_every_stage_and_benchmark():
    """dpo.py's --logit_chunk default, 0: chunks of 128 MiB of float32 logits (chosen by measurement:
    bench/README.md), is lm.sequence_logps' own, the extras' (rloo.py, online_dpo.py; wpo.py runs dpo.py's
    flags) and the benchmarks'."""
    import inspect

    import dpo
    import lm
    import logps
    from extras import online_dpo, rloo

    default = dpo.Args.logit_chunk
    assert default == 0 and lm.ChunkedLogProbs.BYTES == 2 ** 27  # 0: a chunk of 128 MiB of float32 logits
    assert [lm.ChunkedLogProbs.tokens(0, v) for v in (204, 50304, 128256, 2 ** 26)] == [164482, 667, 261, 1]
    assert lm.ChunkedLogProbs.tokens(16, 50304) == 16  # a chunk given in tokens is kept
    assert inspect.signature(lm.sequence_logps).parameters["chunk"].default == default
    assert rloo.Args.logit_chunk == online_dpo.Args.logit_chunk == default
    assert dpo_step.parse_args([]).chunk == default and logps.parse_args([]).chunks == [default]


def test_dpo_step_benchmark_refuses_an_unknown_size():
    with pytest.raises(SystemExit):
        dpo_step.parse_args(["--size", "pythia-7b"])


def test_the_naive_arm_computes_the_fused_arms_numbers():
    """dpo_step's naive arm (lm.gather_logps_naive in lm.sequence_logps' place) against lm.sequence_logps."""
    import torch

    import lm

    args = dpo_step.parse_args(["--size", "tiny", "--pairs", "3", "--prompt_len", "7", "--response_len", "4"])
    model = dpo_step.build_model(args, torch.device("cpu")).double()
    batch = dpo_step.make_batch(args, model.config.vocab_size, torch.device("cpu"))
    fused, _ = lm.sequence_logps(model, batch, chunk=5)
    torch.testing.assert_close(dpo_step.naive_sequence_logps(model, batch), fused, atol=1e-10, rtol=0)


@pytest.fixture(scope="session")
def logps_run():
    """bench/logps.py at a tiny size, in processes of its own (the in-process agreement check, then one child
    process a variant): started before the other tests, checked after them."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = "--vocab 256 --batch 1 --length 16 --hidden 16 --chunks 8 --reps 1 --rounds 2 --threads 1".split()
    return subprocess.Popen([sys.executable, "bench/logps.py", *flags], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.before_the_rest
def test_logps_benchmark_starts_first(logps_run):
    assert logps_run.args[1] == "bench/logps.py"


@pytest.mark.after_the_rest
def test_logps_benchmark_runs_tiny(logps_run):
    stdout, stderr = logps_run.communicate(timeout=300)
    assert logps_run.returncode == 0, stderr[-2000:]
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("naive ", "ours "))]
    assert [r[:2] for r in rows] == [["naive", "-"], ["ours", "8"]]
    assert stdout.count("  round ") == 4 and rows[0][-2:] == ["1.00-1.00,", "1.00-1.00"]  # 2 rounds, in each
    import dpo  # a ratio to that round's naive row
    import lm

    tokens = lm.ChunkedLogProbs.tokens(dpo.Args.logit_chunk, 256)
    assert f"dpo.py's default --logit_chunk {dpo.Args.logit_chunk}: chunks of {tokens} tokens at V 256 " in \
        stdout
