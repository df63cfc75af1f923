"""`prefopt <command>`: `train` (a Hydra app: overrides, --help, --cfg, -m), `evaluate <run dir>` and
`report <sweep dir>`."""

from __future__ import annotations

import sys

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
        from prefopt.training.train import main as train_main

        register_resolvers()
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


if __name__ == "__main__":
    sys.exit(main())
