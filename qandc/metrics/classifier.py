"""The reference classifier: a small CNN on Fashion-MNIST whose penultimate features define FD, and whose
predictions define class accuracy. Shipped in `qandc/assets/` with the test set's feature statistics, so neither
metric needs the dataset (or any downloaded network) at evaluation time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..artifacts import ASSETS, atomic_path, portable_command, read_safetensors, sha256_file, write_json
from ..errors import QandcError
from ..progress import progress

WEIGHTS, STATS, RECORD = "classifier.safetensors", "classifier-stats.safetensors", "classifier.json"
FEATURES = 128


class FashionCNN(nn.Module):
    """Two conv blocks and a 128-d feature layer; input (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Dropout(0.25)]
        self.conv = nn.Sequential(*block(1, 32), *block(32, 64))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURES), nn.BatchNorm1d(FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def features(self, x):
        return self.embed(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


def uint8_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 28, 28, 1) -> float (N, 1, 28, 28) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim == 4:
        x = x[..., 0]
    return x.div(127.5).sub(1).unsqueeze(1)


def load_classifier(assets: str | Path = ASSETS) -> tuple[FashionCNN, dict]:
    """The shipped classifier (eval mode) and its test-set feature statistics (mu, sigma, sha256)."""
    assets = Path(assets)
    for name in (WEIGHTS, STATS):
        if not (assets / name).is_file():
            raise QandcError(f"{assets / name}: reference classifier file missing")
    model = FashionCNN()
    model.load_state_dict(read_safetensors(assets / WEIGHTS))
    stats = read_safetensors(assets / STATS)
    return model.eval(), {"mu": stats["mu"].double().numpy(), "sigma": stats["sigma"].double().numpy(),
                          "sha256": sha256_file(assets / WEIGHTS)}


@torch.no_grad()
def classify(model: FashionCNN, images: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features float64 (N, 128), predicted labels (N,)) for uint8 images."""
    device = next(model.parameters()).device
    feats, preds = [], []
    for i in progress(range(0, len(images), batch), "classifier features"):
        f = model.features(uint8_to_input(images[i:i + batch]).to(device))
        feats.append(f.double().cpu())
        preds.append(model.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def train_classifier(out: Path, epochs: int, seed: int, command: list[str], data_dir=None, device=None) -> dict:
    """Train on the train split, measure test accuracy, write weights + test feature statistics + record (with
    `command`, the command line as typed)."""
    from ..data import load_fashion_mnist

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    x, y = uint8_to_input(train_x).to(device), torch.from_numpy(train_y.astype(np.int64)).to(device)
    model = FashionCNN().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * 128:(i + 1) * 128]
            xb = x[idx]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1, device=device) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", file=sys.stderr)
    model.eval()
    feats, preds = classify(model, test_x)
    accuracy = float((preds == test_y).mean())
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    with atomic_path(out / STATS) as tmp:
        save_file({"mu": torch.from_numpy(feats.mean(0)),
                   "sigma": torch.from_numpy(np.cov(feats, rowvar=False))}, str(tmp))
    record = {"test_accuracy": accuracy, "epochs": epochs, "seed": seed, "train_seconds": time.time() - start,
              "features": FEATURES, "stats": "mean and covariance of the 10k test images' penultimate features",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "command": portable_command(command, out)}
    write_json(out / RECORD, record)
    return record


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qandc.metrics.classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    a = parser.parse_args()
    command = ["python", "-m", "qandc.metrics.classifier", *sys.argv[1:]]
    print(json.dumps(train_classifier(Path(a.out), a.epochs, a.seed, command, a.data_dir)))
