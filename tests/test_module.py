"""Classifier's epoch metrics on their own: what a logged loss means when batches differ in size."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lab.module import Classifier
from lab.nets import MLP


def test_epoch_losses_weight_every_sample_equally():
    torch.manual_seed(0)
    model = Classifier(MLP((1, 4, 4), 3), optimizer=partial(torch.optim.SGD, lr=0.1), class_names=["a", "b", "c"])
    batches = [(torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))) for n in (9, 1)]  # a short last batch
    with torch.no_grad():
        for i, batch in enumerate(batches):
            model.training_step(batch, i)
            model.validation_step(batch, i)
            model.test_step(batch, i)
        x, y = (torch.cat(t) for t in zip(*batches))
        per_sample = F.cross_entropy(model(x), y)
        per_batch = sum(F.cross_entropy(model(bx), by) for bx, by in batches) / len(batches)
    assert abs(per_sample - per_batch) > 1e-3  # else this test could not tell the two apart
    for metric in (model.train_loss, model.val_loss, model.test_loss):
        assert metric.compute() == pytest.approx(per_sample.item(), rel=1e-5)
