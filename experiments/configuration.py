"""The experiments' configs: presets and config files, loading them with ``KEY=VALUE`` overrides, and the command
line's config flags (``--config``, ``--config.KEY=VALUE``) and multi-process flags."""

from __future__ import annotations

import argparse
import ast
import os
import sys

import ml_collections
from absl import flags as absl_flags
from ml_collections import config_flags

from attrjax import distributed


CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")


class _ListParser(absl_flags.ArgumentParser):
    """``[0.7, 0.5]`` (a Python list literal) for list-valued config fields, such as per-conv pruning rates, which
    ``config_flags`` has no parser for."""

    def parse(self, argument):
        if isinstance(argument, list):
            return argument
        try:
            value = ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{argument!r} is not a list literal such as [0.5, 0.7]")
        return list(value)

    def flag_type(self):
        return "list"


config_flags.register_flag_parser_for_type(list, _ListParser())


def config_file(name: str) -> str:
    """``path/to/config.py[:argument]`` for a preset name (``quick``, ``paper:argument``) or a path as given."""
    path, colon, argument = name.partition(":")
    if not path.endswith(".py"):
        preset = os.path.join(CONFIGS_DIR, f"{path}.py")
        if not os.path.isfile(preset):
            available = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))
            raise ValueError(f"unknown config {path!r}; available: {available} (or a path to a .py file)")
        path = preset
    elif not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    return path + colon + argument


def load_config(name: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """A config file's ``get_config()`` (``name``: see ``config_file``) with ``key.sub=value`` overrides, parsed by
    ``ml_collections.config_flags`` as ``--config.key.sub=value`` is: typed by the field each one replaces."""
    path = config_file(name)
    config = _parse_config(path, [])
    flags = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals:
            raise ValueError(f"config override {override!r} is not KEY=VALUE (e.g. teacher.num_steps=100)")
        expected = _check_key(config, key)
        flags.append((f"--config.{key}={value}", f"config key {key!r} is of type {type(expected).__name__}"))
    return _parse_config(path, flags) if flags else config


def _parse_config(path: str, flags: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """``config_flags`` on a command line of ``--config=path`` and ``flags`` ((flag, what it overrides) pairs)."""
    argv = ["attrjax", f"--config={path}", *(flag for flag, _ in flags)]
    flag_values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except absl_flags.IllegalFlagValueError as error:
        culprit = next((what for flag, what in flags if str(error).startswith(f"flag {flag.partition('=')[0]}=")),
                       None)
        if culprit is None:  # the file itself: a syntax error, no get_config, an argument it does not take
            raise ValueError(f"cannot load config {path}: {str(error).strip().splitlines()[-1]}") from None
        raise ValueError(f"{culprit}: {error}") from None
    return holder.value


def _check_key(config: ml_collections.ConfigDict, key: str):
    """The value at dotted ``key``; raises naming the first part that does not exist and what exists there."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            known = f"; it has: {', '.join(sorted(node.keys()))}" if isinstance(node, ml_collections.ConfigDict) else ""
            raise ValueError(f"unknown config key {key!r}: {where} has no {part!r}{known}")
        node = node[part]
    return node


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (a preset or a config file) and the deprecated ``--set``, which ``parse_with_overrides``
    reads together with every ``--config.KEY=VALUE``."""
    parser.add_argument("--config", default="quick", help="a preset of experiments/configs (quick, paper, ...) or a "
                        "config file, each optionally with :ARGUMENT for its get_config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="deprecated: use --config.KEY=VALUE")


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="Override any config value with --config.KEY=VALUE, e.g. "
        "--config.teacher.num_steps=100 (typed by the config's own field).")
    add_config_arguments(parser)
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and results go")
    group = parser.add_argument_group("multi-process runs (one process per host; see docs/multihost.md)")
    group.add_argument("--distributed", choices=distributed.MODES, default="auto",
                       help="auto: join a multi-process run when a coordinator is given or a cluster manager (SLURM, "
                       "Open MPI, Cloud TPU) started several processes; on: always (JAX detects the rest); off")
    group.add_argument("--coordinator_address", default=None,
                       help=f"host:port of process 0 (or {distributed.COORDINATOR_ENV})")
    group.add_argument("--num_processes", type=int, default=None, help=f"(or {distributed.NUM_PROCESSES_ENV})")
    group.add_argument("--process_id", type=int, default=None, help=f"(or {distributed.PROCESS_ID_ENV})")
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags, and the config overrides (``KEY=VALUE``) of every ``--config.KEY=VALUE`` or
    ``--config.KEY VALUE`` on the command line, then of the deprecated ``--set`` (which warns)."""
    args, rest = parser.parse_known_args(argv)
    overrides = []
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--config."):
            parser.error(f"unrecognized argument {flag!r} (config values are set with --config.KEY=VALUE)")
        key, equals, value = flag[len("--config."):].partition("=")
        if not equals:
            if not rest:
                parser.error(f"{flag} needs a value: {flag}=VALUE")
            value = rest.pop(0)
        overrides.append(f"{key}={value}")
    if args.set:
        print("warning: --set is deprecated and will be removed; write each KEY=VALUE as --config.KEY=VALUE, e.g. "
              f"--config.{args.set[0]}", file=sys.stderr)
    return args, overrides + args.set
