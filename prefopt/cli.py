"""`prefopt <command>`: `train` (a Hydra app: overrides, --help, --cfg, -m), `evaluate <run dir>` and
`report <sweep dir>`."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from prefopt import CONF_DIR

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

USAGE = """usage: prefopt <command> [args]

commands:
  train [overrides]     train and evaluate one run; `-m` sweeps (Hydra multirun); --help lists the options
  report <sweep dir>    tables, figures and REPORT.md for a finished multirun
  evaluate <run dir | checkpoint> [key=value ...]
                        held-out metrics and generation eval of a saved model, without training
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from prefopt.config import register_resolvers
        from prefopt.config.aliases import rewrite_overrides
        from prefopt.training.train import main as train_main

        register_resolvers()
        rest = rewrite_overrides(rest)  # the keys the trainer's split moved
        mistake = override_mistake(rest)
        if mistake:
            print(f"prefopt: config error: {mistake}", file=sys.stderr)
            return 2
        unwritable = unwritable_output_dir(rest)
        if unwritable:  # Hydra would fail to create it with a traceback
            print(f"prefopt: {unwritable}", file=sys.stderr)
            return 2
        sys.argv = ["prefopt train", *rest]
        train_main()
        return 0
    if command == "evaluate":
        from prefopt.training.evaluate_saved import main as evaluate_main

        return evaluate_main(rest)
    if command == "report":
        from prefopt.research.report import main as report_main

        return report_main(rest)
    print(f"prefopt: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def override_mistake(args: list[str]) -> str | None:
    """One line naming a mistyped key or an unknown group option in `args`, with its closest matches.

    Hydra rejects both itself, with a few lines and no suggestion; here the config is composed first, as
    `prefopt train` will compose it (a sweep by its first value). None when it composes, or fails in a way
    Hydra reports well (its message then follows, as does a full one under HYDRA_FULL_ERROR=1).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    job = _job_overrides(args)
    if job is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    overrides = [override.input_line for override in job]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose("train", overrides=overrides)
            return None
        except MissingConfigException as error:  # objective=dpoo, aux_reward=[length,bogus]
            return _unknown_option(error.missing_cfg_file, error.options)
        except ConfigCompositionException as error:  # trainer.max_step=5 (not in struct)
            key = getattr(error.__cause__, "full_key", None)
            if not key or not isinstance(error.__cause__, ConfigAttributeError | ConfigKeyError):
                return None
            rest = [override.input_line for override in job if override.key_or_group != key]
            try:
                known = compose("train", overrides=rest, return_hydra_config=True)
            except ConfigCompositionException:
                known = compose("train", return_hydra_config=True)
            return _unknown_key(key, known)


def unwritable_output_dir(args: list[str]) -> str | None:
    """`cannot write to <dir>: <reason>` when the output dir of `args` (hydra.run.dir, or hydra.sweep.dir
    with -m) cannot be created: its nearest existing ancestor is a file, on a read-only file system or not
    writable. Checked without creating anything; the part of a dir before any `${...}` is what is checked
    (conf/train.yaml's dirs start with outputs/)."""
    import errno

    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    given = [o.value() for o in _job_overrides(args) or [] if o.key_or_group == key and not o.is_delete()]
    directory = str(given[-1]) if given else "outputs"
    existing = Path(directory.split("${", 1)[0] or ".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot write to {directory}: {existing} is not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    return f"cannot write to {directory}: {os.strerror(errno.EROFS if read_only else errno.EACCES)}"


def _job_overrides(args: list[str]) -> list[Override] | None:
    """Hydra's `Override`s of `args` (a sweep replaced by its first value), or None when the command composes
    nothing from conf/ (--help, --version, another config dir) or Hydra's own parser rejects it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed = _hydra_command_line().parse_args(args)
        overrides = parser.parse_overrides(parsed.overrides)
    except (SystemExit, Exception):  # noqa: BLE001 - Hydra reports it in its own words
        return None
    unusual = (
        parsed.help,
        parsed.hydra_help,
        parsed.version,
        parsed.shell_completion,
        parsed.info,
        parsed.experimental_rerun,
    )
    if any(unusual) or parsed.config_path or parsed.config_name or parsed.config_dir:
        return None
    job = []
    for override in overrides:
        if not override.is_sweep_override():
            job.append(override)
            continue
        try:
            first = next(iter(override.sweep_string_iterator()))
            job += parser.parse_overrides([f"{override.get_key_element()}={first}"])
        except Exception:  # noqa: BLE001 - a glob or interval sweep: leave it to the sweeper
            continue
    return job


def _hydra_command_line() -> argparse.ArgumentParser:
    """The command line a `@hydra.main` app takes (`prefopt train`): Hydra's flags, then the overrides."""
    parser = argparse.ArgumentParser(prog="prefopt train", add_help=False)
    switches = [
        ("--help", "-h"),
        ("--hydra-help",),
        ("--version",),
        ("--resolve",),
        ("--run", "-r"),
        ("--multirun", "-m"),
        ("--shell-completion", "-sc"),
    ]
    for flags in switches:
        parser.add_argument(*flags, action="store_true")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    values = [
        ("--package", "-p"),
        ("--config-path", "-cp"),
        ("--config-name", "-cn"),
        ("--config-dir", "-cd"),
        ("--experimental-rerun",),
    ]
    for flags in values:
        parser.add_argument(*flags)
    info = ["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"]
    parser.add_argument("--info", "-i", nargs="?", const="all", choices=info)
    parser.add_argument("overrides", nargs="*")
    return parser


def _unknown_option(missing: str | None, options: list[str] | None) -> str | None:
    if not missing or "/" not in missing:
        return None
    group, name = missing.rsplit("/", 1)
    options = options or sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return f"{group}={name}: no such option{hint} (options: {', '.join(options)})"


def _unknown_key(key: str, known) -> str:
    """`key: no such key; did you mean <closest existing key>?`, walking `known` as far as `key` exists."""
    from omegaconf import DictConfig

    parts, node = key.split("."), known
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            break
        if part not in node:
            names = [str(k) for k in node]
            if i == 0:  # groups a config can add with +group=option, e.g. experiment
                names += [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
            close = difflib.get_close_matches(part, sorted(set(names)), n=1)
            if close:
                return (
                    f"{key}: no such key; did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1 :]])}?"
                )
            break
        node = node[part]
    return f"{key}: no such key (to add a new one, write +{key}=...)"


if __name__ == "__main__":
    sys.exit(main())
