"""`python -m mbxfer ...` is the `mbxfer` command."""

from mbxfer.benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
