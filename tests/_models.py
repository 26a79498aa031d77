"""Tiny real model files (a conv net and an MLP on synthetic data) for strategy and metric tests.

Each is written as a model.py into a temporary directory and loaded through `ModelFile.from_path`, the
path a user's file takes. Training the baselines takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

from optagent.contract import ModelFile

_COMMON = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

import optagent

CLASSES = 4


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    teacher = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(123))
    y = (features(x) @ teacher.T).argmax(dim=1)
    return TensorDataset(x, y)


def load_data():
    return optagent.Data(train=_data(512, 1), eval=_data(256, 2))


def load_model():
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = _data(512, 1)
    for _ in range(4):
        for i in range(0, len(train), 64):
            x, y = train[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def evaluate(model, loader):
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total}


def example_input():
    return torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3))
'''

CONV = '''
SHAPE = (3, 16, 16)
FEATURES = 3


def features(x):
    return x.mean(dim=(2, 3)) * 4


def build():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, CLASSES),
    )
''' + _COMMON

MLP = '''
SHAPE = (32,)
FEATURES = 32


def features(x):
    return x


def build():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))
''' + _COMMON

SOURCES = {"conv": CONV, "mlp": MLP}


def model_file(directory: Path, kind: str) -> ModelFile:
    """Write the `kind` ("conv" or "mlp") model.py into `directory` and load it like a user's file."""
    path = Path(directory) / f"{kind}_model.py"
    path.write_text("import torch\nfrom torch import nn\n" + SOURCES[kind])
    return ModelFile.from_path(path)
