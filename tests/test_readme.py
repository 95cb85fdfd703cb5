"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (the README's own example, as a user runs it)
    assert capsys.readouterr().out.strip() == "(700, 64)"
    for name in (
        "preprocessor_config.json",
        "processing_scpalm.py",
        "modeling_scpalm.py",
    ):  # loadable without the package
        assert (tmp_path / "scpalm-tiny" / "model" / name).exists(), name
