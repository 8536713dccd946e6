"""The `lab` commands of README.md and of every docs/ page, taken from the files as they are, so that neither can go
stale; and the docs site itself, built as CI builds it.

`lab train` lines must compose (`--cfg job`: a typo in an override or Hydra's grammar fails here);
`lab sweep` lines must validate and create their study (`--prepare`), or, needing a GPU, say so in one
line; a sweep on a database of another host prepares the same on a journal file here; `lab best/confirm/report/
ensemble/predict` lines run for real after a small quickstart sweep. The lines that need a cluster, a server of
another host or the internet (`--launcher slurm`, `lab worker`, `lab server`, `lab data fetch`) and `lab export`
(run in test_export.py) are parsed by lab's own argument parser, their launcher settings checked: a misspelt option
fails here. A line in docs/ that repeats one of the README's runs once.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHELL_WORDS = {"do", "then", "nohup", "srun", "exec", "time"}  # what may stand before `lab` on a line


def bash_commands(text: str) -> list[list[str]]:
    """Every `lab ...` command of TEXT's bash blocks, as argv after `lab`: comments and [optional] parts cut, lines
    continued with a backslash joined, `VAR=...`/`export VAR=...` of the page and a `for V in FIRST ...` loop's
    first value substituted, `nohup`/`srun`/`do`/`VAR=value` before `lab` and redirections after it dropped."""
    commands, shell_vars = [], {}  # a reader's shell keeps a page's variables from one block to the next
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s\[[^\]]*\]", "", line)  # `[--export PATH]`: an optional part, not typed
            if m := re.match(r"\s*(?:export\s+)?(\w+)=(\S+)\s*(?:#.*)?$", line):
                shell_vars[m[1]] = m[2]
                continue
            if m := re.match(r"\s*for (\w+) in (\S+)", line):
                shell_vars[m[1]] = m[2]
            line = re.sub(r"\$\((\w+)\)", r"\1", line)  # $(hostname) -> hostname
            line = re.sub(r"\$(\w+)", lambda m: shell_vars.get(m[1], m[0]), line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for word in [*lexer, ";"]:
                if word in (";", "&", "&&", "|", "||"):
                    commands += lab_argv(segment)
                    segment = []
                else:
                    segment.append(word)
    return commands


def lab_argv(words: list[str]) -> list[list[str]]:
    while words and (words[0] in SHELL_WORDS or re.fullmatch(r"\w+=\S*", words[0])):
        words = words[1:]
    if not words or words[0] not in ("lab", ".venv/bin/lab"):
        return []
    cut = next((i for i, w in enumerate(words) if w[0] in "<>"), len(words))  # `> worker.log 2>&1`
    if cut < len(words) and words[cut - 1].isdigit():
        cut -= 1
    return [words[1:cut]]


def all_commands() -> list[tuple[list[str], str]]:
    """(argv, file) for the README's lines, then every docs page's, each distinct command once."""
    seen, commands = set(), []
    for path in (README, *DOCS):
        for argv in bash_commands(path.read_text()):
            if tuple(argv) not in seen:
                seen.add(tuple(argv))
                commands.append((argv, path.relative_to(ROOT).as_posix()))
    return commands


COMMANDS = all_commands()
ARGVS = [argv for argv, _ in COMMANDS]


def ids(entry) -> str:
    argv, where = entry
    return f"{where}: {shlex.join(argv)}"


def own_files() -> dict[str, str]:
    """The files the README and docs show as python/yaml blocks whose first line is `# ./PATH`: the recipes'
    dataset and model, written where a reader would put them."""
    files = {}
    for path in (README, *DOCS):
        for text in re.findall(r"```(?:python|yaml)\n(.*?)```", path.read_text(), flags=re.DOTALL):
            if m := re.match(r"# \./(\S+)\n", text):
                files[m[1]] = text[m.end():]
    return files


def remote(argv: list[str]) -> bool:
    """A sweep line whose storage is a database on another host."""
    return any(a.startswith("--storage") for a in argv) and any("postgresql://" in a for a in argv)


def test_readme_and_docs_show_every_lab_command():
    from lab.cli import COMMANDS as SUBCOMMANDS

    readme = {argv[0] for argv, where in COMMANDS if where == "README.md"}
    assert readme >= {"train", "sweep", "worker", "best", "report"}
    assert {argv[0] for argv in ARGVS} >= {name for name, _, _ in SUBCOMMANDS}
    assert {"mydata.py", "conf/data/mydata.yaml", "mynets.py", "conf/model/mine.yaml"} <= set(own_files())


def test_the_shell_lines_are_read_as_a_shell_reads_them():
    text = ("```bash\nexport STORAGE=postgresql://lab@db/optuna   # a comment\n```\n\n```bash\nfor gpu in 0 1; do\n"
            "  CUDA_VISIBLE_DEVICES=$gpu nohup lab worker s.yaml --storage $STORAGE \\\n"
            "      --worker-id $(hostname)-gpu$gpu > worker-$gpu.log 2>&1 &\ndone\n"
            "for s in 0 1 2; do lab train seed=$s 'model.net.hidden=[1,2]'; done\n"
            "lab best s.yaml [--export PATH]   # ; lab not-this\nsrun lab report s.yaml\nmake ui\n```\n")
    assert bash_commands(text) == [
        ["worker", "s.yaml", "--storage", "postgresql://lab@db/optuna", "--worker-id", "hostname-gpu0"],
        ["train", "seed=0", "model.net.hidden=[1,2]"], ["best", "s.yaml"], ["report", "s.yaml"]]


def test_the_docs_site_builds_strict(tmp_path):
    """mkdocs-material over docs/ with mkdocs.yml's nav: a broken link or anchor, or a page left out of nav, fails."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "sweeps" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("entry", [c for c in COMMANDS if c[0][0] == "train" and "experiment=quickstart_best" not in
                                   c[0]], ids=ids)  # the replay of an export: run after the sweep, below
