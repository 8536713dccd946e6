"""Storage and tracking addresses as users type them: made absolute for workers, masked for printing."""
import re
from pathlib import Path


def mask_password(text: str) -> str:
    """scheme://user:secret@host -> scheme://user:***@host, for anything printed, logged or tagged."""
    return re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1***@", str(text))


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db, so workers in any cwd write to the same DB."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def is_rdb(storage: str) -> bool:
    return "://" in storage
