from omegaconf.errors import OmegaConfBaseException


class LabError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one paragraph and exits 2."""


def user_error(exc: BaseException) -> BaseException | None:
    """The LabError or config error behind exc (Hydra's instantiate wraps what constructors raise)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (LabError, OmegaConfBaseException)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class StopRun(Exception):
    """Training ended early on purpose (a pruned trial): its MLflow run ends FINISHED, not FAILED."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM turned into an exception. A BaseException that is not KeyboardInterrupt, so that
    Lightning re-raises it as it is instead of converting Ctrl-C into sys.exit(1)."""


def raise_interrupted(signum, frame) -> None:
    import signal

    raise Interrupted(signal.Signals(signum).name)