def test_readme_train_line_composes(entry, lab, workdir):
    argv, _ = entry
    tmp, _ = workdir
    for name, text in own_files().items():  # the recipes' own dataset and model, for `data=mydata`, `model=mine`
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    done = lab(*argv, *([] if "--cfg" in argv else ["--cfg", "job"]))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # imports torch
def test_the_recipes_dataset_and_model_work(tmp_path, monkeypatch):
    """What `--cfg job` does not reach: the recipes' Python, imported as lab imports it (the working folder on
    sys.path), the dataset loading a small .npz of each layout and the net classifying its images."""
    import numpy as np
    import torch

    for name, text in own_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mydata import NpzImages
    from mynets import TinyNet

    rng = np.random.default_rng(0)
    for shape in ((30, 8, 8), (30, 3, 8, 8)):
        np.savez(tmp_path / "mine.npz", x=rng.integers(0, 256, shape, dtype=np.uint8), y=np.arange(30) % 3)
        loaded = NpzImages(path=str(tmp_path / "mine.npz"), batch_size=4).load()
        assert loaded.train.x.shape == (30, 1 if len(shape) == 3 else 3, 8, 8) and loaded.train.x.dtype == torch.uint8
        assert loaded.class_names == ["0", "1", "2"] and loaded.test is None
    probs = TinyNet(in_shape=(3, 8, 8), num_classes=3)(loaded.train.x[:5].float()).softmax(1)
    assert probs.shape == (5, 3)


@pytest.fixture
def sweeps_dir(workdir):
    """The shipped sweeps/ in the working directory, where the README's relative paths find them."""
    tmp, _ = workdir
    shutil.copytree(ROOT / "sweeps", tmp / "sweeps")
    for name in ("flower_photos", "cats_dogs"):  # as `lab data fetch` leaves them: the sweeps check data.root
        (tmp / "data" / name).mkdir(parents=True)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [c for c in COMMANDS if c[0][0] == "sweep" and "--launcher" not in c[0]], ids=ids)
def test_readme_sweep_line_validates(entry, lab, sweeps_dir, workdir):
    argv, _ = entry
    tmp, _ = workdir
    if remote(argv):  # the database of the cluster page: the same line on a journal file here
        argv = [a if "postgresql://" not in a else str(tmp / "runs" / "remote.journal") for a in argv]
        (tmp / "runs").mkdir(exist_ok=True)
    done = lab(*argv, *([] if "--prepare" in argv else ["--prepare"]),
               env_extra={"HOME": str(tmp)} if any(a.startswith("~") for a in argv) else None)
    if "--workers-per-gpu" in argv:  # CI has no GPU: the flag is refused in one sentence, nothing created
        assert done.returncode == 2 and "needs GPUs" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepared study" in done.stdout


