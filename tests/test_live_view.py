"""The sweep's live view as a terminal gets it: redrawn over itself when lines wrap or outnumber the rows."""
import io

from lab.sweep.live import LiveView


def terminal(monkeypatch, columns: int, rows: int) -> io.StringIO:
    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size reads first
    monkeypatch.setenv("LINES", str(rows))
    return io.StringIO()


def test_a_wrapped_line_counts_the_rows_it_takes(monkeypatch):
    out = terminal(monkeypatch, 40, 24)
    view = LiveView(out, live=True)
    view.show(["x" * 60, "  w0 cpu trial 1"])  # 60 characters on a 40-column terminal: two rows
    out.truncate(0), out.seek(0)
    view.show(["x" * 60, "  w0 cpu trial 2"])
    assert out.getvalue().startswith("\x1b[3F\x1b[J" + "x" * 60)  # up three rows, not two


def test_a_view_taller_than_the_terminal_is_cut_to_fit(monkeypatch):
    out = terminal(monkeypatch, 80, 5)
    view = LiveView(out, live=True)
    text = ["counts"] + [f"  w{i} cpu trial {i}" for i in range(9)]
    view.show(text)
    assert out.getvalue() == "counts\n  w0 cpu trial 0\n  w1 cpu trial 1\n... 7 more lines: a taller terminal shows them\n"
    out.truncate(0), out.seek(0)
    view.show(text)
    assert out.getvalue().startswith("\x1b[4F\x1b[J")  # the four rows drawn, all on the screen


def test_a_log_gets_a_line_only_when_counts_or_best_change():
    out = io.StringIO()
    view = LiveView(out, live=False)
    view.show(["s  complete 1  of 4  [00:00:01]", "  w0 cpu trial 1"])
    view.show(["s  complete 1  of 4  [00:00:02]", "  w0 cpu trial 1 epoch 2"])  # the clock and a worker: no line
    view.show(["s  complete 2  of 4  [00:00:03]", "best val/acc=0.5000 (trial 1) {}", "  w0 cpu trial 2"])
    assert out.getvalue().splitlines() == ["s  complete 1  of 4  [00:00:01]",
                                           "s  complete 2  of 4  [00:00:03]  best val/acc=0.5000 (trial 1) {}"]
