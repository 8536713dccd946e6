"""Classifier's epoch metrics on their own: what a logged loss means when batches differ in size."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lab.train.module import Classifier
from lab.train.nets import MLP


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
    assert model.train_epoch_means()[0] == pytest.approx(per_sample.item(), rel=1e-5)
    for metric in (model.val_loss, model.test_loss):
        assert metric.compute() == pytest.approx(per_sample.item(), rel=1e-5)


class FirstTwoPixels(torch.nn.Module):
    def forward(self, x):  # (N, 1, 2, 2) -> logits (N, 2): the first two pixels
        return x.flatten(1)[:, :2]


def test_train_accuracy_counts_samples_and_restarts_each_epoch():
    model = Classifier(FirstTwoPixels(), optimizer=partial(torch.optim.SGD, lr=0.1), class_names=["a", "b"])
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]).view(3, 1, 2, 2)  # predicted: 0, 1, 0
    model.training_step((x, torch.tensor([0, 0, 0])), 0)  # right, wrong, right
    model.training_step((x[:1], torch.tensor([1])), 1)  # wrong
    assert model.train_epoch_means()[1] == pytest.approx(2 / 4)
    model.training_step((x[:1], torch.tensor([0])), 0)  # the next epoch starts from zero
    assert model.train_epoch_means()[1] == 1.0
