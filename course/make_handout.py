"""
course/make_handout.py -- the student copy of the repository: every exercise's solution replaced by
raise NotImplementedError("Exercise N: <title>, see EXERCISES.md").

    python course/make_handout.py OUT_DIR

Copies the files git tracks (`git ls-files`: never an untracked file, nor out/ or __pycache__) to OUT_DIR,
which must be new or empty and outside the repository. In every .py file, the lines from a `# BEGIN SOLUTION`
comment to the next `# END SOLUTION` become one `raise` at the marker's indentation; everything else is
copied as it is, so the copy imports and runs, and each exercise's graded tests (course/graded/) fail with
its NotImplementedError until the student writes the body.

The copy holds no working version of an exercise elsewhere: the instructor's files and the code that
contains or checks the reference answers (NOT_IN_HANDOUT: tests/, bench/, CI) stay out, and the body of each
function of ALSO_STUBBED (code that would make an exercise a one-liner) becomes its exercise's `raise` too.

The copy's README.md is the students' (student_readme): no instructors' page, no `tests/` or `bench/`, and
the test command of its set-up block runs the graded tests, the copy's only ones.

The numbering is the table below, shared with EXERCISES.md ("## Exercise N: <title>"): every marked region
must lie in a function of FUNCTIONS, and every function of FUNCTIONS must hold one (tests/test_course.py).
"""
import ast
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TITLES = {  # exercise number -> title, as in EXERCISES.md's headings
    1: "the SFT completion loss",
    2: "the Bradley-Terry loss",
    3: "the DPO and IPO losses",
    4: "the importance weights",
    5: "the full-distribution KL",
    6: "the chunked log-prob backward (advanced)",
    7: "the analytic Gaussian toys",
    8: "over-optimisation, measured",
}
FUNCTIONS = {  # (file, function's qualified name) -> exercise number; exercise 8 is an experiment, no code
    ("sft.py", "completion_loss"): 1,
    ("reward.py", "bradley_terry_loss"): 2,
    ("dpo.py", "dpo_loss"): 3,
    ("dpo.py", "ipo_loss"): 3,
    ("is_dpo.py", "log_importance_weights"): 4,
    ("is_dpo.py", "importance_weights"): 4,
    ("evaluate.py", "sequence_kl"): 5,
    ("lm.py", "ChunkedLogProbs.backward"): 6,
    ("toy_gaussian.py", "pair_losses"): 7,
    ("toy_gaussian.py", "exact_moments"): 7,
}
ALSO_STUBBED = {  # (file, function) -> exercise: whole bodies (after the docstring) that would give it away
    ("lm.py", "sequence_logps_plain"): 1,  # log pi(y|x) by the definition: exercise 1 would be one line
    ("dpo.py", "rdpo_loss"): 3,  # R-DPO at alpha = 0 is DPO
}
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
SKIPPED_DIRS = ("out", ".git", "__pycache__", ".pytest_cache")
INSTRUCTOR_ONLY = ("course/make_handout.py", "course/grade.py", "course/wrong/", "course/right/",
                   "tests/test_course.py", "docs/instructors.md")
NOT_IN_HANDOUT = INSTRUCTOR_ONLY + ("tests/", "bench/", ".ci/")  # tests/ and bench/ hold reference answers


class HandoutError(Exception):
    pass


def placeholder(number):
    return f'raise NotImplementedError("Exercise {number}: {TITLES[number]}, see EXERCISES.md")'


