"""The README's Python example runs as written (on the host without a GPU)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_readme_python_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
    backend, throughput, _bottleneck = capsys.readouterr().out.split(maxsplit=2)
    assert backend in ("gpu", "host")
    assert float(throughput) > 0
