"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""
import torch
from sklearn.datasets import load_digits

from lab.data.base import Images, Loaded, TensorDataModule


class Digits(TensorDataModule):
    def load(self) -> Loaded:
        bunch = load_digits()
        # Pixel values are 0..16 counts of a 4x4 block; scale to the 0..255 range of every other dataset.
        x = torch.from_numpy(bunch.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        y = torch.from_numpy(bunch.target).long()
        return Loaded(Images(x, y), None, [str(name) for name in bunch.target_names])
