"""What the simulation's ServerApp hands back to `flwr-kd simulate` across processes.

Under `flwr run` the ServerApp runs in Flower's simulation process, not in the process that
called `simulate()`. The two share a directory, named by the run-config key `HANDOFF_KEY`: the
ServerApp writes its printed report there (`console.txt`, which `simulate()` echoes as it
grows), then the result, or the exception that ended the run. So the CLI prints the same table
and the same one-line errors, with the same exit codes, as when the ServerApp ran in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import traceback
from collections.abc import Iterator
from pathlib import Path

#: The run-config key of `flwr-kd simulate`'s generated app that names the handoff directory.
HANDOFF_KEY = "flwr-kd-handoff"


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the ServerApp's process, shown as its cause."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}"


class Handoff:
    """The handoff directory. `console.txt` exists when the caller wants a quiet run: the
    ServerApp then prints into it (with flwr's warnings) instead of into Flower's logs."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.console = self.dir / "console.txt"
        self.result_file = self.dir / "result.json"
        self.error_file = self.dir / "error.pickle"

    # -- the ServerApp's side -------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Print into the console file when there is one; record an exception, then re-raise
        it (Flower marks the run failed)."""
        try:
            with contextlib.ExitStack() as stack:
                if self.console.exists():
                    stream = stack.enter_context(self.console.open("a", buffering=1))
                    stack.enter_context(contextlib.redirect_stdout(stream))
                    stack.enter_context(_flwr_warnings_to(stream))
                yield
        except BaseException as exc:
            self._write_error(exc)
            raise

    def write_result(self, result: dict) -> None:
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.result_file)

    def _write_error(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            payload = pickle.dumps((exc, text))
        except Exception:  # noqa: BLE001 - an exception that cannot travel is described
            payload = pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), text))
        self.error_file.write_bytes(payload)

    # -- simulate()'s side ----------------------------------------------------------------

    def outcome(self) -> dict | None:
        """The run's result; raises the ServerApp's exception (with its traceback as the
        cause); None when the run left neither (it died before or outside the ServerApp)."""
        if self.error_file.exists():
            try:
                exc, text = pickle.loads(self.error_file.read_bytes())
            except Exception as err:  # noqa: BLE001 - e.g. a class that cannot be rebuilt
                raise RuntimeError(f"the ServerApp failed; its error could not be read: {err}")
            raise exc from RemoteTraceback(text)
        if self.result_file.exists():
            return json.loads(self.result_file.read_text())
        return None


@contextlib.contextmanager
def _flwr_warnings_to(stream) -> Iterator[None]:
    """flwr's warnings (e.g. a reply left out) shown beside the report, as in a console."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
