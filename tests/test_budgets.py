"""The budgets of a core read in one sitting (python -m tests.reading_path prints them)."""
import pytest

from tests import reading_path


@pytest.mark.core
def test_the_reading_path_and_the_readme_keep_their_budgets(capsys):
    assert reading_path.main() == 0, capsys.readouterr().out


@pytest.mark.core
def test_the_reading_path_follows_module_level_imports_only(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("import b\n\ndef f():\n    import c\n")
    for name, text in (("b.py", "import os\n"), ("c.py", "x = 1\n" * 5)):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(reading_path, "ROOT", str(tmp_path))
    assert reading_path.imports("a.py") == ({"b.py"}, {"c.py"})
    assert reading_path.lines("c.py") == 5
