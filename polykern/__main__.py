"""``python -m polykern <command>``.

  info       what this install compiled and which paths are live here, and why not (``--json``)
  selftest   polykern.selftest.main(argv): the install checked on this machine's GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Optional


def _info(args: argparse.Namespace) -> int:
    from ._build import build_info, format_info
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("polykern.selftest") is None:
        print("polykern: this version has no selftest (polykern/selftest.py is missing)",
              file=sys.stderr)
        return 2
    from . import selftest  # imported only here: it may pull in more than `info` needs
    return selftest.main(args.rest)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polykern", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    info = commands.add_parser("info", help="archs compiled, this GPU, live paths and why not")
    info.add_argument("--json", action="store_true", help="build_info() as JSON")
    info.set_defaults(run=_info)
    # selftest's own arguments (options included) go to polykern.selftest.main untouched
    selftest = commands.add_parser("selftest", help="check the install on this machine "
                                   "(arguments: polykern.selftest's)", add_help=False)
    selftest.set_defaults(run=_selftest)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "selftest":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
