"""`python -m bench` (or `make bench`): the benchmarks, written to bench/results.md.

    python -m bench [--size 1GiB] [--rounds 3] [--only transfer|folders|broker|search]...

Runs the transfer comparison against scp and magic-wormhole (bench/transfer.py), then
each other section whose module is present: folders (bench/folders.py),
bench/broker_load.py, bench/search.py and bench/relay.py. A
section is a module with `run(args: argparse.Namespace) -> str` that returns markdown.
results.md is rewritten after each section, so a failure keeps the sections done before
it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shlex
import sys
from datetime import datetime
from pathlib import Path

from bench.common import BenchError, parse_size
from bench.sshd import openssh_version

SECTIONS = {
    "transfer": "bench.transfer",
    "folders": "bench.folders",
    "broker": "bench.broker_load",
    "search": "bench.search",
    "relay": "bench.relay",
}
RESULTS = Path(__file__).with_name("results.md")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=parse_size, default="1GiB", help="file size for the transfer (1GiB)"
    )
    parser.add_argument("--rounds", type=positive, default=3, help="rounds of each method (3)")
    parser.add_argument(
        "--only",
        choices=list(SECTIONS),
        action="append",
        help="run this section alone (repeat it for several)",
    )
    parser.add_argument(
        "--scp-cipher",
        metavar="NAME",
        help="the cipher of the second scp, beside OpenSSH's default (aes128-gcm@openssh.com)",
    )
    return parser.parse_args(argv)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def machine(started: datetime, load: tuple[float, float, float]) -> list[str]:
    return [
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- command: `{shlex.join(['python', '-m', 'bench', *sys.argv[1:]])}`",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, {memory()} RAM",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, {openssh_version()}",
        f"- load average at the start: {' '.join(f'{x:.2f}' for x in load)}",
        f"- load average when written: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        " (other work on the machine shows here; rerun when it is quiet)",
    ]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "?"


def section(name: str, args: argparse.Namespace) -> str | None:
    """The section's markdown, or None if its module is not there (yet)."""
    module_name = SECTIONS[name]
    if importlib.util.find_spec(module_name) is None:
        if name in (args.only or []):
            raise BenchError(f"{module_name.replace('.', '/')}.py does not exist")
        print(f"skipping {name}: no {module_name} module", file=sys.stderr)
        return None
    text = importlib.import_module(module_name).run(args)
    if not isinstance(text, str):
        raise BenchError(f"{module_name}.run returned {type(text).__name__}, not markdown")
    return text


def write_results(header: list[str], sections: list[str]) -> None:
    body = "\n".join(["# sfs benchmarks", "", *header, "", *sections])
    RESULTS.write_text(body.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load = datetime.now().astimezone(), os.getloadavg()
    done: list[str] = []
    try:
        for name in args.only or list(SECTIONS):
            text = section(name, args)
            if text is not None:
                print(text, flush=True)
                done.append(text)
                write_results(machine(started, load), done)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # everything started has been stopped on the way out
        print("interrupted", file=sys.stderr)
        return 130
    print(f"written to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
