"""experiments/ablations.py: every experiment runs at a tiny size, writes its table, figure and rows, and
each table row is the mean over seeds of the rows it summarises; knobs: DPO's endpoint is its loss's
minimiser, and a knob that removes the fall does so in the default world."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import ablations  # noqa: E402
import toy_categorical as tc  # noqa: E402

TINY = dict(max_len=12, num_qualities=5, ref_len=4.0, ref_sd=1.5, best_len=6.0, num_pairs=200, steps=8,
            num_checkpoints=3, seeds=[0, 1])


@pytest.mark.core
@pytest.mark.parametrize("name", [name for name in ablations.EXPERIMENTS if name not in ablations.TABLES])
def test_each_experiment_writes_rows_table_and_figure(tmp_path, name):
    args = dataclasses.replace(tc.Args(), **TINY)
    ablations.run(name, args, str(tmp_path))
    out = tmp_path / name
    assert (out / f"{name}.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    arms = ablations.by_arm(rows)
    expected = {"alpha": len(ablations.ALPHAS), "ipo": 2 * len(ablations.IPO_BETAS),
                "shift": 3 * len(ablations.SHIFTS), "rpo": len(ablations.RPO), "weights": 3,
                "controls": len(ablations.CONTROLS), "quality": len(ablations.QUALITY)}[name]
    assert len(arms) == expected and all(len(seeds) == 2 for seeds in arms.values())
    assert len(rows) == expected * 2 * 3
    table = (out / "summary.md").read_text().splitlines()
    paired = 2 + expected if name in ablations.PAIRED else 0  # blank, header, rule, every other arm
    assert len(table) == 2 + expected + paired
    arm, seeds = next(iter(arms.items()))  # the first row of the table, recomputed
    finals = np.array([run[-1]["win_rate"] for run in seeds.values()])
    peak = np.mean([max(r["win_rate"] for r in run) for run in seeds.values()])
    half = 12.706 * finals.std(ddof=1) / np.sqrt(2)  # Student t, 1 degree of freedom, 97.5%
    final = f"{finals.mean():.2f} [{finals.mean() - half:.2f}, {finals.mean() + half:.2f}]"
    assert table[2].startswith(f"| {arm} | 2 | {peak:.2f} | {final} |")


@pytest.mark.core
def test_shift_changes_the_data_and_behaviour_weights_use_it(tmp_path):
    args = dataclasses.replace(tc.Args(), **TINY)
    rows = ablations.shift(args)
    kls = sorted({r["data_kl"] for r in rows})
    assert kls[0] == pytest.approx(0.0, abs=1e-12) and len(kls) == len(ablations.SHIFTS) and kls[1] > 0
    # with no shift the data's policy is pi_ref: weighing against it changes nothing
    same = [r for r in rows if r["shift"] == 0 and r["method"] == "ais-dpo"]
    by_label = {}
    for r in same:
        by_label.setdefault(r["label"], []).append(r["win_rate"])
    a, b = by_label.values()
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_cli_help_and_bad_input():
    help_text = subprocess.run([sys.executable, "experiments/ablations.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "alpha" in help_text.stdout and "--seeds" in help_text.stdout
    bad = subprocess.run([sys.executable, "experiments/ablations.py", "beta"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.core
def test_shuffled_alpha_reuses_ais_exponents_on_other_pairs():
    """shufais: the batch's exponents are AIS's, permuted among the pairs by a fixed per-seed permutation."""
    args = dataclasses.replace(tc.Args(), **TINY)
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, args.world_seed, 0)
    base = world["log_ref"]
    # r_theta = 1 on every response: log w = 1/|y_w| + 1/|y_l|, the pair's exponents themselves
    ais, shuffled = (tc.pair_log_weights(base + 1.0, base, world, chosen, rejected, weight, 0.0, args,
                                         tc.shuffle_permutation(len(chosen), args.world_seed, 0))
                     for weight in ("adaptive", "shuffled"))
    np.testing.assert_allclose(np.sort(shuffled.numpy()), np.sort(ais.numpy()), rtol=1e-12)
    assert not np.allclose(shuffled.numpy(), ais.numpy())  # but not on the same pairs
    perm = tc.shuffle_permutation(len(chosen), args.world_seed, 0)
    np.testing.assert_allclose(shuffled.numpy(), ais.numpy()[perm.numpy()], rtol=1e-12)
    assert torch.equal(perm, tc.shuffle_permutation(len(chosen), args.world_seed, 0))  # fixed per seed
    assert not torch.equal(perm, tc.shuffle_permutation(len(chosen), args.world_seed, 1))


@pytest.mark.core
def test_quality_world_moves_the_drift_to_quality(tmp_path):
    """Same pi_ref; r peaks inside the quality range; DPO at beta 0.01 tilts along quality, not length."""
    args = dataclasses.replace(tc.Args(), **TINY)
    world, quality_world = tc.make_world(args), ablations.quality_world(args)
    assert torch.equal(world["log_ref"], quality_world["log_ref"])
    q = quality_world["phi"][:, 1]
    best_q = q[quality_world["reward"].argmax()]
    assert best_q < q.max()  # the best quality is not the highest
    rows = ablations.quality(args)
    dpo_final = [r for r in rows if r["method"] == "dpo" and r["step"] == args.steps]
    assert all(abs(r["theta_quality"]) > abs(r["theta_length"]) for r in dpo_final)


@pytest.mark.core
def test_knobs_writes_rows_tables_and_figure(tmp_path, monkeypatch):
    """Two knobs, the first also in one more world: four tables, each row the seeds' numbers it summarises."""
    monkeypatch.setattr(ablations, "KNOBS", [("default", {}), ("ref_sd 1", {"ref_sd": 1.0})])
    monkeypatch.setattr(ablations, "VIEW_KNOBS", ["default"])
    monkeypatch.setattr(ablations, "VIEW_WORLDS", 1)
    args = dataclasses.replace(tc.Args(), **TINY)
    ablations.run("knobs", args, str(tmp_path))
    out = tmp_path / "knobs"
    assert (out / "knobs.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = ablations.knob_runs(rows)
    expected = [("default", 0), ("ref_sd 1", 0), ("default", 1)]  # (knob, world)
    assert set(runs) == {(k, w, m) for k, w in expected for m in ablations.KNOB_METHODS}
    assert len(rows) == len(runs) * 2 * 3 and all(r["knob"] in r["arm"] for r in rows)
    tables = (out / "summary.md").read_text().split("\n\n")
    assert [len(t.strip().splitlines()) for t in tables] == [4, 4, 4, 3]
    dpo = runs[("default", 0, "dpo")]
    falls = [dpo[s]["peak"] - dpo[s]["final"] for s in (0, 1)]
    peak = np.mean([dpo[s]["peak"] for s in (0, 1)])
    assert tables[0].splitlines()[2].startswith(f"| default | {peak:.2f} | ")
    assert ablations.by_seed(falls) in tables[0].splitlines()[2]
    gain = [runs[("default", 0, "is-dpo")][s]["final"] - dpo[s]["final"] for s in (0, 1)]
    assert ablations.by_seed(gain) in tables[1].splitlines()[2]
    assert tables[2].splitlines()[3].startswith("| default | 1 | ")
    assert tables[3].splitlines()[2].startswith("| default | 4 | ")  # two worlds x two seeds


@pytest.mark.core
def test_knobs_endpoint_and_the_fall(monkeypatch):
    """The default world, seed 0: DPO's endpoint u / beta is its loss's minimiser; there it lands far past
    the optimum (win-rate near 0) and DPO falls; a narrower pi_ref (ref_sd 1.5) moves the endpoint back and
    DPO does not fall; a smaller learning rate leaves the endpoint where it was but stops DPO short of it."""
    knobs = [("default", {}), ("ref_sd 1.5", {"ref_sd": 1.5}), ("lr 0.005", {"lr": 0.005})]
    monkeypatch.setattr(ablations, "KNOBS", knobs)
    monkeypatch.setattr(ablations, "VIEW_KNOBS", [])
    monkeypatch.setattr(ablations, "KNOB_METHODS", ["dpo"])
    args = dataclasses.replace(tc.Args(), seeds=[0])
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, args.world_seed, 0)
    theta = ablations.dpo_endpoint(world, chosen, rejected, 0.01).requires_grad_()
    loss = tc.pair_losses(tc.policy_logps(theta, world), world, chosen, rejected, "dpo", 0.01, args).mean()
    loss.backward()
    assert theta.grad.abs().max() < 1e-8
    runs = ablations.knob_runs(ablations.knobs(args))
    default, narrow, slow = (runs[(label, 0, "dpo")][0] for label, _ in knobs)
    assert default["endpoint_win_rate"] < 0.05 and default["fall"] > 0.5
    assert narrow["endpoint_win_rate"] > 0.5 and narrow["fall"] < 0.05 < default["fall"]
    assert slow["endpoint_mean_length"] == default["endpoint_mean_length"] and slow["fall"] < 0.05
    assert slow["final_length"] < default["endpoint_mean_length"] - 10
