"""The README's own `lab` commands, taken from README.md as it is, so that the README cannot go stale.

`lab train` lines must compose (`--cfg job`: a typo in an override or Hydra's grammar fails here);
`lab sweep` lines must validate and create their study (`--prepare`), or, needing a GPU, say so in one
line; `lab best/confirm/report` lines run for real after a small quickstart sweep. `lab data fetch` lines
need the internet and are tested against local archives in test_fetch.py.
"""
import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def readme_commands() -> list[list[str]]:
    """Every `lab ...` line of the README's bash blocks, as argv after `lab`, comments and [optional] parts cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for line in block.splitlines():
            line = re.sub(r"\s\[[^\]]*\]", "", line)  # `[--export PATH]`: an optional part, not typed
            words = shlex.split(line, comments=True)
            if words and words[0] in ("lab", ".venv/bin/lab"):
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_lab_commands():
    assert {c[0] for c in COMMANDS} >= {"train", "sweep", "worker", "best", "confirm", "report", "data"}


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "train" and "experiment=quickstart_best" not in c],
                         ids=shlex.join)  # the replay of an export: run after the sweep, below
def test_readme_train_line_composes(argv, lab, workdir):
    if "model=mine" in argv:  # the README's own-model block: the two files its comments describe
        from test_first_contact3 import MINE, MYNETS

        tmp, _ = workdir
        (tmp / "mynets.py").write_text(MYNETS)
        (tmp / "conf" / "model" / "mine.yaml").write_text(MINE)
    done = lab(*argv, *([] if "--cfg" in argv else ["--cfg", "job"]))
    assert done.returncode == 0, done.stderr


@pytest.fixture
def sweeps_dir(workdir):
    """The shipped sweeps/ in the working directory, where the README's relative paths find them."""
    tmp, _ = workdir
    shutil.copytree(README.parent / "sweeps", tmp / "sweeps")
    for name in ("flower_photos", "cats_dogs"):  # as `lab data fetch` leaves them: the sweeps check data.root
        (tmp / "data" / name).mkdir(parents=True)


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "sweep"], ids=shlex.join)
def test_readme_sweep_line_validates(argv, lab, sweeps_dir):
    done = lab(*argv, "--prepare")
    if "--workers-per-gpu" in argv:  # CI has no GPU: the flag is refused in one sentence, nothing created
        assert done.returncode == 2 and "needs GPUs" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepared study" in done.stdout


def test_readme_after_a_sweep_lines_run(lab, sweeps_dir, workdir):
    """The quickstart chain as the README tells it: sweep, best, replay, confirm, report (shortened by
    --n-trials and max_epochs on the sweep only; what follows adopts them from the study)."""
    done = lab("sweep", "sweeps/quickstart.yaml", "--workers", "2", "--no-live", "--n-trials", "3",
               "trainer.max_epochs=1", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    after = [c for c in COMMANDS if c[0] in ("best", "confirm", "report", "ensemble")
             or (c[0] == "train" and "experiment=quickstart_best" in c)]
    assert [c[0] for c in after][:2] == ["best", "train"]
    for argv in after:
        if argv[0] == "confirm":
            argv = [a if a != "3" else "2" for a in argv]  # --top 2 --seeds 2: the same code, a quarter of the time
        done = lab(*argv, timeout=900)
        assert done.returncode == 0, (argv, done.stdout + done.stderr)
    predict_lines(lab, *workdir)


def predict_lines(lab, tmp: Path, env: dict):
    """The README's `lab predict` lines, after the chain above registered quickstart@champion: its example files
    made here (photos/ and cat.jpg), its example run id and checkpoint replaced by the champion's own."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = client.get_model_version_by_alias("quickstart", "champion").run_id
    rng = np.random.default_rng(0)
    # The "Using the winner" lines; the ONNX file's line runs in test_export.py, RUN_ID's in test_first_contact3.py.
    lines = [c for c in COMMANDS if c[0] == "predict" and not c[1].endswith(".onnx") and c[1] != "RUN_ID"]
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
