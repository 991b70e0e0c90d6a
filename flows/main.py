"""The `trainflow` command: `trainflow train|predict|sweep|cache|server …`, each exactly the
script it names (`python flows/train_flow.py …` and so on): the same flags, the same early
flag check, the same exit path and exit codes."""

import sys
from typing import NoReturn

COMMANDS = {
    "train": "train a model: python flows/train_flow.py",
    "predict": "score a table with a trained model: python flows/predict_flow.py",
    "sweep": "a grid or random sweep of training runs: python flows/sweep_flow.py",
    "cache": "list and prune the stage cache",
    "server": "status, start or stop the local Prefect server",
}

USAGE = "usage: trainflow {" + ",".join(COMMANDS) + "} ..."


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join([USAGE, "", "commands:", *lines, "", "trainflow COMMAND --help: its flags"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        choices = ", ".join(COMMANDS)
        print(
            f"{USAGE}\ntrainflow: error: unknown command {command!r} (choose from {choices})",
            file=sys.stderr,
        )
        return 2
    prog = f"trainflow {command}"
    if command in ("train", "predict"):
        return _run_flow_command(command, rest, prog)
    if command == "sweep":
        from trainflow.flows.sweep_flow import main as sweep

        return sweep(rest, prog=prog)
    if command == "cache":
        from trainflow.flows.cache_cli import main as cache

        return cache(rest, prog=prog)
    from trainflow.flows.session.server import main as server

    return server(rest, prog=prog)


def _run_flow_command(command: str, argv: list[str], prog: str) -> NoReturn:
    # As the scripts do it: the flags first, before torch and Prefect load (a bad one exits 2
    # at once), then the server found, so one that must start boots while torch loads.
    from trainflow.flows.cli import parse_config
    from trainflow.flows.config import PredictConfig, TrainConfig
    from trainflow.flows.session import runtime

    parse_config(TrainConfig if command == "train" else PredictConfig, argv, prog=prog)
    runtime.start_early()
    if command == "train":
        from trainflow.flows.train_flow import main as run
    else:
        from trainflow.flows.predict_flow import main as run
    runtime.exit_process(run(argv, prog=prog))


if __name__ == "__main__":
    sys.exit(main())
