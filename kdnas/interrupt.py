"""Ctrl-C, SIGTERM or SIGHUP during a kdnas command: stopped within seconds, one line on stderr,
exit code 128 + the signal's number (130, 143, 129).

A terminal sends SIGINT to its whole foreground process group (and SIGHUP to it when it closes).
Under Prefect (3.9.1) that group also holds the ephemeral API server:
``SubprocessASGIServer._run_uvicorn_command`` (prefect/server/api/server.py) starts it with a
plain ``subprocess.Popen``. Ctrl-C therefore stopped the server at the moment the flow engine
began to report the interrupt to it (``FlowRunEngine.handle_crash``, prefect/flow_engine.py), and
the client retried every state update against the dead server with exponential back-off
(``_send_with_retry``, prefect/client/base.py: 2**n s, 5 retries): minutes of waiting, pages of
tracebacks, and a flow run left "Running". SIGTERM (a service manager, ``kill``) went past us
altogether: the flow engine's own handler (``capture_sigterm``, prefect/utilities/engine)
marked the run Crashed, then re-sent SIGTERM with the default action, which ends the process
without its exit handlers, so the server, reparented to init, went on listening. Here:

- the ephemeral server starts with SIGINT and SIGHUP blocked (a signal mask survives fork and
  exec, and uvicorn installs handlers but never unblocks), so a signal to the process group
  reaches only this process while the server keeps answering; SIGTERM (its normal stop at exit)
  and a kill of the process group still end it, so it can never outlive the command;
- SIGINT, SIGTERM and SIGHUP take the same path, and the flow engine's SIGTERM handler is not
  installed while ours is: the first signal mutes console output (Prefect's "Crash detected"
  lines, library warnings, thread tracebacks) and raises KeyboardInterrupt as Python does for
  SIGINT: the flow engine marks the run Crashed while the API is up, Prefect's exit handlers
  stop the server, and the CLI prints one line and exits;
- a watchdog ends the process ``DEADLINE_S`` after the first signal whatever it is waiting for
  (a worker thread still inside a candidate, a slow shutdown), stopping the server itself; a
  second signal does so at once. The exit code is the first signal's.

A signal ignored when the command starts (``nohup`` ignores SIGHUP, a background job of a
non-interactive shell SIGINT) stays ignored. Every finished candidate is already on disk
(``evals/``, ``state.json``, checkpoints), so a rerun of the same command resumes.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.util
import logging
import os
import select
import signal
import sys
import threading
import time
import warnings

MESSAGE = "kdnas: interrupted; rerun the same command to resume"
EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
DEADLINE_S = 4.0
PIPE_EXIT_CODE = 141  # 128 + SIGPIPE, what `yes | head -1` reports for `yes`
# SIGHUP does not exist on Windows
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# A signal to the process group must reach only us; SIGTERM is left out: Prefect stops the server with it.
_SHIELDED = {s for s in SIGNALS if s != getattr(signal, "SIGTERM", None)}
_SERVER_MODULE = "prefect.server.api.server"
_ENGINE_MODULE = "prefect.flow_engine"

_lock = threading.RLock()  # reentrant: a second signal may land inside report()
_since: float | None = None  # monotonic time of the first signal
_signum: int | None = None  # the first signal
_debug = False
_reported = False
_bar_on_line = False  # a progress bar was drawn on stderr's current line when output was muted


def requested() -> bool:
    return _since is not None


def exit_code() -> int:
    """128 + the first signal's number, as shells report a command that a signal ended."""
    return 128 + _signum if _signum is not None else EXIT_CODE


