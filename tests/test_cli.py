"""`lab`'s argument parsing: where Hydra overrides may stand, and what is refused; `lab`, --help, --version."""
import argparse
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from lab.arguments import parse, parser
from lab.cli import COMMANDS, expand_home


@pytest.mark.parametrize("argv", [
    ["sweep", "s.yaml", "a=1", "b=2", "--workers", "2", "--no-live"],
    ["sweep", "s.yaml", "--workers", "2", "a=1", "--no-live", "b=2"],
    ["sweep", "s.yaml", "--workers", "2", "--no-live", "a=1", "b=2"],
])
def test_overrides_stand_anywhere_after_the_sweep_file(argv):
    args = parse(argv)
    assert (args.sweep_file, args.workers, args.no_live, args.overrides) == ("s.yaml", 2, True, ["a=1", "b=2"])


def test_worker_takes_overrides_after_options():
    args = parse(["worker", "s.yaml", "--storage", "x.journal", "trainer.max_epochs=1"])
    assert args.storage == "x.journal" and args.overrides == ["trainer.max_epochs=1"]


@pytest.mark.parametrize("argv, bad", [
    (["sweep", "s.yaml", "--wrokers", "2"], "--wrokers"),
    (["best", "s.yaml", "lr=1"], "lr=1"),  # `lab best` applies no overrides
])
def test_unknown_arguments_are_named(argv, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err


# `lab` itself, run as a user runs it: no command, --help, --version, a misspelt command (issue #10).
def lab(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_version_prints_the_installed_version():
    proc = lab("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"lab {version('lab')}\n", "")


@pytest.mark.parametrize("argv, rc", [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_help_says_what_each_command_does(argv, rc):
    proc = lab(*argv)
    text = proc.stdout if rc == 0 else proc.stderr
    assert proc.returncode == rc, proc.stderr
    assert text.startswith("usage: lab COMMAND") and "Traceback" not in proc.stderr
    for name, _, what in COMMANDS:
        assert any(line.lstrip().startswith(name) and line.rstrip().endswith(what) for line in text.splitlines())


# argparse lists a parser's subcommands and arguments only in private attributes (_actions, _SubParsersAction).


def test_help_lists_exactly_the_commands_there_are():
    subcommands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
    assert {name for name, _, _ in COMMANDS} == {"train", *subcommands}


def test_misspelt_command_gets_a_suggestion():
    proc = lab("trian")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("lab: error: unknown command 'trian'; did you mean train?")
    assert "train, sweep, worker" in line


@pytest.mark.parametrize("arg, expanded", [
    ("data.root=~/flower_photos", "data.root={home}/flower_photos"),
    ("+data.root=~", "+data.root={home}"),
    ("data.root=~/my photos", "data.root='{home}/my photos'"),  # quoted for Hydra's grammar
    ("data.root='~/x'", "data.root='~/x'"),  # quoted for Hydra already: the dataset expands it
    ("data.root=a~b", "data.root=a~b"),
    ("~data.root", "~data.root"),  # Hydra's delete syntax
    ("--config-dir=~/conf", "--config-dir=~/conf"),  # an option of Hydra, not an override
])
def test_leading_tilde_in_an_override_value_is_the_home_folder(arg, expanded, monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    assert expand_home([arg]) == [expanded.format(home="/home/me")]


@pytest.mark.parametrize("argv, expected", [
    (["--cfg", "job"], ["--cfg", "job", "X"]),
    (["--cfg", "job", "data=digits"], ["--cfg", "job", "X", "data=digits"]),
    (["data=digits", "--cfg", "job"], ["X", "data=digits", "--cfg", "job"]),
])
def test_lab_train_puts_its_own_override_among_the_users(argv, expected):
    from lab.cli import with_overrides

    assert with_overrides(argv, ["X"]) == expected


def test_options_are_read_before_torch_mlflow_or_lightning_load():
    """`lab sweep --help` and an option typo answer at once: parsing every command's options imports none of the
    libraries that take seconds (torch ~1.4 s of CPU, Lightning ~4 s, MLflow ~1 s)."""
    code = ("import sys; from lab import arguments, cli; arguments.parse(['sweep', 's.yaml', '--workers', '2']); "
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'mlflow', 'optuna', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr


def test_lab_train_help_is_labs_and_loads_no_training_library():
    proc = lab("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lab train [OVERRIDES...]: train one image classifier")
    assert "powered by Hydra" not in proc.stdout and "data: digits, fashion_mnist" in proc.stdout


def test_every_option_says_what_it_is_for():
    """`lab COMMAND --help` explains every argument (--no-check and --deadline are internal, hidden)."""
    undocumented = [f"{name} {a.dest}" for name, sub in next(
        a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices.items()  # noqa: SLF001
        for a in sub._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    assert undocumented == []


def test_ctrl_c_before_a_command_has_started_is_a_sentence_and_status_130(monkeypatch, capsys):
    from lab import cli

    def pressed(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "quiet_libraries", pressed)  # the first thing main does, imports included
    with pytest.raises(SystemExit) as stop:
        cli.main(["train"])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "lab: interrupted by Ctrl-C before anything had started\n"
