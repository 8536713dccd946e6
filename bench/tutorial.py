"""The tutorial pipeline: a torchvision Dataset with per-sample PIL transforms, a DataLoader, fp32."""
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from plain import clock, since


def fashion(root, train: bool = True) -> Dataset:
    # Normalize with Fashion-MNIST's train mean/std, as tutorials hard-code them.
    tf = T.Compose([T.ToTensor(), T.Normalize((0.2860,), (0.3530,))])
    return torchvision.datasets.FashionMNIST(str(root), train=train, transform=tf, download=False)


class ArrayImages(Dataset):
    """uint8 (N, C, H, W) held as numpy, served like torchvision's CIFAR10: a PIL image per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y.tolist()
        self.tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * x.shape[1], (0.25,) * x.shape[1])])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(self.x[i])), self.y[i]


def image_folder(root, size: int) -> Dataset:
    # Every epoch decodes and resizes every JPEG again: the usual ImageFolder recipe.
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torchvision.datasets.ImageFolder(str(root), transform=tf)


def loader(ds: Dataset, batch: int, workers: int, device: torch.device, shuffle: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers, pin_memory=device.type == "cuda")


def epoch(net, dl, opt, device) -> None:
    net.train()
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(net, dl, device) -> float:
    net.eval()
    right = total = 0
    for x, y in dl:
        pred = net(x.to(device)).argmax(1).cpu()
        right, total = right + int((pred == y).sum()), total + len(y)
    return right / total


def train(net, ds: Dataset, batch: int, n_images: int, epochs: int, device: torch.device, workers: int,
          lr: float = 1e-3) -> list[dict]:
    """since() per epoch over a fixed random subset of n_images. DataLoader workers start anew each epoch and
    are joined at its end, so their CPU time counts as reaped children."""
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n_images].tolist()
    dl = loader(Subset(ds, pick), batch, workers, device, shuffle=True)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times = []
    for _ in range(epochs):
        start = clock(device)
        epoch(net, dl, opt, device)
        times.append(since(start, device))
    return times


def trial(net, train_ds, val_ds, test_ds, batch: int, epochs: int, device: torch.device, workers: int,
          lr: float) -> float:
    """What one sweep trial does, the tutorial way: train, validate every epoch, test once. Returns test acc."""
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    train_dl = loader(train_ds, batch, workers, device, shuffle=True)
    val_dl, test_dl = (loader(ds, batch, workers, device, shuffle=False) for ds in (val_ds, test_ds))
    for _ in range(epochs):
        epoch(net, train_dl, opt, device)
        evaluate(net, val_dl, device)
    return evaluate(net, test_dl, device)
