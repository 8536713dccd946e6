"""A sweep file's stack keys (stack, stack_seeds): checked with the rest of the file, and what they will do
said before the sweep starts. spec: the file's SweepSpec (spec.py, which calls these)."""
from pathlib import Path

from lab.errors import LabError


def check_stack(spec, path: Path) -> None:
    """stack: a whole number >= 1 or auto; not with seeds (they stack already) nor a grid (its combinations are
    fixed, while a stack's other members are sampled with the first one's structure)."""
    n = spec.stack
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise LabError(f"{path}: stack={n!r} is not valid: give how many trials of one structure train together as "
                       "one stack (1: each alone, e.g. 8), or auto (measured when the sweep starts).")
    if n != 1 and spec.seeds > 1:
        raise LabError(f"{path}: stack={n} with seeds={spec.seeds} is not supported: each trial's seeds already train "
                       "as one stack; use stack: 1.")
    if n != 1 and spec.sampler.get("name") == "grid":
        raise LabError(f"{path}: stack={n} does not work with sampler grid, whose combinations are fixed in advance: "
                       "use stack: 1, or a sampler that samples (tpe, random, qmc).")


def stack_notes(spec) -> list[str]:
    """Which of the two a seeded sweep does, said before it starts: seeds as one stack, or one after another
    for the Wilcoxon pruner (it stops a trial between seeds)."""
    notes = []
    if spec.seeds > 1 and not spec.stack_seeds:
        notes.append(f"seeds: {spec.seeds} train one after another (stack_seeds: false).")
    elif spec.seeds > 1 and spec.pruner.get("name", "none") == "wilcoxon":
        notes.append(f"seeds: {spec.seeds} train one after another, not as one stack: pruner wilcoxon decides "
                     "between seeds, which seeds that train together would not leave it.")
    elif spec.seeds > 1:
        notes.append(f"seeds: {spec.seeds} of each trial train as one stack (pruner {spec.pruner.get('name', 'none')} "
                     "does not decide between seeds; the Wilcoxon pruner would train them one after another).")
    if spec.stack != 1:
        notes.append(f"stack: {spec.stack}: a worker trains up to {spec.stack if spec.stack != 'auto' else 'N'} "
                     "trials of one structure as one stack, each its own trial with its own pruning.")
    return notes
