"""The base of what predict returns per object kind (`Boxes` today): rows of one image's objects, as a tensor or a
NumPy array, that move between devices and formats the way torch tensors do."""

import numpy as np
import torch


class TensorContainer:
    """`data`: (n, columns) rows of one image's objects; `orig_shape`: that image's (height, width).

    `cpu()`, `numpy()`, `cuda()` and `to(...)` return a new container of the same kind over converted data (the
    original is unchanged); indexing and iteration give containers of single rows, so `for box in boxes:` reads
    `box.xyxy[0]` and `float(box.conf)`.
    """

    def __init__(self, data, orig_shape):
        self.data = data
        self.orig_shape = tuple(orig_shape)

    @property
    def shape(self):
        return tuple(self.data.shape)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self._with(self.data[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def cpu(self):
        return self._with(self.data.cpu()) if isinstance(self.data, torch.Tensor) else self

    def numpy(self):
        return self._with(self.data.cpu().numpy()) if isinstance(self.data, torch.Tensor) else self

    def cuda(self):
        return self._with(torch.as_tensor(self.data).cuda())

    def to(self, *args, **kwargs):
        return self._with(torch.as_tensor(self.data).to(*args, **kwargs))

    def _with(self, data):
        return type(self)(data, self.orig_shape)

    def _image_scale(self, columns):
        """(columns,) of width, height, width, ... in the data's own kind, dtype and device: divides x, y pairs."""
        height, width = self.orig_shape
        scale = [width, height] * (columns // 2)
        if isinstance(self.data, torch.Tensor):
            return torch.tensor(scale, dtype=self.data.dtype, device=self.data.device)
        return np.array(scale, dtype=self.data.dtype)
