"""What both command-line tools share: options, output, and the one place where sfs
errors become a one-line message and an exit code."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import types
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import typer
from rich.console import Console, RenderableType
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

from sfs.common.errors import SfsError

CONFIG_ENV = "SFS_CONFIG"
ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar=CONFIG_ENV,
        metavar="FILE",
        help=f"YAML config file (or set {CONFIG_ENV}).",
        show_default=False,
    ),
]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks and debug logs.", envvar="SFS_DEBUG")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


class _Console(Console):
    """Not a terminal (a pipe, a file): no line is ever wrapped, so one line stays one
    record for `grep` and `tee`."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **options: Any) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **options)


# No markup and no highlighting: what we print includes names chosen by other people.
stdout = _Console(markup=False, highlight=False)
stderr = _Console(stderr=True, markup=False, highlight=False)


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


class _PlainValue:
    """Typer's coercion of a text, path or flag value, without pydantic. Typer (0.2x) runs
    every value through a pydantic `TypeAdapter`: importing pydantic and building the
    adapters is a large part of a command's start-up (~80 ms), for values that need only
    `str`, `Path` or a yes/no. Other types keep typer's own coercion."""

    def __init__(self, convert: Callable[[str], Any], multiple: bool) -> None:
        self._convert = convert
        self._multiple = multiple

    @classmethod
    def for_param(cls, param: Any) -> _PlainValue | None:
        """One for a typer parameter of type `str` or `Path` (or a list of them, or
        optional) with no parser and no path checks; None for any other."""
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or not hasattr(param, "_runtime_param"):
            return None  # another typer: leave it alone
        checks = ("parser", "exists", "resolve_path", "writable", "path_type", "allow_dash")
        if any(getattr(descriptor.parameter_info, name, None) for name in checks):
            return None
        annotation = descriptor.annotation
        multiple = get_origin(annotation) is list
        if multiple:
            (annotation,) = get_args(annotation)
        elif get_origin(annotation) in (Union, types.UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            annotation = options[0] if len(options) == 1 else None
        if annotation is bool and not multiple:
            return cls(_flag, multiple)
        if annotation not in (str, Path):
            return None
        return cls(annotation, multiple)

    def coerce(self, value: Any, param: Any = None, ctx: Any = None) -> Any:
        if value is None:
            return () if self._multiple else None
        try:
            if self._multiple and not isinstance(value, str):
                return [self._convert(item) for item in value]
            return self._convert(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None


_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off", ""}


def _flag(value: Any) -> bool:
    """A flag's value: a bool, or text from its environment variable (SFS_DEBUG=1)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{str(value)[:40]!r} is not a valid boolean")


def _without_pydantic(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "_runtime_param", True) is None:
            param._runtime_param = _PlainValue.for_param(param)
    return params


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> Any:
        return _without_pydantic(super().get_params(ctx))


class _Command(typer.core.TyperCommand):
    """Plain help the way command-line tools print it: `get [OPTIONS] FILE_ID`, values
    named (`--out DIR`), no types (`<str>`); --config required only when SFS_CONFIG is
    unset. (click's types are vendored by some typer versions, hence `Any`.)"""

    def get_params(self, ctx: Any) -> Any:
        params = _without_pydantic(super().get_params(ctx))
        for param in params:
            if param.name == "config" and getattr(param, "envvar", None) == CONFIG_ENV:
                # Parsing agrees: click reads the variable before it checks `required`.
                param.required = not os.environ.get(CONFIG_ENV)
            if param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = str(param.name).upper()
        return params

    def get_short_help_str(self, limit: int = 45) -> str:
        """The command list's line: the first sentence, or its head up to a clause
        break when it does not fit (never a sentence cut off mid-way with "...")."""
        if self.short_help or not self.help:
            return str(super().get_short_help_str(limit))
        sentence = " ".join(self.help.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        if len(sentence) <= limit:
            return sentence
        breaks = [
            at
            for at in range(limit // 3, limit)
            if sentence.startswith((" (", "; ", ": ", ", "), at)
            and sentence.count("(", 0, at) == sentence.count(")", 0, at)  # not in brackets
        ]
        if breaks:
            return sentence[: breaks[-1]]
        return str(super().get_short_help_str(limit))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if param.hidden:
                continue
            if param.param_type_name == "argument":
                arguments.append((param.metavar, param.help or ""))
            else:
                record = param.get_help_record(ctx)
                if record is not None:
                    options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _App(typer.Typer):
    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


def new_app(help_text: str) -> typer.Typer:
    """A Typer app whose errors go through `command` rather than rich tracebacks, with
    plain-text help (-h or --help) and --version."""
    app = _App(
        cls=_Group,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain help: no boxes, reads the same in a pipe
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _options(
        version: Annotated[
            bool,
            typer.Option(
                "--version", help="Show the version and exit.", is_eager=True, callback=_version
            ),
        ] = False,
    ) -> None:
        pass

    return app


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        import importlib.metadata

        from sfs.common.protocol import VERSION

        tool, release = ctx.find_root().info_name, importlib.metadata.version("sfs")
        print(f"{tool} {release} (protocol version {VERSION})")
        raise typer.Exit()


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
        except EOFError:  # Ctrl-D at a prompt that did not handle it itself
            fail("end of input at a prompt; nothing was done", 2)
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
        if type(exc).__name__ == "NoArgsIsHelpError":  # the tool run bare: its help, as is
            print(message, file=sys.stderr)
            code = 2
        else:
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
    # Names as they are (UTF-8), not \u escapes.
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def install_signal_handlers(stop: Callable[[], None]) -> None:
    """Ctrl-C and SIGTERM ask a serve loop to finish cleanly."""

    def handler(signum: int, frame: object) -> None:
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
