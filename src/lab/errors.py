import difflib
from collections.abc import Iterable

from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class LabError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one paragraph and exits 2."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The few choices a typo most likely meant, best first: difflib's ratio >= 0.7 and within 0.1 of the
    best one (max_epoch -> max_epochs, not min_epochs too)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in set(choices)),
                    key=lambda rc: (-rc[0], rc[1]))
    return [c for r, c in scored[:n] if r >= 0.7 and r >= scored[0][0] - 0.1]


def unknown_key(key: str, valid: Iterable[str], where: str = "the config") -> LabError:
    """`trainer.max_epoch is not a setting of the config: did you mean trainer.max_epochs?`, or, when no key
    is close, the list of valid keys at that level."""
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    valid = sorted(set(valid))
    close = close_matches(leaf, valid)
    if close:
        hint = "did you mean " + " or ".join(prefix + c for c in close) + "?"
    else:
        hint = f"the keys {'under ' + parent if parent else 'at the top level'} are {', '.join(valid)}."
    return LabError(f"{key} is not a setting of {where}: {hint}")


def user_error(exc: BaseException) -> BaseException | None:
    """The LabError or config error behind exc (Hydra's instantiate wraps what constructors raise)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, LabError):
            return seen
        if isinstance(seen, OmegaConfBaseException):
            return config_sentence(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def must_be_set(key: str) -> LabError:
    return LabError(f"{key} must be set (it is ??? in its config): give it on the command line, {key}=VALUE.")


def config_sentence(err: OmegaConfBaseException) -> LabError:
    """OmegaConf's message without its `full_key:` / `object_type=` lines, which mean nothing to a user."""
    key = getattr(err, "full_key", None)
    if isinstance(err, MissingMandatoryValue) and key:
        return must_be_set(key)
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    first = lines[0] if lines else type(err).__name__
    return LabError(first + (f" (at {key})" if key and str(key) not in first else ""))


DISK_FULL_WORDS = ("database or disk is full", "No space left on device", "Disk quota exceeded")
DISK_FULL = ("the disk is full{where}: free some space (or point --out / MLFLOW_TRACKING_URI at another disk) "
             "and run the same command again; what was recorded so far is kept.")


def says_disk_full(text: str) -> bool:
    return any(words in text for words in DISK_FULL_WORDS)


def disk_full(exc: BaseException) -> BaseException | None:
    """The error behind exc that says a disk (or a quota) is full: OSError ENOSPC/EDQUOT, or SQLite's words
    for it (as MLflow's and Optuna's stores pass them on)."""
    import errno

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        if says_disk_full(str(seen)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class StopRun(Exception):
    """Training ended early on purpose (a pruned trial): its MLflow run ends FINISHED, not FAILED."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM turned into an exception. A BaseException that is not KeyboardInterrupt, so that
    Lightning re-raises it as it is instead of converting Ctrl-C into sys.exit(1)."""
