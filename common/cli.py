"""What both command-line tools share: options, output, and the one place where sfs
errors become a one-line message and an exit code."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

from sfs.common.errors import SfsError

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar="SFS_CONFIG",
        help="YAML config file (or set SFS_CONFIG).",
        show_default=False,
    ),
]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks and debug logs.", envvar="SFS_DEBUG")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]

# No markup and no highlighting: what we print includes names chosen by other people.
stdout = Console(markup=False, highlight=False)
stderr = Console(stderr=True, markup=False, highlight=False)


def printable(text: str) -> str:
    """Text from other people, safe for a terminal: control and format characters
    (escape sequences, bidi overrides) become U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(ch)[0] == "C" else ch for ch in text)


class SafeTable(Table):
    """A table whose text cells are shown literally and printable."""

    def add_row(
        self,
        *renderables: RenderableType | None,
        style: StyleType | None = None,
        end_section: bool = False,
    ) -> None:
        cells = [Text(printable(r)) if isinstance(r, str) else r for r in renderables]
        super().add_row(*cells, style=style, end_section=end_section)


F = TypeVar("F", bound=Callable[..., Any])


def new_app(help_text: str) -> typer.Typer:
    """A Typer app whose errors go through `command` rather than rich tracebacks."""
    return typer.Typer(
        help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )


def command(function: F) -> F:
    """Run a CLI command: sfs errors print one line on stderr and exit non-zero;
    anything else is a bug, reported in one line unless --debug asks for the traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        setup_logging(debug)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops cleanly like Ctrl-C; `serve` installs its own handlers for a
            # graceful stop. SIGINT too: a shell starts background jobs with it ignored,
            # and Python then leaves it ignored, so Ctrl-C would not stop a `get`.
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, _interrupt)
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SfsError as exc:
            if debug:
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if debug:
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); run with --debug for details", 70)

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(app: typer.Typer) -> None:
    """Run a CLI app; usage errors become one line on stderr like every other error."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = _error("interrupted", 130)
    except typer.TyperException as exc:  # usage errors: missing option, unknown command...
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        code = _error(f"{message} (see --help)", getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str, code: int) -> int:
    print(f"error: {printable(message)}", file=sys.stderr)
    return code


def fail(message: str, code: int = 1) -> None:
    print(f"error: {printable(message)}", file=sys.stderr)
    raise typer.Exit(code)


def setup_logging(debug: bool) -> None:
    """Warnings only, unless --debug; servers raise the "sfs" logger to INFO themselves."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


def install_signal_handlers(stop: Callable[[], None]) -> None:
    """Ctrl-C and SIGTERM ask a serve loop to finish cleanly."""

    def handler(signum: int, frame: object) -> None:
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
