"""course/: the student copy from course/make_handout.py (tracked files only, no working version of an
exercise anywhere in it) fails every graded test with its exercise's NotImplementedError, the solution
passes them all, every wrong answer of course/wrong/ fails one, and every right answer of course/right/
passes all."""
import ast
import importlib.util
import os
import re
import subprocess
import sys
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
    out = tmp_path_factory.mktemp("course") / "handout"
    make_handout.make_handout(str(out))
    return out


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
    assert sorted(stripped) == sorted(exercise_files)
    for path in files:
        text = (handout / path).read_bytes()
        if path in stripped:
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


def test_markers_must_be_closed_and_inside_an_exercise():
    body = "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n"
    with pytest.raises(make_handout.HandoutError, match="not an exercise"):
        make_handout.strip_solutions("dpo.py", body)
    with pytest.raises(make_handout.HandoutError, match="never closed"):
        make_handout.strip_solutions("dpo.py", body.replace("def f", "def dpo_loss").rsplit("    #", 1)[0])
    text, found = make_handout.strip_solutions("dpo.py", body.replace("def f", "def dpo_loss"))
    assert found == {("dpo.py", "dpo_loss")}
    assert text == f"def dpo_loss():\n    {make_handout.placeholder(3)}\n"


def test_graded_tests_fail_on_the_handout_with_each_exercises_not_implemented(handout):
    report = handout / "graded.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "course/graded",
                           f"--junitxml={report}"], cwd=handout, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(handout)})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    cases = list(ElementTree.parse(report).getroot().iter("testcase"))
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
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert) and node.msg is None]
    assert not bare, f"asserts without a message: {bare}"


@pytest.mark.parametrize("right", rights.RIGHT, ids=[r.name for r in rights.RIGHT])
def test_every_right_answer_passes_every_graded_test(right, monkeypatch):
    put_in_place(right, monkeypatch)
    results = run_graded(right.exercise)
    failed = {name: e for name, e in results.items() if e is not None}
    assert results and not failed, f"{right.name} ({right.what}) fails graded tests: {failed}"
