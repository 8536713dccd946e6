"""Hydra's composition errors (bad override syntax, unknown key, unknown group option) as one sentence that
names the bad value and what is valid; what `lab train` and `lab sweep` print instead of Hydra's page."""
import re

from lab.errors import LabError, close_matches, unknown_key

QUOTE_ADVICE = ("a value with spaces or special characters must reach lab in quotes, e.g. "
                "\"data.root='my photos/*'\" (the double quotes are for the shell, the single ones for Hydra)")


def sentence(err: BaseException) -> str | None:
    """One paragraph for a config error Hydra raised while composing (bad override syntax, unknown key,
    unknown group option); None for anything else, which keeps its traceback."""
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, LabError):  # lab's own check of the overrides (config.check_groups): already its sentence
        return str(err)
    if isinstance(err, OverrideParseException):
        lines = [line for line in err.message.splitlines() if not line.startswith("Error parsing override")]
        detail = lines[0] if lines else "not an override"
        caret = next((line.index("^") for line in lines if line.strip() == "^"), None)
        if detail.startswith("LexerNoViableAltException") and caret is not None and err.override in detail:
            pos = caret - detail.index(err.override)
            if 0 <= pos < len(err.override):
                detail = f"{err.override[pos]!r} at character {pos + 1} is not allowed there"
        return f"cannot read the override {err.override!r} ({detail}): {QUOTE_ADVICE}."
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        options = sorted(err.options)
        close = close_matches(name, options)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return (f"{group}={name} is not available: {hint}The choices for {group} are {', '.join(options)} "
                f"(the files in conf/{group}/).")
    cause = err.__cause__
    if (isinstance(err, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError))
            and isinstance(cause.parent_node, DictConfig) and cause.full_key):
        parent = cause.parent_node
        path, _, leaf = str(cause.full_key).rpartition(".")
        keys = {str(k) for k in parent.keys()} - {"hydra"}
        if not path:  # the top level: config groups are chosen there too (optimizer=sgd)
            from lab import config

            keys |= config.groups()
        params, name = {}, ""
        if path == "trainer" or "_target_" in parent:
            from lab import config_schema
            # The whole config the key was missing from: OmegaConf offers no public way from a node to its root.
            params, name = config_schema.accepted_keys(parent._get_root(), path)  # noqa: SLF001
            params = params or {}
        plus = re.search(r"use (\+\S.*)$", str(err), re.MULTILINE)
        if leaf in params and plus:
            return (f"{cause.full_key} is not in the config, but {name} takes it: add it with "
                    f"{plus.group(1)} (the + adds a key).")
        return str(unknown_key(str(cause.full_key), keys | set(params), "the config"))
    if isinstance(err, InstantiationException) or not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    skip = ("See https://hydra.cc", "Set the environment", "Config search path", "provider=")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(skip)]
    if isinstance(cause, OmegaConfBaseException):
        lines += [line.strip() for line in str(cause).splitlines()[:1]]
    return " ".join(lines) or type(err).__name__
