"""course/: the student copy from course/make_handout.py, made in a fresh clone (tracked files only, no
working version of an exercise anywhere in it, the students' README) fails every graded test with its
exercise's NotImplementedError, the solution passes them all, every wrong answer of course/wrong/ fails one
with a message naming the check, every right answer of course/right/ passes all, and course/grade.py grades
a folder of submissions."""
import ast
import copy
import csv
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADED = ROOT / "course" / "graded"


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_handout = load(ROOT / "course" / "make_handout.py", "make_handout")
grade = load(ROOT / "course" / "grade.py", "grade")
answers = load(ROOT / "course" / "wrong" / "answers.py", "wrong_answers")
rights = load(ROOT / "course" / "right" / "answers.py", "right_answers")
GRADED_FILES = {int(re.match(r"test_ex(\d+)_", p.name).group(1)): p
                for p in sorted(GRADED.glob("test_ex*.py"))}


def run_graded(exercise):
    """{test name: the exception it raised, or None}, each test of the exercise's graded file called here."""
    module = load(GRADED_FILES[exercise], f"graded_ex{exercise}")
    results = {}
    for name, test in vars(module).items():
        if name.startswith("test_") and callable(test):
            try:
                test()
                results[name] = None
            except Exception as e:  # noqa: BLE001 -- a failing graded test is what we look for
                results[name] = e
    return results


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    """The student copy as an instructor makes it: `git clone`, then the clone's own make_handout.py. The
    clone holds the tracked files as the work tree has them (`git stash create` records their uncommitted
    changes as a commit and touches nothing; untracked files stay out, as in a clone)."""
    tmp = tmp_path_factory.mktemp("course")
    state = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip() or "HEAD"
    git(tmp, "clone", "-q", "--no-checkout", str(ROOT), "clone")
    git(tmp / "clone", "checkout", "-q", state)
    done = subprocess.run([sys.executable, "course/make_handout.py", str(tmp / "handout")], cwd=tmp / "clone",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tmp / "handout"


def test_every_exercise_with_code_has_graded_tests_and_a_place_in_exercises_md():
    coded = set(make_handout.FUNCTIONS.values())
    assert set(GRADED_FILES) == coded and coded < set(make_handout.TITLES)
    sheet = (ROOT / "EXERCISES.md").read_text()
    for number, title in make_handout.TITLES.items():
        assert f"## Exercise {number}: {title}\n" in sheet
    for number, path in GRADED_FILES.items():
        section = sheet.split(f"## Exercise {number}:")[1].split("\n## ")[0]
        assert f"python -m pytest -q course/graded/{path.name}" in section
    assert {w.exercise for w in answers.WRONG} == coded and len(answers.WRONG) >= 12
    assert {r.exercise for r in rights.RIGHT} == coded


def test_handout_strips_every_solution_and_copies_the_rest(handout):
    stripped, files = make_handout.handout_files()
    exercise_files = {path for path, _ in [*make_handout.FUNCTIONS, *make_handout.ALSO_STUBBED]}
    assert sorted(stripped) == sorted(exercise_files | {"README.md"})
    for path in files:
        text = (handout / path).read_bytes()
        if path == "README.md":
            assert text.decode() == make_handout.student_readme((ROOT / path).read_text())
        elif path in stripped:
            assert b"SOLUTION" not in text and b"NotImplementedError(\"Exercise" in text
            written = set(text.decode().splitlines()) - set((ROOT / path).read_text().splitlines())
            assert written and max(map(len, written)) <= 110  # the raise lines fit
        else:
            assert text == (ROOT / path).read_bytes(), path
    for path in make_handout.NOT_IN_HANDOUT:
        assert not (handout / path).exists(), path
    assert not (handout / "tests").exists() and not (handout / "bench").exists()
    assert os.access(handout / "run.sh", os.X_OK) and not (handout / "out").exists()


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_handout_copies_only_files_git_tracks(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    for name in ("tracked.py", "sub/tracked.md", "untracked.py", "sub/untracked.txt", "ignored.log"):
        (repo / name).write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "init", "-q")
    git(repo, "add", "tracked.py", "sub/tracked.md", ".gitignore")
    assert make_handout.repository_files(str(repo)) == [".gitignore", "sub/tracked.md", "tracked.py"]
    (repo / "tracked.py").unlink()  # deleted in the work tree: nothing to copy
    assert make_handout.repository_files(str(repo)) == [".gitignore", "sub/tracked.md"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(make_handout.HandoutError, match="not a git work tree"):
        make_handout.repository_files(str(tmp_path / "plain"))


def specific(text):
    """A line of code long enough to be specific: not a comment, nor a block's header (`with ...:`)."""
    return len(text) >= 25 and not text.startswith("#") and not text.endswith(":")


def solution_lines(path, source):
    """The specific lines of every marked region of source, and of the bodies of path's ALSO_STUBBED
    functions."""
    lines, inside = [], False
    for line in source.splitlines():
        text = line.strip()
        inside = (inside or text == make_handout.BEGIN) and text != make_handout.END
        if inside and specific(text):
            lines.append(text)
    stubbed, _ = make_handout.stub_bodies(path, source)
    kept = set(stubbed.splitlines())
    return lines + [line.strip() for line in source.splitlines()
                    if line not in kept and specific(line.strip())]


def test_handout_holds_no_working_version_of_an_exercise(handout):
    """No line of a solution, or of a body ALSO_STUBBED, is anywhere in the copy (a test's reference, a
    bench's copy of the backward loop), and the stubbed functions raise their exercise's
    NotImplementedError."""
    answers_lines = {}
    for path in sorted({p for p, _ in [*make_handout.FUNCTIONS, *make_handout.ALSO_STUBBED]}):
        for line in solution_lines(path, (ROOT / path).read_text()):
            answers_lines.setdefault(line, path)
    assert len(answers_lines) >= 20
    for copied in sorted(p for p in handout.rglob("*") if p.is_file()):
        try:
            text = copied.read_text()
        except UnicodeDecodeError:
            continue
        found = [line for line in answers_lines if line in text]
        where = copied.relative_to(handout)
        assert not found, f"{where} holds solution code of {answers_lines[found[0]]}: {found[0]!r}"
    for (path, name), number in make_handout.ALSO_STUBBED.items():
        source = (handout / path).read_text()
        body = source.split(f"def {name.split('.')[-1]}(")[1].split("\ndef ")[0]
        assert make_handout.placeholder(number) in body, (path, name)


def test_handout_refuses_a_non_empty_or_inner_out_dir(handout, capsys):
    assert make_handout.main([str(handout)]) == 1
    assert make_handout.main([str(ROOT / "out" / "handout")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "not an empty directory" in err[0] and "inside the repository" in err[1]
    assert make_handout.main(["--help"]) == 0 and "OUT_DIR" in capsys.readouterr().out
    assert make_handout.main([]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: give one OUT_DIR"


def test_markers_must_be_closed_and_inside_an_exercise():
    body = "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n"
    with pytest.raises(make_handout.HandoutError, match="not an exercise"):
        make_handout.strip_solutions("dpo.py", body)
    with pytest.raises(make_handout.HandoutError, match="never closed"):
        make_handout.strip_solutions("dpo.py", body.replace("def f", "def dpo_loss").rsplit("    #", 1)[0])
    text, found = make_handout.strip_solutions("dpo.py", body.replace("def f", "def dpo_loss"))
    assert found == {("dpo.py", "dpo_loss")}
    assert text == f"def dpo_loss():\n    {make_handout.placeholder(3)}\n"


def test_graded_tests_fail_on_the_handout_with_each_exercises_not_implemented(handout, tmp_path):
    """The copy's graded tests, run as course/grade.py runs them for a student who handed in nothing (an
    empty folder), fail only with their exercise's NotImplementedError, and the grader's table says so."""
    (tmp_path / "nothing").mkdir()
    results, taken = grade.grade_one(str(handout), str(tmp_path / "nothing"), str(tmp_path),
                                     list(grade.POINTS))
    assert taken == {} and set(results) == set(GRADED_FILES) == set(grade.POINTS)
    for number, (run, passed, message) in results.items():
        assert run >= 2 and passed == 0 and f"NotImplementedError: Exercise {number}: " in message, message
    assert grade.cell(results[1]).startswith("FAIL (0/") and "not implemented" in grade.cell(results[1])
    cases = list(ElementTree.parse(tmp_path / "report.xml").getroot().iter("testcase"))
    by_exercise = {}
    for case in cases:
        number = int(re.search(r"test_ex(\d+)_", case.get("classname")).group(1))
        failure = case.find("failure")
        assert failure is not None, f"{case.get('classname')}.{case.get('name')} passed on the handout"
        message = failure.get("message", "") + (failure.text or "")
        assert "NotImplementedError" in message and f"Exercise {number}: " in message, message[-500:]
        by_exercise[number] = by_exercise.get(number, 0) + 1
    assert set(by_exercise) == set(GRADED_FILES)


@pytest.mark.parametrize("exercise", sorted(GRADED_FILES))
def test_the_solution_passes_every_graded_test(exercise):
    results = run_graded(exercise)
    assert results and all(e is None for e in results.values()), results


def put_in_place(answer, monkeypatch):
    """The answer's function in place of the attribute it replaces (a static method on a class)."""
    module_name, *owner, attr = answer.target.split(".")
    target = sys.modules[module_name] if module_name in sys.modules else __import__(module_name)
    for name in owner:
        target = getattr(target, name)
    monkeypatch.setattr(target, attr, staticmethod(answer.function) if owner else answer.function)


@pytest.mark.parametrize("wrong", answers.WRONG, ids=[w.name for w in answers.WRONG])
def test_every_wrong_answer_fails_a_graded_test(wrong, monkeypatch):
    put_in_place(wrong, monkeypatch)
    results = run_graded(wrong.exercise)
    caught = [name for name, e in results.items() if isinstance(e, AssertionError)]
    assert caught, f"{wrong.name} ({wrong.what}) passes every graded test of exercise {wrong.exercise}"
    bare = [name for name in caught if not str(results[name]).strip()]
    assert not bare, f"{wrong.name}: {bare} fail with a bare AssertionError, naming no check"


def test_every_graded_assert_names_its_check():
    """A failing value says which check failed (EXERCISES.md): no graded assert without a message."""
    bare = [f"{path.name}:{node.lineno}" for path in GRADED_FILES.values()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Assert) and node.msg is None]
    assert not bare, f"asserts without a message: {bare}"


@pytest.mark.parametrize("right", rights.RIGHT, ids=[r.name for r in rights.RIGHT])
def test_every_right_answer_passes_every_graded_test(right, monkeypatch):
    put_in_place(right, monkeypatch)
    results = run_graded(right.exercise)
    failed = {name: e for name, e in results.items() if e is not None}
    assert results and not failed, f"{right.name} ({right.what}) fails graded tests: {failed}"


def test_the_copys_readme_is_the_students(handout):
    """No instructors' page, nothing the copy lacks (tests/, bench/), every link resolves in the copy, and the
    one test command of the set-up block runs the graded tests; EXERCISES.md's links resolve too."""
    readme = (handout / "README.md").read_text()
    assert readme != (ROOT / "README.md").read_text() and "EXERCISES.md" in readme
    absent = [p for p in make_handout.NOT_IN_HANDOUT if p in readme] + re.findall(r"-m tests\b", readme)
    assert not absent, f"the students' README names what their copy lacks: {absent}"
    assert "instructor" not in readme.lower()
    for name in ("README.md", "EXERCISES.md"):
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (handout / name).read_text())
        assert all((handout / link).exists() for link in links) and (links or name != "README.md"), links
    commands = re.findall(r"```bash\n(.*?)```", readme, re.S)[0].splitlines()
    tests = [line for line in commands if "pytest" in line]
    assert [line.split("#")[0].split() for line in tests] == [["python", "-m", "pytest", "-q",
                                                               "course/graded"]]
    written = set(readme.splitlines()) - set((ROOT / "README.md").read_text().splitlines())
    assert max(map(len, written)) <= 110


def submission_folders(root):
    """Two students: one with every solution file, one with a wrong Bradley-Terry loss (the margin's sign
    flipped) inside a copy of their own, whose graded tests they edited (the untouched stub, a student who
    hands in nothing, is graded on every exercise in the test above)."""
    (root / "ada").mkdir(parents=True)
    for path in grade.EXERCISE_FILES:
        (root / "ada" / path).write_text((ROOT / path).read_text())
    wrong = (root / "bob" / "mycopy")
    (wrong / "course" / "graded").mkdir(parents=True)
    solution = (ROOT / "reward.py").read_text()
    sign = "r_chosen - r_rejected"
    assert solution.count(sign) == 1
    (wrong / "reward.py").write_text(solution.replace(sign, "r_rejected - r_chosen"))
    (wrong / "course" / "graded" / "test_ex2_bradley_terry.py").write_text("def test_nothing():\n    pass\n")


def test_grade_a_folder_of_submissions(tmp_path):
    submission_folders(tmp_path / "in")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "test_ex2_hidden.py").write_text(
        "import reward, torch\n\n\ndef test_zero_margin():\n"
        "    loss = reward.bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item()\n"
        "    assert abs(loss - 0.6931) < 1e-3, 'a zero margin costs ln 2'\n")
    assert grade.main([str(tmp_path / "in"), "--exercises", "2", "--jobs", "2", "--csv",
                       str(tmp_path / "g.csv"), "--hidden", str(tmp_path / "hidden")]) == 0
    rows = {r["student"]: r for r in csv.DictReader(open(tmp_path / "g.csv"))}
    assert sorted(rows) == ["ada", "bob"] and all(r["exercise"] == "2" for r in rows.values())
    assert [rows["ada"][k] for k in ("result", "tests_passed", "tests_run")] == ["pass", "5", "5"]
    assert rows["ada"]["points"] == str(grade.POINTS[2]) and rows["ada"]["first_failure"] == ""
    bob = rows["bob"]
    assert bob["result"] == "fail" and bob["files_submitted"] == "reward.py" and bob["points"] == "0"
    assert bob["first_failure"].startswith("test_value_is_the_mean_over_pairs: AssertionError: "
                                           "bradley_terry_loss, scores seed 0: ")
    assert grade.main([str(tmp_path / "in"), "--exercises", "9"]) == 2


def exercise_calls():
    """{(file, function): (args, kwargs)}: one call of each exercise function on the graded tests' kind of
    inputs, built the same in the student copy and here (the backward of exercise 6 is left out: its check
    is the memory bound)."""
    import numpy as np
    import torch

    import is_dpo
    import lm
    from course.graded import graded_common as common

    g = torch.Generator().manual_seed(0)
    pi_w, pi_l, ref_w, ref_l = (-30 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    len_w, len_l = (torch.randint(1, 25, (8,), generator=g).double() for _ in range(2))
    model, rows = common.tiny_model(0), common.examples(6, seed=1)
    logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": ref_w, "ref_l": ref_l, "len_w": len_w, "len_l": len_l}
    rng = np.random.default_rng(0)
    return {("sft.py", "completion_loss"): (model, lm.collate(rows, common.PAD)),
            ("lm.py", "sequence_logps_plain"): (model, lm.collate(rows, common.PAD)),
            ("reward.py", "bradley_terry_loss"): (pi_w, pi_l),
            ("dpo.py", "dpo_loss"): (pi_w, pi_l, ref_w, ref_l, 0.1),
            ("dpo.py", "ipo_loss"): (pi_w, pi_l, ref_w, ref_l, len_w, len_l, 0.1),
            ("dpo.py", "rdpo_loss"): (pi_w, pi_l, ref_w, ref_l, len_w, len_l, 0.1, 0.05),
            ("is_dpo.py", "log_importance_weights"): ("adaptive", pi_w - ref_w, pi_l - ref_l, len_w, len_l,
                                                      0.0, 2.0),
            ("is_dpo.py", "importance_weights"): (is_dpo.Args(weight="adaptive"), logps, [{}] * 8),
            ("evaluate.py", "sequence_kl"): (model, common.tiny_model(1), rows, common.PAD),
            ("toy_gaussian.py", "pair_losses"): (0.3, rng.normal(0, 0.6, 8), rng.normal(0, 0.6, 8)),
            ("toy_gaussian.py", "exact_moments"): (np.log([0.5, 0.3, 0.2]) + np.log(3), 0.5, 4)}


def flat(value):
    """The numbers of a returned value (tensors, arrays, numbers, tuples, dicts), in order; None for none."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().double().reshape(-1).tolist()
    if isinstance(value, (np.ndarray, np.generic, int, float)) and not isinstance(value, bool):
        return np.asarray(value, dtype=float).reshape(-1).tolist()
    if isinstance(value, (tuple, list, dict)):
        parts = [flat(v) for v in (value.values() if isinstance(value, dict) else value)]
        return None if any(p is None for p in parts) else sum(parts, [])
    return None


def same_signature_outputs(modules, leading=()):
    """{"file:function" of each exercise: [(module.function, numbers)]}: every public function of the modules
    that accepts the exercise's call (its own parameters, no *args; not a stage's decorated main), called on a
    copy of its inputs; in the modules named in leading (the graded tests' own), also every function that
    accepts the call's first k arguments, k >= 1 (a helper that leaves out pad_id or a default)."""
    calls, found = exercise_calls(), {}
    for module in modules:
        for name, function in sorted(vars(module).items()):
            if name.startswith("_") or name == "main" or hasattr(function, "__wrapped__") \
                    or not inspect.isfunction(function) or function.__module__ != module.__name__:
                continue
            try:
                parameters = inspect.signature(function).parameters.values()
            except (TypeError, ValueError):
                continue
            if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
                continue
            for (path, exercise), args in calls.items():
                for k in range(len(args), 0 if module.__name__ in leading else len(args) - 1, -1):
                    try:
                        inspect.signature(function).bind(*args[:k])
                        with warnings.catch_warnings():  # e.g. os.stat of a tensor: a refusal, not news
                            warnings.simplefilter("ignore")
                            numbers = flat(function(*copy.deepcopy(args[:k])))
                    except (Exception, SystemExit):  # noqa: BLE001 -- refusing these inputs computes nothing
                        continue
                    if numbers:
                        found.setdefault(f"{path}:{exercise}", []).append(
                            (f"{module.__name__}.{name}", numbers))
    return found


PROBE = """
import importlib, json, pathlib, sys, warnings
warnings.simplefilter("ignore")
root = pathlib.Path(sys.argv[1])
names = sorted({p.stem for p in root.glob("*.py")}
               | {f"{d}.{p.stem}" for d in ("scale", "extras") for p in (root / d).glob("*.py")
                  if p.stem != "__init__"})
graded = sorted(f"course.graded.{p.stem}" for p in (root / "course" / "graded").glob("*.py")
                if p.stem.startswith(("test_", "graded_")))
names += graded
modules = []
for name in names:
    try:
        modules.append(importlib.import_module(name))
    except Exception as e:
        print("cannot import", name, e, file=sys.stderr)
json.dump({"modules": names, "found": same_signature_outputs(modules, leading=graded)}, sys.stdout)
"""


def matches(found, expected):
    """[(exercise, candidate)] whose numbers are the solution's."""
    import numpy as np

    return [(key, name) for key, outputs in found.items() for name, numbers in outputs
            if len(numbers) == len(expected[key])
            and np.allclose(numbers, expected[key], rtol=1e-6, atol=1e-9)]


def expected_values():
    """{"file:function" of each exercise: the solution's numbers on its call}."""
    return {f"{path}:{name}": flat(getattr(load_module(path), name)(*args))
            for (path, name), args in exercise_calls().items()}


@pytest.fixture(scope="module")
def probed(handout, tmp_path_factory):
    """(the probe's {"modules", "found"}, the solution's numbers): every public function of the copy's modules
    (scripts, scale/, extras/, and the graded tests with their leading arguments too) called on the exercises'
    calls, offline, in an empty directory."""
    source = "\n".join(inspect.getsource(f) for f in (exercise_calls, flat, same_signature_outputs))
    offline = {name: "1" for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", "import copy, inspect\n" + source + PROBE, str(handout)],
                          cwd=tmp_path_factory.mktemp("probe"), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **offline, "PYTHONPATH": str(handout), "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot import" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout), expected_values()


def test_no_function_of_the_copy_computes_an_exercises_values(probed):
    """Every public function of the copy's modules (scripts, scale/, extras/) that takes an exercise's call is
    called on its inputs: none returns the solution's values (the exercises' own functions raise)."""
    result, expected = probed
    import dpo
    import reward
    assert ("dpo.py:dpo_loss", "dpo.dpo_loss") in matches(same_signature_outputs([dpo, reward]), expected)
    assert {"dpo", "lm", "sft", "stage", "extras.wpo", "scale.data"} <= set(result["modules"])
    assert sum(map(len, result["found"].values())) >= 3  # the probe called functions that returned numbers
    given_away = [(key, name) for key, name in matches(result["found"], expected)
                  if not name.startswith("course.graded.")]
    assert not given_away, f"functions of the student copy compute an exercise's values: {given_away}"


def test_no_helper_of_the_copys_graded_tests_computes_an_exercises_values(probed):
    """The graded tests check values and properties, not a copy of the solution: no function of the copy's
    course/graded/ (graded_common, test_ex*) returns an exercise's values on its call, or on the call's first
    arguments (a reference that leaves out pad_id, say)."""
    result, expected = probed
    import types

    import evaluate
    from course.graded import graded_common as common

    helpers = types.ModuleType("helpers")

    def kl(model, ref, rows):
        return evaluate.sequence_kl(model, ref, rows, common.PAD)

    kl.__module__, helpers.kl = "helpers", kl
    assert not matches(same_signature_outputs([helpers]), expected)  # 3 of sequence_kl's 4 arguments
    assert matches(same_signature_outputs([helpers], leading=["helpers"]), expected) == [
        ("evaluate.py:sequence_kl", "helpers.kl")]
    graded = {name for name in result["modules"] if name.startswith("course.graded.")}
    tests = {f"course.graded.{p.stem}" for p in GRADED_FILES.values()}
    assert graded == tests | {"course.graded.graded_common"}, graded
    given_away = [(key, name) for key, name in matches(result["found"], expected)
                  if name.rsplit(".", 1)[0] in graded]
    assert not given_away, f"functions of the copy's graded tests compute an exercise's values: {given_away}"


def load_module(path):
    return __import__(path[:-3])
