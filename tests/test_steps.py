"""experiments/steps.py: how far, how straight and how evenly a run moved, against values worked out by hand
on runs whose checkpoints are made-up points of the plane; one error line without runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import steps  # noqa: E402

# the weights (a, b) at the checkpoints: steps (3, 4), (0, 2), (-6, 8) of lengths 5, 2, 10
POINTS = [(1.0, -1.0), (4.0, 3.0), (4.0, 5.0), (-2.0, 13.0)]


def make_run(root, name, grad_norms=(5, 5, 5, 5, 5, 5, 1, 2, 3), weights=False, scale=1.0):
    run = root / name
    for k, (a, b) in enumerate(POINTS):  # two tensors; steps 0 9 18 27: ckpt-9 sorts last as text
        (run / f"ckpt-{9 * k}").mkdir(parents=True)
        (run / f"ckpt-{9 * k}" / "config.json").write_text("{}")  # what evaluate.find_runs looks for
        save_file({"b.weight": torch.tensor([b * scale]), "a.weight": torch.tensor([a * scale])},
                  str(run / f"ckpt-{9 * k}" / "model.safetensors"))
    rows = [{"step": i + 1, "grad_norm": g, **({"ess": 8.0, "weight_mean": 0.25} if weights else {})}
            for i, g in enumerate(grad_norms)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    method, beta, seed = name.replace("_beta", "_seed").split("_seed")
    (run / "args.json").write_text(json.dumps({"run_name": name, "method": method, "beta": float(beta),
                                               "seed": int(seed), "total_steps": 30, "num_epochs": 4.0,
                                               "sft_path": "out/sft"}))
    return run


def as_run(path):
    return steps.evaluate.find_runs(str(path))[0]


def test_a_run_s_distances_and_angles_are_the_hand_worked_ones(tmp_path):
    got = steps.measure(as_run(make_run(tmp_path, "dpo_beta0.01_seed0")), kl=20.5)
    assert got["net"] == pytest.approx(math.sqrt(3 ** 2 + 14 ** 2))  # (1, -1) -> (-2, 13)
    assert got["path"] == pytest.approx(5 + 2 + 10)
    assert got["straight"] == pytest.approx(math.sqrt(205) / 17)
    assert got["cos"] == pytest.approx(0.8)  # (3,4).(0,2) = 8 = 0.8 x 5 x 2; (0,2).(-6,8) = 16 = 0.8 x 2 x 10
    assert got["late/early"] == pytest.approx(10 / 5)  # three steps: the last one against the first one
    assert got["grad_cv"] == pytest.approx(math.sqrt(2 / 3) / 2)  # the last third: 1, 2, 3
    assert got["KL/net"] == pytest.approx(20.5 / math.sqrt(205))
    assert math.isnan(got["ess"]) and math.isnan(got["w"])  # DPO logs no weights


def test_the_table_groups_seeds_and_reads_the_last_kl(tmp_path, capsys):
    for seed, scale in ((0, 1.0), (1, 2.0)):
        make_run(tmp_path / "runs", f"ais-dpo_beta0.01_seed{seed}", weights=True, scale=scale)
    rows = [{"run": f"ais-dpo_beta0.01_seed{s}", "step": step, "kl": kl}
            for s in (0, 1) for step, kl in ((30, 4.0 * math.sqrt(205)), (0, 0.0))]  # out of order
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps.main(["--runs", str(tmp_path / "runs" / "*"), "--results", str(tmp_path / "results.jsonl")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split(" | ")[:4] == ["| run", "seeds", "net", "path"] and len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["ais-dpo_beta0.01", "2"]
    # nets sqrt(205) and 2 sqrt(205)
    assert cells[2] == f"{1.5 * math.sqrt(205):.3g} ± {0.5 * math.sqrt(205):.2g}"
    assert cells[-3:] == ["8 ± 0", "0.25 ± 0", f"{(4 + 2) / 2:.3g} ± 1"]  # ess, w; KL/net 4 and 2


def test_no_runs_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "experiments/steps.py", "--runs", str(tmp_path / "*")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: --runs"), \
        result.stderr[-2000:]
