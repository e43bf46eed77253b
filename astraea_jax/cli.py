"""The `astraea` command: demo, train-demo, generate, convert, search, eval.

Benchmarks are the scripts in benchmarks/ (results in benchmarks/results/).

  astraea convert SRC DST [--format auto|wan|diffusers|opensora|umt5]
      [--allow-pth] [--dtype float32|bfloat16]
  astraea generate --model DST --prompt "..." --out video.mp4
  astraea demo
  astraea eval --model demo --policies default --out eval/

Each subcommand is a module of `astraea_jax.commands` with its `run(args)`
and its parser. Every value is checked when the command line is read,
before any model loads, and a mistake is named by its flag with the allowed
range. Every output is checked by `outputs.check_destination` before
anything is read: nothing a command reads, and nothing astraea did not
write, is ever replaced. A user mistake ends in one line on stderr and exit
code 1 (2 for an unreadable command line); `--debug` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import sys

from astraea_jax import compile_cache
from astraea_jax.commands import common, convert, demo, evaluate, generate
from astraea_jax.commands import search

# The subcommands' parsers, in the order `astraea --help` lists them.
ADD_PARSERS = (convert.add_parser, demo.add_demo_parser,
               demo.add_train_demo_parser, generate.add_parser,
               search.add_parser, evaluate.add_parser)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="astraea", description="Token-wise accelerated video DiTs in JAX.")
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument("--debug", action="store_true",
                      help="on an error, show the Python traceback")
  sub = parser.add_subparsers(dest="command", required=True)
  for add_parser in ADD_PARSERS:
    add_parser(sub, [shared])
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if not args.debug:
    common.silence_teardown_noise()
  compile_cache.enable()
  try:
    return args.run(args)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    if args.debug:
      raise
    text, code = common.error_message(e)
    print(f"astraea {args.command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
