"""kdnas.interrupt on its own, in seconds: Ctrl-C gives one line and exit code 130, SIGTERM and
SIGHUP the same line and 143 and 129, a thread still busy cannot hold the process past the
deadline, a second signal stops at once, --debug keeps the traceback, and Prefect's ephemeral
server is started with SIGINT and SIGHUP blocked but SIGTERM deliverable. (A whole search
interrupted under Prefect and resumed: tests/reliability/test_interrupt.py.)"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from kdnas import interrupt
from tests.conftest import sigint_default

ROOT = Path(__file__).resolve().parents[2]
# main() in miniature: a command that sleeps (optionally next to a busy non-daemon thread, as a
# candidate distilled on a task-runner thread), under the same Handler as the CLI.
SCRIPT = """
import sys, threading, time
from kdnas import interrupt

def main():
    with interrupt.Handler(debug="debug" in sys.argv) as handled:
        if "busy-thread" in sys.argv:
            threading.Thread(target=time.sleep, args=(60,)).start()
        if "progress-bar" in sys.argv:
            from tqdm import tqdm
            bar = tqdm(total=100, desc="distill", mininterval=0)
            bar.update(10)
        print("ready", flush=True)
        if "print-patched" in sys.argv:  # as Prefect's log_prints does in a run: print becomes a log record
            import builtins
            builtins.print = lambda *args, **kwargs: None
        time.sleep(60)
        return 0
    return handled.exit_code

sys.exit(main())
"""


def run_and_interrupt(*flags: str, signals: int = 1, sig: int = signal.SIGINT,
                      then: int | None = None) -> tuple[int, float, str]:
    """Start the miniature, send ``sig`` to its process group ``signals`` times (the later ones
    ``then`` if given) and return its exit code, the seconds it took to stop, its stderr."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=sigint_default)
    try:
        assert proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for i in range(signals):
            if i:
                time.sleep(0.3)
            os.killpg(proc.pid, sig if i == 0 or then is None else then)
        rc = proc.wait(timeout=20)
        return rc, time.monotonic() - start, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_prints_one_line_and_exits_130():
    rc, took, err = run_and_interrupt()
    assert (rc, err) == (130, interrupt.MESSAGE + "\n") and took < 2


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_as_ctrl_c_does(sig, code):
    rc, took, err = run_and_interrupt(sig=sig)
    assert (rc, err) == (code, interrupt.MESSAGE + "\n") and took < 2


def test_a_second_signal_of_another_kind_stops_at_once_with_the_first_ones_code():
    rc, took, err = run_and_interrupt("busy-thread", signals=2, sig=signal.SIGTERM, then=signal.SIGINT)
    assert (rc, err) == (143, interrupt.MESSAGE + "\n") and took < 2


