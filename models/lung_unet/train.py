"""Train models/lung_unet (CPU, time-bounded) by distilling models/lung_density.

NOT a clinical model. Usage, from the repository root::

    nice -n 10 .venv/bin/python models/lung_unet/train.py --minutes 55 \
        --log /tmp/lung_unet_train.log

Data recipe (also in README.md):

* real: the shared chest CT (TCIA Lung-PET-CT-Dx, Lung_Dx-A0001, 64 axial slices of
  5 mm, ``--real``). Its *superior* half (slices 32-63 along the slice normal, the
  apices to below the carina) is training data; its *inferior* half (slices 0-31:
  lung bases, diaphragm, upper abdomen) is held out and never seen in training.
* synthetic: ``--synthetic`` chest phantoms from
  :func:`dicomnode.synthetic_oriented.chest_phantom` (seeds 0..N-1): random body
  and lung sizes and positions, airway, heart, spine, vessels, table, abdominal gas,
  emphysema-like regions; written in varied orientations (axial head-first,
  feet-first, mirrored, rotated, decubitus left/right, gantry-tilted), slice steps
  2-5 mm, pixel spacing 1.6-2.6 mm, noise 8-40 HU, some smoothed. Held-out
  synthetic: seeds 10000+ in orientations including ones training never uses
  (oblique).
* labels: models/lung_density run on each volume (the real one on the whole series).

Every volume goes through the bundle's own ``Orientationd`` (RAS) and ``Spacingd``
(``pixdim`` of ``configs/inference.json``), with the labels resampled nearest,
``ScaleIntensityRanged`` (the config's window) and ``AddCoordinateChannels`` (the
left-right position in the whole image, before cropping), so the network learns what
the runtime will feed it. Augmentation: random crops (2/3 centred on lung), small
rotations and scaling in the axial plane, intensity scale/shift, noise (no
left-right mirroring: see ``augment``). Loss: Dice + cross-entropy; Adam, cosine learning
rate over the time budget; the weights are saved every few minutes, so a stopped
run still leaves a usable ``models/model.pt``.

At the end the model is evaluated *through dicomnode's monai_bundle runtime*
against lung_density: Dice per lung on the held-out half (run as its own series,
and inside the whole series), and on held-out synthetic series; the figures go to
the log and to ``--report`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.core.manifest import load_manifest  # noqa: E402
from dicomnode.inference.bundle_geometry import sub_volume, to_metatensor  # noqa: E402
from dicomnode.inference.geometry import Volume  # noqa: E402
from dicomnode.synthetic_oriented import (  # noqa: E402
    chest_phantom,
    oriented,
    sample,
    to_volume,
)

logger = logging.getLogger("lung_unet.train")

REAL = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx" / "Lung_Dx-A0001" / "CT_chest_5mm_kernelB"
TRAIN_KINDS = ("axial_hfs", "axial_ffs", "axial_mirrored", "axial_rotated",
               "decubitus_left", "decubitus_right", "tilted")
HELD_OUT_KINDS = ("axial_hfs", "oblique", "decubitus_right", "axial_ffs", "tilted", "oblique")
PATCH = (80, 80, 40)  # (x, y, z) voxels of the bundle's grid
HELD_OUT_SEED = 10_000


def teacher() -> Any:
    """models/lung_density, loaded on the CPU."""
    folder = ROOT / "models" / "lung_density"
    spec = importlib.util.spec_from_file_location("lung_density_teacher", folder / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.LungDensityModel(load_manifest(folder), folder, "cpu")
    model.load()
    return model


def synthetic_volume(seed: int, kind: str) -> Volume:
    """One synthetic chest series (as load_series would return it)."""
    rng = np.random.default_rng(seed)
    step = float(rng.uniform(2.0, 5.0))
    pixel = float(rng.uniform(1.6, 2.6))
    size = int(round(400.0 / pixel / 8)) * 8
    slices = int(round(rng.uniform(200.0, 340.0) / step))
    centre = tuple(rng.uniform(-20, 20, 3).tolist())
    geometry = oriented(kind, (slices, size, size), (step, pixel, pixel), centre=centre,
                        tilt_deg=float(rng.uniform(10, 25)), angle_deg=float(rng.uniform(-30, 30)))
    values = sample(geometry, chest_phantom(rng))
    if rng.random() < 0.5:
        from scipy.ndimage import gaussian_filter

        values = gaussian_filter(values, sigma=(0, *(rng.uniform(0.3, 1.0, 2))))
    values = values + rng.normal(0.0, rng.uniform(8, 40), values.shape).astype(np.float32)
    return to_volume(geometry, values)


def load_real(path: Path) -> Volume:
    from dicomnode.inference.volume import load_series

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm")
    if not files:
        raise SystemExit(f"no DICOM files in {path}")
    return load_series(files)


class Preprocess:
    """The bundle's spatial and intensity preprocessing, for image + label."""

    def __init__(self) -> None:
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, Orientationd, ScaleIntensityRanged, Spacingd

        parser = ConfigParser()
        parser.read_config(HERE / "configs" / "inference.json")
        pixdim = parser.get_parsed_content("pixdim")
        window = next(t for t in parser.get("preprocessing#transforms")
                      if t["_target_"] == "ScaleIntensityRanged")
        self.compose = Compose([
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image", "label"], pixdim=pixdim, mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=window["a_min"], a_max=window["a_max"],
                                 b_min=window["b_min"], b_max=window["b_max"], clip=True),
        ])
        coordinates = next(t for t in parser.get("preprocessing#transforms")
                           if t["_target_"] == "AddCoordinateChannelsd")
        from monai.transforms import AddCoordinateChannels

        #: applied to the whole (cached) volume, before cropping, as the bundle does
        self.coordinates = AddCoordinateChannels(spatial_dims=coordinates["spatial_dims"])

    def __call__(self, volume: Volume, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = to_metatensor(volume, channel_first=True)
        label_volume = dataclasses.replace(volume, array=labels.astype(np.float32))
        label, _ = to_metatensor(label_volume, channel_first=True)
        out = self.compose({"image": image, "label": label})
        return (out["image"].as_tensor().to(torch.float16),
                out["label"].as_tensor().round().to(torch.uint8))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float((a & b).sum()) / denom


def random_patch(image: torch.Tensor, label: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A PATCH crop (padded where the volume is smaller), 2/3 centred on lung."""
    shape = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(PATCH, shape, strict=True)]
    if any(pad):
        spec = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        image = F.pad(image.float()[None], spec, mode="replicate")[0]  # coordinates too
        label = F.pad(label[None], spec, value=0)[0]
        shape = image.shape[1:]
    if rng.random() < 2 / 3 and bool((label > 0).any()):
        idx = torch.nonzero(label[0] > 0)
        centre = idx[int(rng.integers(len(idx)))].tolist()
    else:
        centre = [int(rng.integers(s)) for s in shape]
    start = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, PATCH, shape, strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, PATCH, strict=True))
    return image[(slice(None), *sl)].float(), label[(slice(None), *sl)].clone()


def augment(x: torch.Tensor, y: torch.Tensor,
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale a little in the axial plane, vary intensity and noise.

    No left-right mirroring: the bundle's Orientationd shows the network every series
    in RAS, so the patient's right is always the same side, and the anatomy that tells
    the lungs apart (heart, liver dome, aortic arch) stays where it is in a patient
    (a first run with mirroring and swapped labels mixed the lungs up).
    """
    if rng.random() < 0.6:
        a = math.radians(float(rng.uniform(-12, 12)))
        s = float(rng.uniform(0.88, 1.12))
        theta = torch.tensor([[math.cos(a) * s, -math.sin(a) * s, 0, 0],
                              [math.sin(a) * s, math.cos(a) * s, 0, 0],
                              [0, 0, s, 0]], dtype=torch.float32)[None]
        # affine_grid's (x, y, z) are the last three axes reversed: (z, y, x) of (X, Y, Z)
        theta = theta[:, [2, 1, 0]][:, :, [2, 1, 0, 3]]
        grid = F.affine_grid(theta, [1, 1, *x.shape[1:]], align_corners=False)
        x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border",
                          align_corners=False)[0]
        y = F.grid_sample(y[None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[0].to(torch.uint8)
    image = x[:1] * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.04, 0.04))
    image = image + torch.randn_like(image) * float(rng.uniform(0.0, 0.02))
    return torch.cat([image, x[1:]]), y  # the coordinate channel as it is


def build_network() -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(HERE / "configs" / "inference.json")
    return parser.get_parsed_content("network_def")  # type: ignore[no-any-return]


def evaluate(real: Volume, real_labels: np.ndarray, held: list[tuple[Volume, np.ndarray]],
             split: int, weights: Path) -> dict[str, Any]:
    """Dice per lung through dicomnode's monai_bundle runtime, against lung_density."""
    import shutil
    import tempfile

    from dicomnode.inference.runtimes import load_model

    folder = HERE
    if weights.resolve() != (HERE / "models" / "model.pt").resolve():
        folder = Path(tempfile.mkdtemp(prefix="lung_unet_eval_"))
        for name in ("manifest.yaml", "configs"):
            source = HERE / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
        (folder / "models").mkdir()
        shutil.copy(weights, folder / "models" / "model.pt")
    runtime = load_model(folder, "cpu")
    report: dict[str, Any] = {}

    def score(name: str, pred: np.ndarray, ref: np.ndarray, seconds: float) -> None:
        report[name] = {
            "right lung": round(dice(pred == 1, ref == 1), 4),
            "left lung": round(dice(pred == 2, ref == 2), 4),
            "seconds": round(seconds, 2),
        }
        logger.info("eval %s: %s", name, report[name])

    started = time.perf_counter()
    whole = runtime.predict(real).labels
    score("real whole series (superior half seen in training)", whole, real_labels,
          time.perf_counter() - started)
    score("real held-out inferior half, inside the whole series", whole[:split],
          real_labels[:split], 0.0)
    started = time.perf_counter()
    alone = runtime.predict(sub_volume(real, slice(0, split))).labels
    score("real held-out inferior half, as its own series", alone, real_labels[:split],
          time.perf_counter() - started)
    for n, (volume, ref) in enumerate(held):
        started = time.perf_counter()
        score(f"synthetic held-out {n} ({HELD_OUT_KINDS[n % len(HELD_OUT_KINDS)]})",
              runtime.predict(volume).labels, ref, time.perf_counter() - started)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=55.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--synthetic", type=int, default=40, help="synthetic training volumes")
    ap.add_argument("--held-out", type=int, default=6, help="synthetic held-out volumes")
    ap.add_argument("--real", type=Path, default=REAL)
    ap.add_argument("--real-share", type=float, default=0.5,
                    help="share of training patches from the real series")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=HERE / "evaluation.json")
    ap.add_argument("--weights", type=Path, default=HERE / "models" / "model.pt")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="start from the weights in --weights (a second phase, e.g. lower --lr)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lung_unet_cache"),
                    help="prepared synthetic volumes (made again when absent)")
    args = ap.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log is not None:
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    model = teacher()
    real = load_real(args.real)
    real_labels = model.predict(real).labels
    split = real.shape[0] // 2
    logger.info("real series %s: training on slices %d-%d, held out 0-%d", real.shape, split,
                real.shape[0] - 1, split - 1)
    held = []
    for n in range(args.held_out):
        volume = synthetic_volume(HELD_OUT_SEED + n, HELD_OUT_KINDS[n % len(HELD_OUT_KINDS)])
        held.append((volume, model.predict(volume).labels))
    if args.eval_only:
        report = evaluate(real, real_labels, held, split, args.weights)
        args.report.write_text(json.dumps(report, indent=1) + "\n")
        return 0

    prep = Preprocess()
    data: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_train = sub_volume(real, slice(split, real.shape[0]))
    real_data = prep(real_train, real_labels[split:])
    args.cache.mkdir(parents=True, exist_ok=True)
    for n in range(args.synthetic):
        kind = TRAIN_KINDS[n % len(TRAIN_KINDS)]
        cached = args.cache / f"synthetic-{args.seed * 1000 + n}-{kind}.pt"
        if cached.is_file():
            data.append(torch.load(cached, weights_only=True))
            continue
        volume = synthetic_volume(args.seed * 1000 + n, kind)
        labels = model.predict(volume).labels
        data.append(prep(volume, labels))
        torch.save(data[-1], cached)
        logger.info("synthetic %d (%s) %s: lungs %d/%d voxels -> %s", n, kind, volume.shape,
                    int((labels == 1).sum()), int((labels == 2).sum()), tuple(data[-1][0].shape))
    real_data = (prep.coordinates(real_data[0].float()).half(), real_data[1])
    data = [(prep.coordinates(x.float()).half(), y) for x, y in data]
    logger.info("data ready in %.0f s", time.perf_counter() - t0)

    network = build_network()
    if args.resume:
        network.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        logger.info("resumed from %s", args.weights)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    budget = args.minutes * 60.0
    start = time.perf_counter()
    last_save = start
    losses: list[float] = []
    step = 0
    network.train()
    while step < args.max_steps and time.perf_counter() - start < budget:
        fraction = (time.perf_counter() - start) / budget
        for group in optimiser.param_groups:
            group["lr"] = 1e-4 + (args.lr - 1e-4) * 0.5 * (1 + math.cos(math.pi * fraction))
        xs, ys = [], []
        for _ in range(args.batch):
            source = real_data if rng.random() < args.real_share else data[int(rng.integers(len(data)))]
            x, y = augment(*random_patch(*source, rng), rng)
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys).long()
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            logger.info("step %d (%.1f min) loss %.4f lr %.5f", step,
                        (time.perf_counter() - start) / 60, float(np.mean(losses[-25:])),
                        optimiser.param_groups[0]["lr"])
        if time.perf_counter() - last_save > 300:
            torch.save(network.state_dict(), args.weights)
            last_save = time.perf_counter()
    torch.save(network.state_dict(), args.weights)
    minutes = (time.perf_counter() - start) / 60
    logger.info("trained %d steps in %.1f min; weights %s (%d bytes)", step, minutes,
                args.weights, args.weights.stat().st_size)
    report = evaluate(real, real_labels, held, split, args.weights)
    report["training"] = {
        "steps": step, "minutes": round(minutes, 1), "batch": args.batch, "patch": PATCH,
        "synthetic_volumes": args.synthetic, "real_share": args.real_share, "seed": args.seed,
        "total_minutes_with_data_and_eval": round((time.perf_counter() - t0) / 60, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "lr": args.lr, "resumed": args.resume,
    }
    if args.resume and args.report.is_file():  # keep the earlier phases' figures
        earlier = json.loads(args.report.read_text())
        phases = earlier.get("training_phases") or [earlier.get("training")]
        report["training_phases"] = [*phases, report["training"]]
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    logger.info("report written to %s", args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
