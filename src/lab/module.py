"""The import path `lab.module.Classifier`, which configs logged and experiments exported before lab/train/
existed name as their `_target_`: they must still train."""
from lab.train.module import Classifier, Diverged  # noqa: F401
