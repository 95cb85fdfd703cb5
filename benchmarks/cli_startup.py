"""How long the `scpalm` command takes to answer `--help`: the package and its command line load lazily, so help and
argument errors come before torch and transformers are imported.

    python benchmarks/cli_startup.py              # 5 runs of each command
    python benchmarks/cli_startup.py --quick      # one run of each: checks the benchmark runs

Each command runs in a fresh process; the reference is a bare `python -c pass` in the same run, and the table gives
the median wall-clock seconds and the ratio to it, with `import torch` and `import transformers` beside them for scale.
"""

import argparse
import statistics
import subprocess
import sys
import time

from _common import command_line, print_table

COMMANDS = {
    "python -c pass (reference)": [sys.executable, "-c", "pass"],
    "scpalm --help": [sys.executable, "-m", "modeling_scpalm.cli", "--help"],
    "scpalm pretrain --help": [sys.executable, "-m", "modeling_scpalm.cli", "pretrain", "--help"],
    "scpalm embed --help": [sys.executable, "-m", "modeling_scpalm.cli", "embed", "--help"],
    "scpalm finetune --help": [sys.executable, "-m", "modeling_scpalm.cli", "finetune", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import transformers'": [sys.executable, "-c", "import transformers"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="one run of each: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine touches every command alike
        for name, command in COMMANDS.items():
            times[name].append(seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["python -c pass (reference)"]
    rows = [[name, median, median / reference] for name, median in medians.items()]
    print_table(
        "Start-up of the scpalm command (median wall-clock seconds, fresh process each run)",
        ["command", "seconds", "vs python -c pass"],
        rows,
        note=f"Command: {command_line('cli_startup.py', argv)}",
    )
    return medians


if __name__ == "__main__":
    main()
