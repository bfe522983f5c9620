"""
course/grade.py -- grade a class: every submission against the instructor's own graded tests.

    python course/grade.py SUBMISSIONS [--exercises 1,3] [--csv FILE] [--hidden DIR] [--jobs N] [--timeout S]

SUBMISSIONS holds one folder per student: a whole student copy, or only the files the student edited.
From each folder only the exercise files (EXERCISE_FILES: sft.py, reward.py, dpo.py, is_dpo.py,
evaluate.py, lm.py, toy_gaussian.py) are read, at the copy's paths or, failing that, anywhere in the folder
by name; a file missing from a submission stays the untouched stub. Each student's files go into a fresh
student copy of this repository (course/make_handout.py), whose course/graded/ is this repository's: a
student's own, possibly edited, graded tests are never run. --hidden DIR adds the test_exN_*.py files of DIR
(tests the students never saw, kept outside the repository) to the graded tests of exercise N. --exercises
grades those only (the ones due so far).

Prints a markdown table (a row per student, a column per exercise: pass, or FAIL with the first failing
check's message, and the points of POINTS the row earns: all of an exercise's points when all its tests
pass) and, with --csv FILE, writes one row per student and exercise. Each student runs in a subprocess
(about 12 s on a 2-core CPU, --timeout S at most); the students' code runs with your permissions.
"""
import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_handout  # noqa: E402

POINTS = {1: 2, 2: 1, 3: 3, 4: 3, 5: 3, 6: 4, 7: 4}  # exercise -> points; exercise 8 is graded by reading
EXERCISE_FILES = sorted({path for path, _ in [*make_handout.FUNCTIONS, *make_handout.ALSO_STUBBED]})
GRADED = os.path.join("course", "graded")
TEST_FILE = re.compile(r"test_ex(\d+)_\w*\.py$")


def submitted_files(folder):
    """{copy's path: the submission's file} for each exercise file the folder holds."""
    found = {}
    for path in EXERCISE_FILES:
        direct = os.path.join(folder, path)
        if os.path.isfile(direct):
            found[path] = direct
            continue
        by_name = sorted((p for p in _walk(folder) if os.path.basename(p) == os.path.basename(path)),
                         key=lambda p: (p.count(os.sep), p))
        if by_name:
            found[path] = by_name[0]
    return found


def _walk(folder):
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in make_handout.SKIPPED_DIRS and d != "course")
        yield from (os.path.join(top, f) for f in files)


def first_line(text, limit=160):
    line = next((s.strip() for s in (text or "").splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_report(path):
    """{exercise: (tests run, tests passed, first failure's message)} from pytest's junit XML."""
    results = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        where = f"{case.get('classname', '')}.{case.get('name', '')}"
        number = re.search(r"test_ex(\d+)_", where)
        if not number:
            continue
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        run, passed, message = results.get(int(number.group(1)), (0, 0, ""))
        if bad is not None and not message:
            message = f"{case.get('name')}: " + first_line(bad.get("message") or bad.text)
        results[int(number.group(1))] = (run + 1, passed + (bad is None and case.find("skipped") is None),
                                         message)
    return results


def grade_one(base, folder, work, exercises, hidden=None, timeout=600):
    """{exercise: (run, passed, message)} and the files taken, for one student's folder."""
    tree = os.path.join(work, "copy")
    shutil.copytree(base, tree, symlinks=True)
    taken = submitted_files(folder)
    for path, source in taken.items():
        shutil.copyfile(source, os.path.join(tree, path))
    for name in sorted(os.listdir(hidden)) if hidden else []:
        if TEST_FILE.match(name):
            shutil.copyfile(os.path.join(hidden, name), os.path.join(tree, GRADED, name))
    report = os.path.join(work, "report.xml")
    tests = sorted(os.path.join(GRADED, name) for name in os.listdir(os.path.join(tree, GRADED))
                   if TEST_FILE.match(name) and int(TEST_FILE.match(name).group(1)) in exercises)
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                               f"--junitxml={report}"], cwd=tree, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": tree})
    except subprocess.TimeoutExpired:
        return {n: (0, 0, f"timed out after {timeout} s") for n in exercises}, taken
    results = read_report(report) if os.path.isfile(report) else {}
    for number in exercises:
        if number not in results:
            why = first_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.stdout)
            results[number] = (0, 0, f"no graded test ran: {why or 'pytest wrote no report'}")
    return {n: results[n] for n in exercises}, taken