PARSED_ONLY = [c for c in COMMANDS if c[0][0] in ("worker", "server", "export", "data")
               or (c[0][0] == "sweep" and "--launcher" in c[0])
               or (c[0][0] == "predict" and (c[0][1].endswith(".onnx") or c[0][1] == "RUN_ID"))]


@pytest.mark.parametrize("entry", PARSED_ONLY, ids=ids)
def test_a_line_for_a_cluster_or_the_internet_parses(entry):
    """lab's own parser takes the line (argparse exits 2 on an option it does not know); a SLURM line's
    launcher.KEY=VALUE settings load as `lab sweep --launcher slurm` loads them."""
    from lab import arguments

    argv, _ = entry
    args = arguments.parse(argv)
    if getattr(args, "launcher", None) == "slurm":
        import yaml

        from lab.sweep.slurm import settings

        spec = yaml.safe_load((ROOT / args.sweep_file).read_text())
        settings.check(settings.load(spec.get("launcher") or {}, settings.take_overrides(args), args.sweep_file))
        assert args.workers >= 1


def test_every_line_is_run_composed_or_parsed():
    run_after = ("best", "confirm", "report", "ensemble", "predict")
    covered = {id(c) for c in PARSED_ONLY}
    left = [ids(c) for c in COMMANDS if id(c) not in covered and c[0][0] not in (*run_after, "train", "sweep")]
    assert not left, left


@pytest.mark.slow
def test_readme_after_a_sweep_lines_run(lab, sweeps_dir, workdir):
    """The quickstart chain as the README and docs/results.md tell it: sweep, best, replay, report, confirm,
    ensemble (shortened by --n-trials and max_epochs on the sweep only; what follows adopts them from the study)."""
    done = lab("sweep", "sweeps/quickstart.yaml", "--workers", "2", "--no-live", "--n-trials", "3",
               "trainer.max_epochs=1", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    after = [c for c in ARGVS if c[0] in ("best", "confirm", "report", "ensemble")
             or (c[0] == "train" and "experiment=quickstart_best" in c)]
    assert [c[0] for c in after][:2] == ["best", "train"]
    assert {c[0] for c in after} == {"best", "train", "report", "confirm", "ensemble"}
    for argv in after:
        if argv[0] == "confirm":
            argv = [a if a != "3" else "2" for a in argv]  # --top 2 --seeds 2: the same code, a quarter of the time
        done = lab(*argv, timeout=900)
        assert done.returncode == 0, (argv, done.stdout + done.stderr)
    predict_lines(lab, *workdir)


def predict_lines(lab, tmp: Path, env: dict):
    """The `lab predict` lines, after the chain above registered quickstart@champion: their example files
    made here (photos/ and cat.jpg), their example run id and checkpoint replaced by the champion's own."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = client.get_model_version_by_alias("quickstart", "champion").run_id
    rng = np.random.default_rng(0)
    # The "Using the models" lines; the ONNX file's line runs in test_export.py, RUN_ID's in test_first_contact3.py.
    lines = [c for c in ARGVS if c[0] == "predict" and not c[1].endswith(".onnx") and c[1] != "RUN_ID"]
    assert len(lines) == 4
    for argv in lines:
        for name in (a for a in argv[2:] if not a.startswith("-") and a != "predictions.csv"):
            if name.endswith("/"):
                (tmp / name).mkdir(exist_ok=True)
                for i in range(3):
                    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp / name / f"{i}.png")
            else:
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / name)
        model = argv[1]
        if re.fullmatch(r"[0-9a-f]{32}", model):
            model = run_id
        elif model.endswith(".ckpt"):
            model = client.get_run(run_id).data.tags["checkpoint"]
        done = lab("predict", model, *argv[2:], timeout=600)
        assert done.returncode == 0, (argv, done.stdout + done.stderr)
        assert "photos/0.png" in done.stdout, done.stdout
