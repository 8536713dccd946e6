"""The idx file format of MNIST-style datasets: read by the idx datamodules, checked by `lab data fetch`."""
import gzip
from pathlib import Path

import numpy as np
import torch

from lab.errors import LabError


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (magic: 0, 0, dtype code 0x08 = uint8, number of dims; then big-endian int32 sizes)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:  # BadGzipFile, or a download cut short
        raise LabError(f"{path} is not a complete gzip file ({err}): delete it and fetch it again.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LabError(f"{path} is not an uint8 idx file (header {raw[:4].hex() or 'empty'}).")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise LabError(f"{path} is truncated: its header promises {ndim} dimension sizes, file has {len(raw)} bytes.")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LabError(f"{path} is truncated: header promises {tuple(dims)} values, file holds {data.size}.")
    return torch.from_numpy(data.reshape(tuple(int(d) for d in dims)).copy())
