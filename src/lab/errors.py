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
