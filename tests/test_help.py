"""Every script answers --help with its docstring and every flag with its default (argparse formats each
help string with %, so a stray percent sign in a help text would end in a traceback instead)."""
import dataclasses
import importlib

import pytest

from test_toy_tldr import submit_cli

SCRIPTS = ["toy_tldr", "sft", "reward", "dpo", "is_dpo", "evaluate", "toy_gaussian", "toy_categorical",
           "extras/rloo", "extras/online_dpo", "extras/wpo"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_flag(tmp_path_factory, name):
    result = submit_cli(tmp_path_factory, f"{name}.py", "--help").result(timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for f in dataclasses.fields(importlib.import_module(name.replace("/", ".")).Args):
        assert f"--{f.name}" in result.stdout, f.name
