"""sylva_jax.progress: a tqdm bar on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import io

from sylva_jax.progress import Progress, track


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_lines_every_interval_with_eta_when_not_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    with Progress(10, "mmlu", unit="question", every_s=30, file=out, clock=clock) as p:
        for i in range(10):
            clock.t += 10.0  # 10 s per question
            p.update()
            if i == 4:
                p.set_postfix(acc=0.4)
    lines = out.getvalue().splitlines()
    # a line at 30 s, 60 s, 90 s (3, 6, 9 done), then the closing line at 100 s
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert lines[0] == "mmlu: 3/10 question (30%), 30.0 s elapsed, ETA 70.0 s"
    assert lines[1].endswith("ETA 40.0 s [acc=0.4]")
    assert "ETA" not in lines[-1] and "100%" in lines[-1]
    assert not out.getvalue().count("\r")  # no bar in a log file


def test_bar_on_a_terminal_and_log_function_and_silence():
    tty = Tty()
    for _ in track(range(5), "masks", file=tty):
        pass
    text = tty.getvalue()
    assert "masks" in text and "5/5" in text and "\r" in text  # tqdm redraws in place

    seen = []
    with Progress(None, "export", log=seen.append, every_s=0, clock=FakeClock()) as p:
        p.update(3)
        p.write("wrote adapter_config.json")
        p.update(1)
    assert seen == ["export: 3 it, 0.0 s elapsed", "wrote adapter_config.json", "export: 4 it, 0.0 s elapsed"]

    quiet = io.StringIO()
    with Progress(4, "x", file=quiet, enabled=False, every_s=0) as p:
        p.update(4)
        p.write("hidden")
    assert quiet.getvalue() == "" and p.n == 4


def test_track_counts_len_and_generators():
    clock, out = FakeClock(), io.StringIO()
    assert list(track(iter([1, 2, 3]), "gen", file=out, clock=clock)) == [1, 2, 3]
    assert out.getvalue().strip() == "gen: 3 it, 0.0 s elapsed"  # unknown total: no percent
    out2 = io.StringIO()
    assert sum(track([1, 2], "list", file=out2, clock=clock)) == 3
    assert out2.getvalue().strip() == "list: 2/2 it (100%), 0.0 s elapsed"


def test_quick_stages_stay_silent_with_delay():
    clock, out = FakeClock(), io.StringIO()
    with Progress(3, "quick", file=out, every_s=0, delay_s=5, clock=clock) as p:
        clock.t = 1.0
        p.update(3)
    assert out.getvalue() == ""
    with Progress(3, "slow", file=out, every_s=0, delay_s=5, clock=clock) as p:
        clock.t += 6.0
        p.update(1)
    assert out.getvalue().splitlines() == ["slow: 1/3 it (33%), 6.0 s elapsed, ETA 12.0 s"]  # not twice
