"""The ``attngen`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attngen", description="Compile attention variants to Triton kernels.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in [("compile", "build and cache the kernels of a spec file"),
                            ("export", "write a standalone kernel file"),
                            ("show", "print a spec's IR and generated source"),
                            ("check", "property-test a spec against the reference"),
                            ("bench", "time a spec against the reference, SDPA and FlexAttention")]:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("spec_file", help="a Python file defining SPEC")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"attngen {args.command}: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
