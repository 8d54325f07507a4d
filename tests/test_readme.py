"""The DRA example in README.md runs as written.

Takes the first ```python block after the first Markdown heading that names DRA and
executes it in a fresh namespace (it must be self-contained: its own imports, tiny shapes).
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = re.compile(r"^#{1,6}[ \t].*\bDRA\b.*$", re.MULTILINE)
CODE_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def dra_example(text: str) -> str:
    """Returns the first python block after the first heading containing 'DRA'."""
    heading = HEADING.search(text)
    if heading is None:
        raise LookupError("no Markdown heading containing 'DRA' (e.g. '## Using DRA as a layer')")
    block = CODE_BLOCK.search(text, heading.end())
    if block is None or not block.group(1).strip():
        raise LookupError(f"no ```python block after the heading {heading.group(0)!r}")
    return block.group(1)


def test_extraction_picks_the_block_after_the_dra_heading():
    text = ("# Title\n```python\nskipped = 1\n```\n## Using DRA\ntext\n"
            "```python\nx = 2\n```\n```python\ny = 3\n```\n")
    assert dra_example(text) == "x = 2\n"
    with pytest.raises(LookupError, match="heading"):
        dra_example("# Title\n```python\nx = 1\n```\n")
    with pytest.raises(LookupError, match="python block"):
        dra_example("## DRA\nno code here\n")


def test_readme_dra_example_runs():
    if not README.is_file():
        pytest.fail(f"{README} is missing: it needs a heading naming DRA followed by a "
                    "```python example (the DRA-as-a-layer snippet).")
    try:
        code = dra_example(README.read_text(encoding="utf-8"))
    except LookupError as err:
        pytest.fail(f"{README}: {err}")
    namespace = {"__name__": "readme_dra_example"}
    exec(compile(code, f"{README}:DRA example", "exec"), namespace)  # noqa: S102