def test_sighup_ignored_at_start_stays_ignored():
    """`nohup kdnas search ...`: a closed terminal must not stop the command."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not hasattr(os, "forkpty"), reason="needs a pseudo-terminal")
def test_a_closed_terminal_exits_129_though_nothing_can_be_written():
    """Closing the terminal hangs it up: SIGHUP arrives to the session, and every write to the
    terminal, the message included, fails (EIO). That failure must not replace the exit code."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session leader whose controlling terminal is the pty
        sigint_default()
        os.execve(sys.executable, [sys.executable, "-c", SCRIPT], {**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        seen = b""
        while b"ready\r\n" not in seen:
            seen += os.read(terminal, 1024)
        time.sleep(0.3)  # the child is asleep, past its last write
    finally:
        os.close(terminal)
    deadline = time.monotonic() + 20
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("still running 20 s after its terminal closed")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 129


def test_a_busy_thread_cannot_hold_the_process_past_the_deadline():
    rc, took, err = run_and_interrupt("busy-thread")
    assert (rc, err) == (130, interrupt.MESSAGE + "\n")
    assert interrupt.DEADLINE_S - 0.5 < took < 5


def test_a_second_ctrl_c_stops_at_once():
    rc, took, err = run_and_interrupt("busy-thread", signals=2)
    assert (rc, err) == (130, interrupt.MESSAGE + "\n") and took < 2


def test_a_second_signal_inside_a_prefect_run_still_prints_the_line():
    """Inside a flow run with log_prints, Prefect's print sends even print(file=sys.stderr) to the
    run logger, which the first signal muted: the line must not go through print."""
    rc, took, err = run_and_interrupt("busy-thread", "print-patched", signals=2, sig=signal.SIGTERM)
    assert (rc, err) == (143, interrupt.MESSAGE + "\n") and took < 2


def test_the_line_after_a_progress_bar_starts_a_line_of_its_own():
    rc, _, err = run_and_interrupt("progress-bar")
    bar, message = err.rsplit("\n", 2)[:2] if err.count("\n") >= 2 else (err, "")
    assert rc == 130 and message == interrupt.MESSAGE, err
    assert "distill:  10%" in bar and interrupt.MESSAGE not in bar, err


def test_debug_keeps_the_traceback():
    rc, _, err = run_and_interrupt("debug")
    assert rc == 130 and "Traceback" in err and "KeyboardInterrupt" in err


def blocked_signals(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(x for x in status.splitlines() if x.startswith("SigBlk:")).split()[1], 16)
    return {s for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM) if mask & (1 << (s - 1))}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_the_server_process_starts_with_sigint_and_sighup_blocked_and_this_thread_keeps_its_mask():
    class SubprocessASGIServer:  # stands in for Prefect's: its method starts the server process
        def _run_uvicorn_command(self):
            return subprocess.Popen(["sleep", "30"])

    interrupt._patch(types.SimpleNamespace(SubprocessASGIServer=SubprocessASGIServer))
    proc = SubprocessASGIServer()._run_uvicorn_command()
    try:
        # SIGTERM stays deliverable: it is how Prefect stops the server at exit
        assert blocked_signals(proc.pid) == {signal.SIGINT, signal.SIGHUP}
        assert not {signal.SIGINT, signal.SIGHUP} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_prefects_own_server_class_and_flow_engine_are_patched_when_they_are_imported():
    """Guards a Prefect upgrade: the method that starts the server, and the flow engine's SIGTERM
    handler, must still be there."""
    code = ("import sys; from kdnas import interrupt; interrupt.shield_prefect()\n"
            "assert 'prefect.server.api.server' not in sys.modules\n"
            "from prefect.server.api.server import SubprocessASGIServer as S\n"
            "assert S._run_uvicorn_command._kdnas_shielded\n"
            "import prefect.flow_engine as e\n"
            "assert e.capture_sigterm._kdnas_shielded\n"
            "assert not any(isinstance(f, interrupt._PatchOnImport) for f in sys.meta_path)")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_flow_engine_keeps_its_sigterm_handler_unless_ours_is_installed():
    """Ours raises KeyboardInterrupt, which the engine reports as Ctrl-C; Prefect's would end
    the process by the default action after marking the run, skipping the server's stop."""
    seen = []

    @contextlib.contextmanager
    def capture_sigterm():  # stands in for prefect.utilities.engine.capture_sigterm
        seen.append("prefect")
        yield

    engine = types.SimpleNamespace(capture_sigterm=capture_sigterm)
    interrupt._patch_engine(engine)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with engine.capture_sigterm():
            pass
        signal.signal(signal.SIGTERM, interrupt._on_signal)
        with engine.capture_sigterm():
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["prefect"]


def run_into_a_closed_pipe(*args: str, buffered: bool) -> tuple[int, str]:
    """``kdnas <args> | head -1`` once head has exited: stdout is a pipe nobody reads. Python
    block-buffers a piped stdout unless PYTHONUNBUFFERED is set; both are tried."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if not buffered or k != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run([sys.executable, "-m", "kdnas", *args], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**env, **({} if buffered else {"PYTHONUNBUFFERED": "1"}),
                                   "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(buffered):
    """As `yes | head -1` ends `yes`: no message (the reader has what it wanted), 128 + SIGPIPE."""
    assert run_into_a_closed_pipe("arch", "L1-H32-A2-F64-gelu", buffered=buffered) == (141, "")


def test_only_stdouts_reader_going_away_is_quiet(monkeypatch):
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert not interrupt.output_closed(BrokenPipeError())  # stdout is read: another pipe broke, an error
        os.close(read_end)
        assert not interrupt.output_closed(ConnectionResetError())
        assert interrupt.output_closed(BrokenPipeError())
        out.write("x" * 100_000)
        out.flush()  # what the interpreter's exit does: stdout now goes nowhere, without an error
