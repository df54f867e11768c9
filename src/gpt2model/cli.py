"""The ``gpt2`` command: parses arguments and calls the library. No logic of its own.

Verbs: ``prepare`` (text -> token files), ``train``, ``sample``, ``eval``, ``bench``, ``info``.
Each verb has an ``_add_<verb>`` function that declares its arguments and a ``_run_<verb>``
function that calls into the package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


# --- info -----------------------------------------------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's or preset's configuration and parameter count")
    p.add_argument("model", help="a model folder, a hub name, or a preset (gpt2, shakespeare-char, ...)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .config import PRESETS, GPTconfig
    from .model import GPT

    if args.model in PRESETS:
        model = GPT(GPTconfig.preset(args.model))
    else:
        model = GPT.from_pretrained(args.model)
    print(model.config.to_json(), end="")
    print(f"parameters: {model.num_params():,}")
    return 0


# --- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description="GPT-2 from scratch: prepare data, train, sample, "
                                     "evaluate and benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Errors of the user's input: one clear line, no traceback.
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
