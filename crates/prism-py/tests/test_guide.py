"""The Python guide's (docs/python.md) examples run as written, in order, in
one namespace (on the host without a GPU). A block after the comment
``<!-- not run by tests/test_guide.py ... -->`` is skipped (one needs a Dask
scheduler, tested by test_dask.py; one a CUDA device and PyTorch, tested by
test_dlpack.py; one a PTX file, tested by test_kernel.py)."""

import pathlib
import re

GUIDE = pathlib.Path(__file__).resolve().parents[3] / "docs" / "python.md"
BLOCK = re.compile(r"(<!-- not run by tests/test_guide\.py[^>]*-->\n)?```python\n(.*?)```", re.S)


def test_guide_python_examples_run(capsys):
    text = GUIDE.read_text()
    blocks = BLOCK.findall(text)
    run = [code for skip, code in blocks if not skip]
    assert len(run) >= 6 and len(blocks) - len(run) == 3
    namespace: dict = {}
    for code in run:
        exec(compile(code, str(GUIDE), "exec"), namespace)
    out = capsys.readouterr().out
    assert "clamp" in out  # g.name(b) printed
    # The error example prints only where Pipeline("gpu") fails.
    assert ("no GPU here" in out) == (namespace["p"].backend == "host")