def repository_files(root=ROOT):
    """The files git tracks under root, relative to it, without the skipped directories and the files that
    stay out of the copy (NOT_IN_HANDOUT). An untracked file is never copied: root must be a git work tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=root, capture_output=True,
                                check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        raise HandoutError(f"{root} is not a git work tree (git ls-files: {e}): the copy holds tracked "
                           "files only")
    keep = []
    for path in sorted(set(filter(None, listed))):
        parts = path.split("/")
        if any(p in SKIPPED_DIRS or p.startswith("out_") for p in parts[:-1]):
            continue
        if any(path == x or (x.endswith("/") and path.startswith(x)) for x in NOT_IN_HANDOUT):
            continue
        if os.path.isfile(os.path.join(root, path)):  # a tracked file deleted in the work tree is left out
            keep.append(path)
    return keep


def functions_by_line(source):
    """[(first line, last line, qualified name)] of every function in source, the innermost last."""
    spans = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return sorted(spans, key=lambda s: (s[0], -s[1]))


def strip_solutions(path, source):
    """(source with every marked region replaced by its exercise's raise, the exercise functions found)."""
    lines, out, found, start = source.splitlines(keepends=True), [], set(), None
    spans = functions_by_line(source)
    for i, line in enumerate(lines, 1):
        text = line.strip()
        if text == BEGIN:
            if start is not None:
                raise HandoutError(f"{path}:{i}: {BEGIN} inside the region opened at line {start}")
            start, indent = i, line[:len(line) - len(line.lstrip())]
        elif text == END:
            if start is None:
                raise HandoutError(f"{path}:{i}: {END} without a {BEGIN}")
            names = [name for first, last, name in spans if first < start <= last]
            key = (path, names[-1] if names else "<module>")
            if key not in FUNCTIONS:
                raise HandoutError(f"{path}:{start}: a marked region in {key[1]}, which is not an exercise "
                                   "(course/make_handout.py, FUNCTIONS)")
            found.add(key)
            out.append(f"{indent}{placeholder(FUNCTIONS[key])}\n")
            start = None
        elif start is None:
            out.append(line)
    if start is not None:
        raise HandoutError(f"{path}:{start}: {BEGIN} never closed")
    handout = "".join(out)
    compile(handout, path, "exec")  # the student copy must still import
    return handout, found


def stub_bodies(path, source):
    """(source with the body of each function of ALSO_STUBBED in path, after its docstring, replaced by its
    exercise's raise; the functions stubbed)."""
    wanted = {name: number for (p, name), number in ALSO_STUBBED.items() if p == path}
    lines, done = source.splitlines(keepends=True), set()
    nodes = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nodes[prefix + child.name] = child
                visit(child, prefix + child.name + ".")

    visit(ast.parse(source), "")
    for name in sorted(wanted, key=lambda n: -nodes[n].lineno if n in nodes else 0):
        node = nodes.get(name)
        if node is None or isinstance(node, ast.ClassDef):
            continue
        body = node.body
        value = getattr(body[0], "value", None) if isinstance(body[0], ast.Expr) else None
        has_doc = isinstance(value, ast.Constant) and isinstance(value.value, str)
        first = body[0].end_lineno + 1 if has_doc else body[0].lineno  # 1-based, first line replaced
        indent = " " * body[0].col_offset
        lines[first - 1:node.end_lineno] = [f"{indent}{placeholder(wanted[name])}\n"]
        done.add((path, name))
    return "".join(lines), done


def handout_files(root=ROOT):
    """{relative path: new text} for the files whose solutions were stripped or bodies stubbed, and every file
    to copy."""
    files, stripped, found, stubbed = repository_files(root), {}, set(), set()
    for path in files:
        if not path.endswith(".py"):
            continue
        with open(os.path.join(root, path), encoding="utf-8") as f:
            source = f.read()
        if any(p == path for p, _ in ALSO_STUBBED):
            source, seen = stub_bodies(path, source)
            stubbed |= seen
            stripped[path] = source
        if BEGIN in source or END in source:
            stripped[path], seen = strip_solutions(path, source)
            found |= seen
        elif path in stripped:
            compile(source, path, "exec")
    if "README.md" in files:
        with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
            stripped["README.md"] = student_readme(f.read())
    missing = sorted(set(FUNCTIONS) - found) + sorted(set(ALSO_STUBBED) - stubbed)
    if missing:
        raise HandoutError("exercise functions without a marked region, or ALSO_STUBBED functions not found: "
                           + ", ".join(f"{p}:{name}" for p, name in missing))
    return stripped, files


STUDENT_README = [  # (pattern, replacement) in order, on README.md; tests/test_course.py checks the result
    (r"\A(# .*\n)", r"\1\n> The student copy of the course: [EXERCISES.md](EXERCISES.md) is the sheet. Each "
     "exercise's body raises\n> NotImplementedError until you write it; `course/graded/` grades it.\n"),
    (r" ?`python -m tests\.reading_path` prints[^.]*\.", ""),
    (r"\n(bench|tests)/ +[^\n]*", ""),
    (r"\ncourse/ +[^\n]*", "\ncourse/graded/        the graded tests of EXERCISES.md, one pytest file per "
     "exercise"),
    (r"python -m pytest -q\n", "python -m pytest -q course/graded\n"),
    (r"The tests take about [^(]*\(`python -m pytest -q -m core`, the core tier alone:\s+under [^)]*\); the",
     "The graded tests of EXERCISES.md take about 12 seconds; the"),
    (r"\n- \[docs/instructors\.md\][^\n]*", ""),
    (r" \[bench/README\.md\]\(bench/README\.md\): the speed of the\s+log-prob path; ", "\n  "),
]


def student_readme(text):
    """README.md as the students read it (STUDENT_README): their set-up, nothing the copy lacks."""
    for pattern, replacement in STUDENT_README:
        text = re.sub(pattern, replacement, text)
    return text


def check_out_dir(out_dir, root=ROOT):
    real, repo = os.path.realpath(out_dir), os.path.realpath(root)
    if real == repo or real.startswith(repo + os.sep):
        raise HandoutError(f"OUT_DIR {out_dir} is inside the repository: put the student copy elsewhere")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise HandoutError(f"OUT_DIR {out_dir} exists and is not an empty directory")


def make_handout(out_dir, root=ROOT):
    """Write the student copy of root to out_dir; returns the number of files written."""
    check_out_dir(out_dir, root)
    stripped, files = handout_files(root)  # everything is checked before anything is written
    for path in files:
        src, dst = os.path.join(root, path), os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if path in stripped:
            with open(dst, "w", encoding="utf-8") as f:
                f.write(stripped[path])
            shutil.copymode(src, dst)
        else:
            shutil.copy2(src, dst)
    return len(files)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip().split("\n\n")[1].strip(), file=sys.stderr)
        print("error: give one OUT_DIR", file=sys.stderr)
        return 2
    try:
        n = make_handout(argv[0])
    except HandoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote the student copy ({n} files, {len(TITLES)} exercises) to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
