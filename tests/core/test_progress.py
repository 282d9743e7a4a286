"""Progress of long steps: bars only when asked for, and throttled lines for a log."""

from kdnas_core.progress import Step, duration, every, track


def test_a_bar_is_drawn_only_when_progress_is_true(capsys):
    steps = []
    for progress in (False, steps.append):
        assert list(track(range(3), "embed", progress, "batch")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # neither off nor a callable draws a bar
    assert [(s.done, s.total, s.unit) for s in steps] == [(1, 3, "batch"), (2, 3, "batch"), (3, 3, "batch")]
    list(track(range(3), "embed", True, "batch"))
    assert "embed" in capsys.readouterr().err


def test_a_step_reads_as_a_log_line():
    assert str(Step("distill", 120, 400, "step", 30.0, 80.0, {"loss": 0.4123})) == "distill: step 120/400, loss 0.4123, ETA 1m20s"
    assert str(Step("latency", 2, 2, "backend", 7.4, 0.0)) == "latency: backend 2/2, took 7s"
    assert [duration(s) for s in (0.4, 59, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]


def test_every_writes_the_first_step_then_one_per_interval_and_the_end_of_a_long_bar():
    now, lines = [0.0], []
    report = every(10, lines.append, clock=lambda: now[0])
    for i in range(1, 31):  # a 30 s bar, one step a second
        now[0] = float(i)
        report(Step("distill", i, 30, "step", float(i), float(30 - i)))
    assert [line.split(",")[0] for line in lines] == ["distill: step 1/30", "distill: step 11/30",
                                                       "distill: step 21/30", "distill: step 30/30"]
    lines.clear()
    now[0] += 1  # a bar that ends within the interval is not written at its end
    report(Step("embed", 1, 1, "batch", 0.5, 0.0))
    assert lines == []
