r"""Writes the README's demo table from a finished demo run, so it is never typed by hand.

  python scripts/readme_demo_table.py            # rewrite the README block from demo/run
  python scripts/readme_demo_table.py --check    # exit 1 (and show the diff) if it differs

The block is the part of README.md between `<!-- demo-table:begin -->` and
`<!-- demo-table:end -->`. It becomes exactly the table `make demo` prints at its end
(`python -m surgfusion_jax.main` formats it from the run's `results.json` with
`evaluation.tables`, as `demo_table` does here). `tests/test_demo_readme.py` (slow) runs a
fresh `make demo` in a clone and checks that its printed table equals the block.

Exit status: 0 written or up to date, 1 `--check` found a difference, 2 no finished run
or no markers in the README (the message names the fix).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout: use its library

from surgfusion_jax import errors  # noqa: E402
from surgfusion_jax.evaluation import summary, tables  # noqa: E402
from surgfusion_jax.io import atomic_write  # noqa: E402

BEGIN = "<!-- demo-table:begin -->"
END = "<!-- demo-table:end -->"


class ReadmeTableError(errors.UserError):
    """No finished run, or the README lacks the markers."""


def demo_table(results: dict) -> str:
    """The results table as `surgfusion_jax.main` prints it at the end of a run."""
    return tables.run_table(results)


def load_table(run_dir: str) -> str:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise ReadmeTableError(f"{path} does not exist: {run_dir!r} holds no finished demo run; "
                               f"fix: run `make demo` first (or pass --run_dir).")
    return demo_table(summary.load_results(path))


def split_readme(text: str, readme: str) -> tuple[str, str, str]:
    """(before the block incl. BEGIN, the block, END and after)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReadmeTableError(f"{readme} must hold the lines {BEGIN} and {END} once each, in "
                               f"that order, around the demo table; fix: add them.")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head + BEGIN, block, END + tail


def render(text: str, table: str, readme: str = "README.md") -> str:
    """`text` with the block between the markers replaced by `table`."""
    head, _, tail = split_readme(text, readme)
    return f"{head}\n{table.rstrip()}\n{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=os.path.join(REPO, "demo", "run"),
                        help="finished demo run (default: demo/run of this checkout)")
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when the README block differs")
    args = parser.parse_args(argv)
    try:
        table = load_table(args.run_dir)
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        new = render(text, table, args.readme)
    except errors.UserError as e:
        return errors.report(e)
    if new == text:
        print(f"{args.readme}: the demo table is up to date with {args.run_dir}")
        return 0
    if args.check:
        old_block = split_readme(text, args.readme)[1].strip("\n").splitlines()
        diff = difflib.unified_diff(old_block, table.splitlines(), "README (typed)",
                                    f"{args.run_dir} (printed)", lineterm="")
        print(f"{args.readme}: the demo table differs from {args.run_dir}; fix: run "
              f"`python scripts/readme_demo_table.py`.\n" + "\n".join(diff), file=sys.stderr)
        return 1
    atomic_write(args.readme, new)
    print(f"{args.readme}: demo table rewritten from {args.run_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
