"""`lab`'s argument parsing: where Hydra overrides may stand, and what is refused."""
import pytest

from lab.cli import parse_args


@pytest.mark.parametrize("argv", [
    ["sweep", "s.yaml", "a=1", "b=2", "--workers", "2", "--no-live"],
    ["sweep", "s.yaml", "--workers", "2", "a=1", "--no-live", "b=2"],
    ["sweep", "s.yaml", "--workers", "2", "--no-live", "a=1", "b=2"],
])
def test_overrides_stand_anywhere_after_the_sweep_file(argv):
    args = parse_args(argv)
    assert (args.sweep_file, args.workers, args.no_live, args.overrides) == ("s.yaml", 2, True, ["a=1", "b=2"])


def test_worker_takes_overrides_after_options():
    args = parse_args(["worker", "s.yaml", "--storage", "x.journal", "trainer.max_epochs=1"])
    assert args.storage == "x.journal" and args.overrides == ["trainer.max_epochs=1"]


@pytest.mark.parametrize("argv, bad", [
    (["sweep", "s.yaml", "--wrokers", "2"], "--wrokers"),
    (["best", "s.yaml", "lr=1"], "lr=1"),  # `lab best` applies no overrides
])
def test_unknown_arguments_are_named(argv, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err