def report() -> int:
    """Print the one line (once, whichever thread gets here first) and return the exit code."""
    global _reported
    with _lock:
        if not _reported:
            _reported = True
            # After a live progress bar the cursor sits at the end of its line: without the
            # newline the message would be glued to the bar ("...loss=0.64]kdnas: interrupted").
            try:
                # Not print(): inside a flow run with log_prints Prefect's print sends even
                # print(file=sys.stderr) to the run logger, muted by then.
                sys.stderr.write(("\n" if _bar_on_line else "") + MESSAGE + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # a hung-up terminal (EIO) or a closed stderr: the exit code says it
                pass
    return exit_code()


class Handler:
    """Signal handling around one CLI command (see the module docstring). Used as
    ``with Handler(debug) as h: return run()`` followed by ``return h.exit_code``: an interrupt
    is swallowed here, after its one line, unless ``debug`` asks for the traceback."""

    def __init__(self, debug: bool = False):
        self.debug = debug
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return exit_code()

    def __enter__(self) -> Handler:
        global _since, _signum, _debug, _reported, _bar_on_line
        _since, _signum, _debug, _reported, _bar_on_line = None, None, self.debug, False, False
        shield_prefect()
        # Registered first, so it runs last: after Prefect's own exit handlers (log and event
        # flushes, the server's stop) and before the interpreter's teardown, which takes seconds
        # with torch loaded and during which the watchdog can no longer run.
        atexit.unregister(_exit_if_interrupted)
        atexit.register(_exit_if_interrupted)
        # Not in the main thread (an embedding application): leave the handlers as they are.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, _on_signal)
        return self

    def __exit__(self, kind, err, tb) -> bool:
        # After an interrupt ours stay: a second signal while the process winds down ends it.
        if not requested():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        interrupted = kind is not None and (issubclass(kind, KeyboardInterrupt) or
                                            (requested() and issubclass(kind, Exception)))
        if not interrupted or self.debug:
            return False
        report()
        return True


def _on_signal(signum, frame) -> None:
    global _since, _signum
    if _since is not None:  # second signal: no more waiting
        _exit_now()
    _since, _signum = time.monotonic(), signum
    if not _debug:
        _mute()
    threading.Thread(target=_watchdog, name="kdnas-interrupt", daemon=True).start()
    raise KeyboardInterrupt


def console_handlers() -> list[logging.StreamHandler]:
    """Every console log handler of this process (stream handlers that are not files, Prefect's
    included), each once."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    return list({h: None for logger in loggers for h in logger.handlers
                 if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)})


def _mute() -> None:
    """Nothing but our one line on stderr from now on: console log handlers (Prefect's
    included) raised above CRITICAL, warnings and exceptions in other threads dropped. Prefect's
    API log handler still sends the run's last lines to the server."""
    for h in console_handlers():
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


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a hung-up terminal, a closed pipe: nothing to save
            pass


def output_closed(err: BaseException) -> bool:
    """Whether ``err`` is stdout's reader having gone (`kdnas embed | head -1`): not an error, the
    reader has what it wanted, so no message. Any other broken pipe (a socket, a child's pipe)
    still is one. Python ignores SIGPIPE, so the write fails with EPIPE instead of ending the
    process silently as it would end a C program."""
    if not isinstance(err, BrokenPipeError) or not hasattr(select, "poll"):
        return False
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe without readers
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
        return False
    if gone:
        # The interpreter flushes stdout once more on its way out; that write must not fail too
        # ("Exception ignored ... BrokenPipeError", exit 120).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def _exit_if_interrupted() -> None:
    if _since is not None:
        _flush()
        os._exit(exit_code())


def _watchdog() -> None:
    time.sleep(max(0.0, DEADLINE_S - (time.monotonic() - (_since or 0.0))))
    _exit_now()


def _exit_now() -> None:
    """The hard stop: the one line, the ephemeral server stopped (atexit handlers do not run
    after os._exit), exit 128 + the first signal."""
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
    _flush()
    os._exit(exit_code())


def shield_prefect() -> None:
    """Start Prefect's ephemeral API server (when this process starts one) with SIGINT and
    SIGHUP blocked, and keep the flow engine's SIGTERM handler out while ours is installed.

    Applied when Prefect's modules are first imported, not before: importing them costs
    seconds, which a command that fails validation, or never uses Prefect, should not pay."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        return
    waiting = False
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            waiting = True
    if waiting and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches Prefect's server and flow-engine modules right after each is imported."""

    def __init__(self):
        self._finding: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PATCHES or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the regular finders (this one declines)
        finally:
            self._finding.discard(fullname)
        if all(name in sys.modules or name == fullname for name in _PATCHES):
            sys.meta_path.remove(self)  # the last one: nothing more to wait for
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            _PATCHES[fullname](module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch(server) -> None:
    cls = getattr(server, "SubprocessASGIServer", None)
    start = getattr(cls, "_run_uvicorn_command", None)
    if start is None or getattr(start, "_kdnas_shielded", False):
        return

    def run_uvicorn_shielded(self):
        # The child inherits the calling thread's signal mask; this thread's is restored at once.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED)
        try:
            return start(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    run_uvicorn_shielded._kdnas_shielded = True
    cls._run_uvicorn_command = run_uvicorn_shielded


def _patch_engine(engine) -> None:
    capture = getattr(engine, "capture_sigterm", None)
    if capture is None or getattr(capture, "_kdnas_shielded", False):
        return

    @contextlib.contextmanager
    def capture_sigterm_unless_ours():
        # Prefect's handler re-sends SIGTERM with the previous action once the run is marked
        # Crashed; the default action skips every exit handler. Ours raises KeyboardInterrupt,
        # which the engine reports as it does Ctrl-C. Elsewhere (a worker's flow-run process,
        # a flow called outside the CLI) Prefect's stays, with its cancellation bridge.
        if signal.getsignal(signal.SIGTERM) is _on_signal:
            yield
        else:
            with capture():
                yield

    capture_sigterm_unless_ours._kdnas_shielded = True
    engine.capture_sigterm = capture_sigterm_unless_ours


_PATCHES = {_SERVER_MODULE: _patch, _ENGINE_MODULE: _patch_engine}
