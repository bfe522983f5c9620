"""The reading path and its budgets: the design card's scripts and every local module they import at module
level (transitively), with their line counts. Imports made inside a function (the toy's true scorer, FSDP,
the hub loaders) are listed apart: a student meets them only when following that call.

    python -m tests.reading_path          # prints one line a file, then the totals; exit 1 over a budget
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = ["sft.py", "reward.py", "dpo.py", "is_dpo.py", "evaluate.py", "toy_gaussian.py"]
BUDGETS = {"total": 2500, "dpo.py": 350, "is_dpo.py": 150, "README.md": 250}


def local(name):
    """The project file a dotted module name refers to, or None (a library)."""
    for path in (os.path.join(ROOT, *name.split(".")) + ".py",
                 os.path.join(ROOT, *name.split("."), "__init__.py")):
        if os.path.isfile(path):
            return os.path.relpath(path, ROOT)
    return None


def imports(path):
    """(module-level imports, imports inside functions) of a file, as project files."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    top = {id(n) for n in ast.walk(ast.Module(body=[s for s in tree.body if not isinstance(
        s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[]))}
    found = ({}, {})
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for f in filter(None, map(local, names)):
            found[id(node) not in top][f] = True
    return set(found[0]), set(found[1])


def lines(path):
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for _ in f)


def main():
    path, lazy, todo = set(), set(), list(CARD)
    while todo:
        f = todo.pop()
        if f not in path:
            path.add(f)
            top, inside = imports(f)
            todo += top
            lazy |= inside
    total = sum(lines(f) for f in path)
    for f in sorted(path, key=lambda f: (f not in CARD, f)):
        print(f"{lines(f):6d}  {f}{'  (the card)' if f in CARD else ''}")
    for f in sorted(lazy - path):
        print(f"{lines(f):6d}  {f}  (imported inside a function only: not on the path)")
    sizes = {"total": total, "dpo.py": lines("dpo.py"), "is_dpo.py": lines("is_dpo.py"),
             "README.md": lines("README.md")}
    over = [f"{k} {sizes[k]} > {v}" for k, v in BUDGETS.items() if sizes[k] > v]
    print(f"reading path: {total} lines in {len(path)} files (budget {BUDGETS['total']}); "
          f"README.md {sizes['README.md']} lines (budget {BUDGETS['README.md']})")
    print("over budget: " + "; ".join(over) if over else "every budget holds")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
