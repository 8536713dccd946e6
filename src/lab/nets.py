"""The import paths `lab.nets.CNN` etc., which configs logged and experiments exported before lab/train/
existed name as their `_target_`: they must still train."""
from lab.train.nets import CNN, MLP, Linear, ResNet  # noqa: F401
