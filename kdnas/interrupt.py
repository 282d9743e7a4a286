"""Ctrl-C during a kdnas command: stopped within seconds, one line on stderr, exit code 130.

A terminal sends SIGINT to its whole foreground process group. Under Prefect (3.9.1) that group
also holds the ephemeral API server: ``SubprocessASGIServer._run_uvicorn_command``
(prefect/server/api/server.py) starts it with a plain ``subprocess.Popen``. Ctrl-C therefore
stopped the server at the moment the flow engine began to report the interrupt to it
(``FlowRunEngine.handle_crash``, prefect/flow_engine.py), and the client retried every state
update against the dead server with exponential back-off (``_send_with_retry``,
prefect/client/base.py: 2**n s, 5 retries): minutes of waiting, pages of tracebacks, and a flow
run left "Running". Here:

- the ephemeral server starts with SIGINT blocked (a signal mask survives fork and exec, and
  uvicorn installs handlers but never unblocks), so Ctrl-C reaches only this process while the
  server keeps answering; SIGTERM (its normal stop at exit) and a kill of the process group
  still end it, so it can never outlive the command;
- the first SIGINT mutes console output (Prefect's "Crash detected" lines, library warnings,
  thread tracebacks) and raises KeyboardInterrupt as Python does: the flow engine marks the run
  Crashed while the API is up, and the CLI prints one line and exits 130;
- a watchdog ends the process ``DEADLINE_S`` after the first SIGINT whatever it is waiting for
  (a worker thread still inside a candidate, a slow shutdown); a second SIGINT ends it at once.

Every finished candidate is already on disk (``evals/``, ``state.json``, checkpoints), so a rerun
of the same command resumes.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import warnings

MESSAGE = "kdnas: interrupted; rerun the same command to resume"
EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
DEADLINE_S = 4.0
_SERVER_MODULE = "prefect.server.api.server"

_lock = threading.RLock()  # reentrant: a second Ctrl-C may land inside report()
_since: float | None = None  # monotonic time of the first SIGINT
_reported = False
_bar_on_line = False  # a progress bar was drawn on stderr's current line when output was muted


def requested() -> bool:
    return _since is not None


def report() -> int:
    """Print the one line (once, whichever thread gets here first) and return the exit code."""
    global _reported
    with _lock:
        if not _reported:
            _reported = True
            # After a live progress bar the cursor sits at the end of its line: without the
            # newline the message would be glued to the bar ("...loss=0.64]kdnas: interrupted").
            print(("\n" if _bar_on_line else "") + MESSAGE, file=sys.stderr, flush=True)
    return EXIT_CODE


class Handler:
    """Ctrl-C handling around one CLI command (see the module docstring). Used as
    ``with Handler(debug) as h: return run()`` followed by ``return h.exit_code``: an interrupt
    is swallowed here, after its one line, unless ``debug`` asks for the traceback."""

    exit_code = EXIT_CODE

    def __init__(self, debug: bool = False):
        self.debug = debug
        self._previous = None

    def __enter__(self) -> Handler:
        global _since, _reported, _bar_on_line
        _since, _reported, _bar_on_line = None, False, False
        shield_prefect_server()
        # Registered first, so it runs last: after Prefect's own exit handlers (log and event
        # flushes, the server's stop) and before the interpreter's teardown, which takes seconds
        # with torch loaded and during which the watchdog can no longer run.
        atexit.unregister(_exit_if_interrupted)
        atexit.register(_exit_if_interrupted)
        # Not in the main thread (an embedding application), or started with SIGINT ignored
        # (`nohup`, a background job of a non-interactive shell): leave SIGINT as it is.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind, err, tb) -> bool:
        # After an interrupt ours stays: a second Ctrl-C while the process winds down ends it.
        if self._previous is not None and not requested():
            signal.signal(signal.SIGINT, self._previous)
        interrupted = kind is not None and (issubclass(kind, KeyboardInterrupt) or
                                            (requested() and issubclass(kind, Exception)))
        if not interrupted or self.debug:
            return False
        report()
        return True

    def _on_sigint(self, signum, frame) -> None:
        global _since
        if _since is not None:  # second Ctrl-C: no more waiting
            _exit_now()
        _since = time.monotonic()
        if not self.debug:
            _mute()
        threading.Thread(target=_watchdog, name="kdnas-interrupt", daemon=True).start()
        raise KeyboardInterrupt


def _mute() -> None:
    """Nothing but our one line on stderr from now on: console log handlers (Prefect's
    included) raised above CRITICAL, warnings and exceptions in other threads dropped. Prefect's
    API log handler still sends the run's last lines to the server."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for logger in loggers:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL + 1)
    if logging.lastResort is not None:
        logging.lastResort.setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")
    # A progress bar being unwound clears its line on close ("\r<spaces>\r"); a disabled bar
    # writes nothing. The last one drawn stays on screen, so the message starts a new line.
    global _bar_on_line
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        _bar_on_line = _bar_on_line or not bar.disable
        bar.disable = True
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None


def _exit_if_interrupted() -> None:
    if _since is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def _watchdog() -> None:
    time.sleep(max(0.0, DEADLINE_S - (time.monotonic() - (_since or 0.0))))
    _exit_now()


def _exit_now() -> None:
    """The hard stop: the one line, the ephemeral server stopped (atexit handlers do not run
    after os._exit), exit 130."""
    report()
    server = sys.modules.get(_SERVER_MODULE)
    for instance in list(getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {}).values()):
        proc = getattr(instance, "server_process", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=0.5)
            except Exception:  # noqa: BLE001 - still there: kill it
                proc.kill()
    os._exit(EXIT_CODE)


def shield_prefect_server() -> None:
    """Start Prefect's ephemeral API server (when this process starts one) with SIGINT blocked.

    Applied when Prefect's server module is first imported, not before: importing it costs
    seconds, which a command that fails validation, or never uses Prefect, should not pay."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        return
    if _SERVER_MODULE in sys.modules:
        _patch(sys.modules[_SERVER_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``_patch`` on Prefect's server module right after it is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _SERVER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the regular finders, this one removed
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch(server) -> None:
    cls = getattr(server, "SubprocessASGIServer", None)
    start = getattr(cls, "_run_uvicorn_command", None)
    if start is None or getattr(start, "_kdnas_shielded", False):
        return

    def run_uvicorn_without_sigint(self):
        # The child inherits the calling thread's signal mask; this thread's is restored at once.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return start(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    run_uvicorn_without_sigint._kdnas_shielded = True
    cls._run_uvicorn_command = run_uvicorn_without_sigint