def grade(submissions, exercises=tuple(POINTS), hidden=None, jobs=1, timeout=600, root=make_handout.ROOT):
    """{student: ({exercise: (run, passed, message)}, [files taken])}, the students in name order."""
    students = sorted(d for d in os.listdir(submissions) if os.path.isdir(os.path.join(submissions, d))
                      and not d.startswith("."))
    with tempfile.TemporaryDirectory(prefix="grade_") as work:
        base = os.path.join(work, "base")
        make_handout.make_handout(base, root)

        def one(i_student):
            i, student = i_student
            os.makedirs(os.path.join(work, str(i)))
            results, taken = grade_one(base, os.path.join(submissions, student), os.path.join(work, str(i)),
                                       exercises, hidden, timeout)
            shutil.rmtree(os.path.join(work, str(i)), ignore_errors=True)
            return student, (results, sorted(taken))

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            return dict(pool.map(one, enumerate(students)))


def passed(result):
    return bool(result[0]) and result[0] == result[1]


def cell(result):
    run, done, message = result
    if passed(result):
        return f"pass ({done}/{run})"
    if "NotImplementedError: Exercise" in message:
        message = "not implemented (NotImplementedError)"
    return f"FAIL ({done}/{run}): {message}".replace("|", "\\|")


def markdown(graded):
    exercises = list(next(iter(graded.values()))[0])
    head = ["student", *(f"ex{n}" for n in exercises), f"points (of {sum(POINTS[n] for n in exercises)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for student, (results, _) in graded.items():
        total = sum(POINTS[n] for n, result in results.items() if passed(result))
        lines.append("| " + " | ".join([student, *(cell(results[n]) for n in exercises), str(total)]) + " |")
    return "\n".join(lines)


def write_csv(graded, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["student", "exercise", "result", "tests_passed", "tests_run", "points",
                      "first_failure", "files_submitted"])
        for student, (results, taken) in graded.items():
            for n, (run, done, message) in results.items():
                ok = passed((run, done, message))
                out.writerow([student, n, "pass" if ok else "fail", done, run, POINTS[n] if ok else 0,
                              "" if ok else message, " ".join(taken)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("submissions", help="a folder with one folder per student")
    parser.add_argument("--exercises", default=",".join(map(str, POINTS)),
                        help="the exercises to grade, comma-separated (default: all, 1-7)")
    parser.add_argument("--csv", help="also write one row per student and exercise to this file")
    parser.add_argument("--hidden", help="a folder of test_exN_*.py files the students never saw")
    parser.add_argument("--jobs", type=int, default=1, help="students graded at once (one process each)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds at most per student")
    args = parser.parse_args(argv)
    for path, what in ((args.submissions, "SUBMISSIONS"), (args.hidden, "--hidden")):
        if path is not None and not os.path.isdir(path):
            print(f"error: {what} {path} is not a folder", file=sys.stderr)
            return 2
    try:
        exercises = sorted({int(n) for n in args.exercises.split(",") if n.strip()})
    except ValueError:
        exercises = []
    if not exercises or not set(exercises) <= set(POINTS):
        print(f"error: --exercises {args.exercises}: give numbers among {sorted(POINTS)}", file=sys.stderr)
        return 2
    try:
        graded = grade(args.submissions, exercises, args.hidden, args.jobs, args.timeout)
    except make_handout.HandoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not graded:
        print(f"error: {args.submissions} holds no student folder", file=sys.stderr)
        return 1
    print(markdown(graded))
    if args.csv:
        write_csv(graded, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
