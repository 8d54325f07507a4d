"""README's "What can go wrong" table cannot drift: every test it cites exists."""
import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faults the issue asks the table to cover (more rows are welcome).
REQUIRED = ("truncated video", "unreadable video", "missing video",
            "shorter than one segment", "masks that do not match", "bad manifest rows",
            "damaged `last` checkpoint", "full disk", "killed prep", "killed training",
            "changed dataset")


def _rows():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## What can go wrong", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # no header
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def _test_names(path):
    """Names of the test functions (and Class::method) defined in a test file."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_row_cites_an_existing_test():
    rows = _rows()
    assert len(rows) >= len(REQUIRED)
    for fault, seen, cited in rows:
        ids = re.findall(r"`(tests/[\w/]+\.py)::([\w:]+)`", cited)
        assert ids and seen, fault  # a test and what the user sees, for every row
        for path, name in ids:
            assert os.path.exists(os.path.join(REPO, path)), (fault, path)
            assert name.startswith(("test_", "Test")), (fault, name)
            assert name in _test_names(path), (fault, f"{path}::{name}")


def test_the_table_covers_the_required_faults():
    faults = " / ".join(row[0] for row in _rows())
    assert [f for f in REQUIRED if f not in faults] == []
