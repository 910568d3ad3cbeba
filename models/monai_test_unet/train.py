"""Train the pipeline-test MONAI UNet bundle in this folder (CPU, about a minute).

Usage (from the repository root)::

    .venv/bin/python models/monai_test_unet/train.py            # seed 0, 300 steps
    .venv/bin/python models/monai_test_unet/train.py --steps 300 --seed 0

Data: ``monai.data.synthetic.create_test_image_3d`` spheres (one foreground class,
uniform noise that overlaps the sphere intensities, so a plain threshold is not
enough), mapped to a pseudo-HU range ``[-100, 300]`` so that the bundle's
``ScaleIntensityRanged`` preprocessing really matters. Arrays are used as dicomnode
``Volume.array`` is laid out, ``(k, i, j)``; the network is trained on that layout.

The network and the inferer are built from ``configs/inference.json`` with
``monai.bundle.ConfigParser`` (the config is the single source of truth); the
weights are written to ``models/model.pt`` as a plain state dict, the way the MONAI
model zoo ships them. Held-out Dice is measured on volumes from a different seed
with the bundle's own sliding-window inferer.

This is a pipeline test, not a clinical model.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data.synthetic import create_test_image_3d
from monai.losses import DiceCELoss

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SIZE = 64
PATCH = 32
HU_LOW, HU_HIGH = -100.0, 300.0


def synthetic_case(rs: np.random.RandomState, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume ``(k, i, j)`` in pseudo-HU and its binary ground truth."""
    image, seg = create_test_image_3d(
        size,
        size,
        size,
        num_objs=6,
        rad_max=12,
        rad_min=4,
        noise_max=0.7,
        num_seg_classes=1,
        random_state=rs,
    )
    hu = image * (HU_HIGH - HU_LOW) + HU_LOW
    return hu.astype(np.float32), (seg > 0).astype(np.uint8)


def scale(hu: np.ndarray) -> np.ndarray:
    """The bundle's ScaleIntensityRanged(a_min=-100, a_max=300, b_min=0, b_max=1, clip=True)."""
    return np.clip((hu - HU_LOW) / (HU_HIGH - HU_LOW), 0.0, 1.0).astype(np.float32)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


def random_batch(
    images: np.ndarray, segs: np.ndarray, rs: np.random.RandomState, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random PATCH^3 crops (with random axis flips) from the training volumes."""
    xs, ys = [], []
    for _ in range(batch):
        n = rs.randint(len(images))
        k, i, j = rs.randint(0, SIZE - PATCH + 1, size=3)
        x = images[n, k : k + PATCH, i : i + PATCH, j : j + PATCH]
        y = segs[n, k : k + PATCH, i : i + PATCH, j : j + PATCH]
        for axis in range(3):
            if rs.rand() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))[:, None].long()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-volumes", type=int, default=24)
    ap.add_argument("--test-volumes", type=int, default=8)
    ap.add_argument("--test-seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE / "models" / "model.pt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    rs = np.random.RandomState(args.seed)
    cases = [synthetic_case(rs) for _ in range(args.train_volumes)]
    images = np.stack([scale(c[0]) for c in cases])
    segs = np.stack([c[1] for c in cases])
    logger.info("train: %d volumes %d^3, foreground %.1f%%", len(images), SIZE, 100 * segs.mean())

    parser = ConfigParser()
    parser.read_config(HERE / "configs" / "inference.json")
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def")
    inferer = parser.get_parsed_content("inferer")
    n_params = sum(p.numel() for p in net.parameters())
    logger.info("network: %s, %d parameters", type(net).__name__, n_params)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    net.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = random_batch(images, segs, rs, args.batch)
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            logger.info(
                "step %4d  loss %.4f  (%.0f s)", step, loss.item(), time.perf_counter() - t0
            )
    train_s = time.perf_counter() - t0

    net.eval()
    test_rs = np.random.RandomState(args.test_seed)
    scores, thresh_scores = [], []
    with torch.inference_mode():
        for _ in range(args.test_volumes):
            hu, truth = synthetic_case(test_rs)
            x = torch.from_numpy(scale(hu))[None, None]
            pred = torch.argmax(inferer(x, net), dim=1)[0].numpy()
            scores.append(dice(pred, truth))
            thresh_scores.append(dice(scale(hu) >= 0.5, truth))
    logger.info(
        "held-out Dice (seed %d, %d volumes): mean %.4f min %.4f max %.4f; "
        "plain threshold at 0.5 for comparison: mean %.4f",
        args.test_seed,
        args.test_volumes,
        float(np.mean(scores)),
        float(np.min(scores)),
        float(np.max(scores)),
        float(np.mean(thresh_scores)),
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out)
    logger.info(
        "wrote %s (%d bytes) after %.0f s training", args.out, args.out.stat().st_size, train_s
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
