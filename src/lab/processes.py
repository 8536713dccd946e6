"""Whether a process, or a process group, on this host still exists: signal 0 is delivered to nothing but
checked as a real signal would be."""
import os


def alive(pid: int, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
