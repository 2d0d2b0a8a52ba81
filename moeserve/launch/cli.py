"""The ``moeserve`` command: generate, bench, check (and more as subsystems land)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from moeserve.errors import UserError
from moeserve.launch import (
    cmd_bench,
    cmd_chat,
    cmd_check,
    cmd_expert_load,
    cmd_generate,
    cmd_launch,
    cmd_plan,
    cmd_router,
    cmd_serve,
)
from moeserve.launch.engine_args import add_engine_args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help text already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it (``launch`` -> ``launch cluster``)."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += subparsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description="Serve DeepSeek-style MoE models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and print the traceback with an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cmd_generate, cmd_bench, cmd_check, cmd_plan, cmd_launch, cmd_serve, cmd_router, cmd_chat,
                   cmd_expert_load):
        p = module.add_parser(sub)
        if getattr(module, "NEEDS_ENGINE_ARGS", False):
            add_engine_args(p)
        p.set_defaults(func=module.run)
    for p in subparsers(parser):
        p.formatter_class = HelpFormatter
        if p is not parser:  # -v after the subcommand too (SUPPRESS: the top-level value stands otherwise)
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="log at INFO level, and print the traceback with an error (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from moeserve.kvstore.store import StoreConfigError

    if runs_cpu_engine(args):
        from moeserve.cpu_runtime import in_use, openmp_in_use

        logging.getLogger(__name__).info("CPU malloc: %s; CPU OpenMP: %s", in_use(), openmp_in_use())

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except StoreConfigError as e:  # e.g. the KV store's password: a start-up error, said plainly
        print(f"moeserve {args.command}: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # something the user can fix: one line, the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        print(f"{command_name(args)}: error: {e}", file=sys.stderr)
        return 1


def runs_cpu_engine(args: argparse.Namespace) -> bool:
    """Whether the command starts an engine (or the ranks of one) on CPU: ``plan`` only reads ``--device``."""
    return str(getattr(args, "device", "")).startswith("cpu") and args.command != "plan"


def entry() -> int:
    """The ``moeserve`` program: ``main`` on jemalloc and Intel OpenMP where the command runs an engine on CPU
    (see ``moeserve/cpu_runtime.py``; the process re-executes itself once, before loading torch's libraries)."""
    argv = sys.argv[1:]
    args, _ = build_parser().parse_known_args(argv)
    if runs_cpu_engine(args):
        from moeserve.cpu_runtime import reexec_with_preloads

        reexec_with_preloads(argv)
    return main(argv)


def command_name(args: argparse.Namespace) -> str:
    """``moeserve generate``, ``moeserve launch cluster``, ..."""
    return " ".join(["moeserve", args.command] + ([args.launch_command] if getattr(args, "launch_command", None)
                                                  else []))


if __name__ == "__main__":
    sys.exit(entry())
