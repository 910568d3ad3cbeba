"""CT lung density: left and right lung segmentation and emphysema measures.

A classical (weight-free) reference model, written in torch so that the same code
runs on the CPU and on CUDA. See README.md in this folder for what it is for and
what it is not.

Pipeline (``LungDensityModel.predict``):

1. Full resolution, on the device: light in-plane smoothing (3x3 mean), then an
   average-pooled *coarse* grid of about 2 mm voxels (the pooling is a second,
   anisotropy-aware smoothing).
2. Coarse grid: air = smoothed HU < -320. Air components (3-D) that touch the
   in-plane border of the image are outside the body and are dropped.
3. Large airway: seeded in the head-most slices (a small, round, central air
   region below -950 HU = the trachea) and tracked slice by slice towards the feet
   while each branch stays airway-sized (stops where a branch merges into lung,
   i.e. at the main / lobar bronchi). The tracked airway, dilated by its wall,
   is removed.
4. The remaining air components: the largest one; if it lies on both sides of the
   body midline the two lungs touch and it is split by repeated in-plane erosion
   until it falls apart into two (then grown back inside the original mask), or
   along the midline as a last resort. Otherwise the other lung is the largest
   component on the other side of the midline.
5. Each lung: morphological closing and 2-D hole filling (brings vessels and
   small nodules inside the lung into the mask), then upsampled to full
   resolution, where the boundary band is re-thresholded on the full-resolution
   image.
6. Label by anatomy: the patient x (DICOM LPS, +x = patient's left) of each lung's
   centroid, through ``Volume.affine``; 1 = right lung, 2 = left lung.
7. Measures per lung and in total on the unsmoothed HU: volume (ml), mean lung
   density, LAA%-950 and PD15.

Connected-component labelling, the airway tracking and 2-D hole filling have no
torch equivalent; they run in scipy.ndimage on the CPU, on *boolean masks of the
coarse grid only* (~4 M voxels for a 512 x 512 x 300 series); everything on the
full-resolution image stays on the device.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicomnode.core.manifest import Manifest
from dicomnode.errors import DicomNodeError
from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtime import ModelRuntime, Prediction

LOG = logging.getLogger(__name__)

RIGHT_LUNG = 1
LEFT_LUNG = 2
NAMES = {RIGHT_LUNG: "right lung", LEFT_LUNG: "left lung"}

HU_UNIT = "[hnsf'U]"

# 2-D (in-plane) connectivity for per-slice operations on (k, i, j) arrays
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


class UnsupportedVolumeError(DicomNodeError, ValueError):
    """The volume is not something this model can measure (not CT, too few slices...)."""


class LungDensityModel(ModelRuntime):
    """Left/right lung segmentation and lung density (LAA%-950, PD15) on chest CT."""

    AIR_HU = -320.0  # lung vs. soft tissue, after smoothing
    AIRWAY_HU = -900.0  # airway lumen on the 2 mm grid (a -950..-1000 lumen, averaged)
    LAA_HU = -950.0  # low attenuation area threshold (LAA%-950)
    PD_PERCENTILE = 15.0  # PD15
    COARSE_MM = 2.0  # target voxel size of the coarse grid
    CLOSE_MM = 4.0  # closing radius (vessels at the lung border)
    MIN_LUNG_ML = 10.0  # smaller air components are never a lung
    TRACHEA_AREA_MM2 = (40.0, 700.0)  # lumen cross-section of a trachea seed
    AIRWAY_BRANCH_MAX_MM2 = 700.0  # a tracked branch larger than this has merged into lung
    AIRWAY_SEARCH_MM = 60.0  # look for the trachea seed this far from the head end
    AIRWAY_MAX_DEPTH_MM = 220.0  # trachea + main bronchi
    AIRWAY_CENTRAL_MM = 40.0  # seed within this distance of the body midline
    SPLIT_MAX_EROSIONS = 12

    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        super().__init__(manifest, model_dir, device)
        self._device: torch.device | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> None:
        """Check the device; there are no weights, only thresholds and kernel sizes."""
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} requested but torch sees no CUDA device")
        # touch the device once so that the first job does not pay for CUDA start-up
        torch.zeros(1, device=device).add_(1)
        self._device = device

    def predict(self, volume: Volume) -> Prediction:
        if self._device is None:
            raise RuntimeError("LungDensityModel.predict() called before load()")
        self._check(volume)
        started = time.perf_counter()
        with torch.inference_mode():
            labels, hu = self._segment(volume)
            measurements = self._measure(labels, hu, volume.voxel_volume_ml)
            labels_np = labels.to("cpu").numpy().astype(np.uint8, copy=False)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return Prediction(
            labels=labels_np,
            measurements=measurements,
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            device=str(self._device),
            seconds=time.perf_counter() - started,
        )

    # -- input checks ------------------------------------------------------------------

    def _check(self, volume: Volume) -> None:
        accepts = self.manifest.accepts
        modality = (volume.modality or "").upper()
        if modality not in accepts.modalities:
            raise UnsupportedVolumeError(
                f"{self.manifest.name} measures lung density in Hounsfield units and needs a CT "
                f"series (modality {', '.join(accepts.modalities)}); got modality {modality or '(none)'!r}"
            )
        if volume.array.ndim != 3:
            raise UnsupportedVolumeError(f"volume array must be 3-D (k, i, j), got shape {volume.shape}")
        if volume.shape[0] < accepts.min_slices:
            raise UnsupportedVolumeError(
                f"{self.manifest.name} needs at least {accepts.min_slices} slices, got {volume.shape[0]}"
            )
        if min(volume.shape[1:]) < 32:
            raise UnsupportedVolumeError(f"slices of {volume.shape[1]}x{volume.shape[2]} are too small")
        if abs(float(volume.slice_direction[2])) < 0.8:
            raise UnsupportedVolumeError(
                "lung_density needs an axial (transverse) series; the slice normal "
                f"{np.round(volume.slice_direction, 3).tolist()} is not close to the patient z axis"
            )
        if any(not (s > 0 and math.isfinite(s)) for s in volume.spacing):
            raise UnsupportedVolumeError(f"invalid voxel spacing {volume.spacing}")

    # -- segmentation ------------------------------------------------------------------

    def _segment(self, volume: Volume) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._device is not None
        dev = self._device
        shape = volume.shape
        hu = torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32)).to(dev)

        # 1. the coarse grid: block means of ~2 mm (this is the smoothing; an image that
        #    is already coarse in-plane gets a 3x3 mean instead)
        factors = tuple(max(1, round(self.COARSE_MM / s)) for s in volume.spacing)
        coarse = _pool(hu, factors)
        if factors[1] == 1 and factors[2] == 1:
            coarse = F.avg_pool3d(
                F.pad(coarse[None, None], (1, 1, 1, 1, 0, 0), mode="replicate"), (1, 3, 3), stride=1
            )[0, 0]
        cspacing = tuple(s * f for s, f in zip(volume.spacing, factors, strict=True))
        cvoxel_ml = float(np.prod(cspacing)) / 1000.0
        xgrid = _patient_x_grid(volume, factors, coarse.shape, dev)

        # 2. air, minus the air outside the body (CPU labelling of a boolean mask)
        air = (coarse < self.AIR_HU).cpu().numpy()
        comp, _ = ndimage.label(air)
        border = np.unique(
            np.concatenate(
                [comp[:, 0, :].ravel(), comp[:, -1, :].ravel(), comp[:, :, 0].ravel(), comp[:, :, -1].ravel()]
            )
        )
        is_border = np.zeros(int(comp.max()) + 1, dtype=bool)
        is_border[border[border > 0]] = True
        outside = is_border[comp]
        inside_air = air & ~outside
        body = ~outside
        midline_x = float(xgrid[torch.as_tensor(body, device=dev)].mean()) if body.any() else 0.0

        # 3. the large airway, tracked from the head end
        airway = self._track_airway(coarse, inside_air, body, xgrid, cspacing, volume)
        if airway.any():
            wall = max(1, round(3.0 / min(cspacing[1:])))
            airway = _dilate_np(airway, (0, wall, wall), dev)
        candidates = inside_air & ~airway

        # 4. the two lungs
        lungs = self._pick_lungs(candidates, xgrid, midline_x, cvoxel_ml, cspacing, dev)

        # 5. closing and hole filling per lung, on the coarse grid
        r_ip = max(1, round(self.CLOSE_MM / min(cspacing[1:])))
        r_z = round(self.CLOSE_MM / cspacing[0]) if cspacing[0] <= 2.5 else 0
        closed: list[np.ndarray] = []
        for mask in lungs:
            box = _bbox(mask, (r_z + 1, r_ip + 1, r_ip + 1))
            m = _close_np(mask[box], (r_z, r_ip, r_ip), dev)
            m = ndimage.binary_fill_holes(m, structure=_INPLANE)
            full = np.zeros_like(mask)
            full[box] = m
            closed.append(full & ~outside & ~airway)
        if len(closed) == 2:
            both = closed[0] & closed[1]
            if both.any():  # closing made them overlap: keep each voxel where it was
                closed[0] &= ~(both & lungs[1])
                closed[1] &= ~(both & lungs[0])
                still = closed[0] & closed[1]
                left_side = (xgrid > midline_x).cpu().numpy()
                closed[0] &= ~(still & left_side)
                closed[1] &= ~(still & ~left_side)

        # 6. label by anatomy: patient x of each lung's centroid (LPS: +x = left)
        coarse_labels = torch.zeros(coarse.shape, dtype=torch.uint8, device=dev)
        sides: list[tuple[float, torch.Tensor]] = []
        for m in closed:
            t = torch.as_tensor(m, device=dev)
            if not bool(t.any()):
                continue
            sides.append((float(xgrid[t].mean()), t))
        if len(sides) == 2:
            sides.sort(key=lambda s: s[0])
            assign = [(RIGHT_LUNG, sides[0][1]), (LEFT_LUNG, sides[1][1])]
        elif len(sides) == 1:
            LOG.warning("lung_density: only one lung found")
            assign = [(LEFT_LUNG if sides[0][0] > midline_x else RIGHT_LUNG, sides[0][1])]
        else:
            LOG.warning("lung_density: no lung found")
            assign = []
        for value, t in assign:
            coarse_labels[t] = value

        # 7. back to full resolution, re-thresholding the boundary band on the image
        kz = 1 if factors[0] > 1 else 0
        # one coarse code map: 1/2 = surely that lung (interior), 5/6 = that lung if the
        # full-resolution voxel is dark (boundary band), 0 = not lung
        interior = _erode_labels(coarse_labels, (kz, 1, 1))
        band = _dilate_labels(coarse_labels, (kz, 1, 1))
        band[torch.as_tensor(outside | airway, device=dev)] = 0
        code = torch.where(interior > 0, interior, torch.where(band > 0, band + 4, 0))
        up = _upsample(code.to(torch.uint8), factors, shape)
        labels = torch.where(up < 4, up, (up - 4) * (hu < self.AIR_HU))
        return labels.to(torch.uint8), hu

    def _track_airway(
        self,
        coarse: torch.Tensor,
        inside_air: np.ndarray,
        body: np.ndarray,
        xgrid: torch.Tensor,
        cspacing: tuple[float, float, float],
        volume: Volume,
    ) -> np.ndarray:
        """Trachea and main bronchi on the coarse grid (boolean), or all False."""
        airway = np.zeros_like(inside_air)
        tight = inside_air & (coarse < self.AIRWAY_HU).cpu().numpy()
        if not tight.any():
            return airway
        nz = tight.shape[0]
        # head end: the end of the k axis with the larger patient z
        order = list(range(nz - 1, -1, -1)) if volume.slice_direction[2] > 0 else list(range(nz))
        pixel_mm2 = cspacing[1] * cspacing[2]
        lo, hi = (a / pixel_mm2 for a in self.TRACHEA_AREA_MM2)
        branch_max = self.AIRWAY_BRANCH_MAX_MM2 / pixel_mm2
        xs = xgrid.cpu().numpy()

        seed_at = None
        seed = None
        for k in order[: max(1, math.ceil(self.AIRWAY_SEARCH_MM / cspacing[0]))]:
            lab, n = ndimage.label(tight[k])
            if n == 0 or not body[k].any():
                continue
            mid = float(xs[k][body[k]].mean())
            areas = np.bincount(lab.ravel(), minlength=n + 1)
            best, best_area = 0, 0
            for c in range(1, n + 1):
                if not lo <= areas[c] <= hi:
                    continue
                cx = float(xs[k][lab == c].mean())
                if abs(cx - mid) <= self.AIRWAY_CENTRAL_MM and areas[c] > best_area:
                    best, best_area = c, areas[c]
            if best:
                seed_at, seed = k, lab == best
                break
        if seed is None:
            return airway  # scan starts below the carina, or no clear trachea

        airway[seed_at] = seed
        prev = seed
        reach = max(1, math.ceil(cspacing[0] / min(cspacing[1:])))  # oblique bronchi
        max_steps = math.ceil(self.AIRWAY_MAX_DEPTH_MM / cspacing[0])
        start = order.index(seed_at)
        for k in order[start + 1 : start + 1 + max_steps]:
            lab, n = ndimage.label(tight[k])
            if n == 0:
                break
            near = ndimage.binary_dilation(prev, iterations=reach)
            hits = np.unique(lab[near & (lab > 0)])
            if hits.size == 0:
                break
            areas = np.bincount(lab.ravel(), minlength=n + 1)
            keep = [c for c in hits if areas[c] <= branch_max]
            if not keep or len(keep) > 4:
                break  # merged into the lung, or into the segmental tree: stop here
            cur = np.isin(lab, keep)
            airway[k] = cur
            prev = cur
        return airway

    def _pick_lungs(
        self,
        candidates: np.ndarray,
        xgrid: torch.Tensor,
        midline_x: float,
        cvoxel_ml: float,
        cspacing: tuple[float, float, float],
        dev: torch.device,
    ) -> list[np.ndarray]:
        """One boolean mask per lung found (0, 1 or 2), on the coarse grid."""
        comp, n = ndimage.label(candidates)
        if n == 0:
            return []
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        min_vox = self.MIN_LUNG_ML / cvoxel_ml
        order = [int(c) for c in np.argsort(sizes)[::-1] if sizes[c] >= min_vox]
        if not order:
            return []
        xs = xgrid.cpu().numpy()
        left = xs > midline_x

        def left_share(mask: np.ndarray) -> float:
            return float(left[mask].mean())

        first = comp == order[0]
        share = left_share(first)
        if 0.2 <= share <= 0.8:  # both lungs in one component: split it
            return self._split(first, left, cspacing, dev)
        first_left = share > 0.5
        for c in order[1:]:
            other = comp == c
            if (left_share(other) > 0.5) != first_left:
                return [first, other]
        return [first]

    def _split(
        self, mask: np.ndarray, left: np.ndarray, cspacing: tuple[float, float, float], dev: torch.device
    ) -> list[np.ndarray]:
        """Split a component holding both lungs: erode until it falls apart, grow back."""
        kz = 1 if cspacing[0] <= 2.5 else 0
        box = _bbox(mask, (kz, 1, 1))
        full_mask, mask, left = mask, mask[box], left[box]
        m = torch.as_tensor(mask, device=dev)
        eroded = m
        total = int(m.sum())
        for it in range(1, self.SPLIT_MAX_EROSIONS + 1):
            eroded = _erode(eroded, (kz, 1, 1))
            comp, n = ndimage.label(eroded.cpu().numpy())
            if n < 2:
                if n == 0:
                    break
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            a, b = (int(c) for c in np.argsort(sizes)[::-1][:2])
            if sizes[b] < 0.1 * sizes[a] or sizes[b] < 0.02 * total:
                continue
            seeds = torch.zeros(mask.shape, dtype=torch.uint8, device=dev)
            seeds[torch.as_tensor(comp == a, device=dev)] = 1
            seeds[torch.as_tensor(comp == b, device=dev)] = 2
            grown = _grow(seeds, m, it + 2, (kz, 1, 1))
            rest = m & (grown == 0)
            left_t = torch.as_tensor(left, device=dev)
            # anything the growth did not reach goes to the seed on its side of the midline
            side_a_left = bool(left_t[grown == 1].float().mean() > 0.5)
            grown[rest & (left_t == side_a_left)] = 1
            grown[rest & (left_t != side_a_left)] = 2
            g = np.zeros(full_mask.shape, dtype=np.uint8)
            g[box] = grown.cpu().numpy()
            LOG.debug("lung_density: lungs separated after %d erosions", it)
            return [g == 1, g == 2]
        LOG.info("lung_density: lungs not separable by erosion; splitting along the midline")
        left_full = np.zeros_like(full_mask)
        left_full[box] = left
        return [full_mask & ~left_full, full_mask & left_full]

    # -- measures ----------------------------------------------------------------------

    def _measure(
        self, labels: torch.Tensor, hu: torch.Tensor, voxel_ml: float
    ) -> dict[str, dict[str, tuple[float, str]]]:
        out: dict[str, dict[str, tuple[float, str]]] = {}
        box = _bbox_t(labels > 0)
        if box is None:
            return out
        labels, hu = labels[box], hu[box]
        inside = labels > 0
        lung_hu = hu[inside]  # one gather inside the lungs' bounding box, then per lung
        lung_lab = labels[inside]
        per_lung = {v: lung_hu[lung_lab == v] for v in (RIGHT_LUNG, LEFT_LUNG)}
        integer = bool(torch.equal(lung_hu, torch.round(lung_hu)))
        hists: dict[int, torch.Tensor] = {}
        low = float(lung_hu.min()) if lung_hu.numel() else 0.0
        for name, key in ((NAMES[RIGHT_LUNG], RIGHT_LUNG), (NAMES[LEFT_LUNG], LEFT_LUNG), ("total", 0)):
            values = per_lung[key] if key else lung_hu
            n = int(values.numel())
            if n == 0:
                continue
            if integer:
                # integer HU (the usual CT case): exact measures from a 1 HU histogram
                hist = (
                    torch.bincount((values - low).long())
                    if key
                    else _add_hists(hists.get(RIGHT_LUNG), hists.get(LEFT_LUNG))
                )
                hists[key] = hist
                mean, laa, pd = _hist_measures(hist, low, self.LAA_HU, self.PD_PERCENTILE)
            else:
                mean = float(values.double().mean())
                laa = 100.0 * float((values < self.LAA_HU).double().mean())
                pd = _percentile(values, self.PD_PERCENTILE)
            out[name] = {
                "volume": (n * voxel_ml, "ml"),
                "mean density": (mean, HU_UNIT),
                "LAA%-950": (laa, "%"),
                "PD15": (pd, HU_UNIT),
            }
        return out


# -- torch helpers (work on any device) ------------------------------------------------


def _pool(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Mean over blocks of ``factors`` voxels."""
    if all(f == 1 for f in factors):
        return x
    # ceil_mode: a last, partial block is the mean of the voxels it has (no padded copy)
    return F.avg_pool3d(x[None, None], factors, stride=factors, ceil_mode=True)[0, 0]


def _upsample(x: torch.Tensor, factors: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    for dim, f in enumerate(factors):
        if f > 1:
            x = x.repeat_interleave(f, dim=dim)
    return x[: shape[0], : shape[1], : shape[2]]


def _patient_x_grid(
    volume: Volume, factors: tuple[int, ...], cshape: tuple[int, ...], dev: torch.device
) -> torch.Tensor:
    """Patient x (mm, LPS) of the centre of every coarse voxel."""
    a = volume.affine
    axes = []
    for dim, (f, n) in enumerate(zip(factors, cshape, strict=True)):
        centres = torch.arange(n, dtype=torch.float64, device=dev) * f + (f - 1) / 2.0
        axes.append(centres * float(a[0, dim]))
    return (
        axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] + float(a[0, 3])
    ).float()


def _kernel(r: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return (2 * r[0] + 1, 2 * r[1] + 1, 2 * r[2] + 1), r


def _dilate(m: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    """Binary dilation by a (2r+1) box, as separable shifted ORs (fast on CPU and GPU).

    Outside the volume counts as background.
    """
    out = m.clone()
    for dim, radius in enumerate(r):
        n = out.shape[dim]
        if radius == 0 or n < 2:
            continue
        src = out.clone()
        for step in range(1, min(radius, n - 1) + 1):
            out.narrow(dim, step, n - step).logical_or_(src.narrow(dim, 0, n - step))
            out.narrow(dim, 0, n - step).logical_or_(src.narrow(dim, step, n - step))
    return out


def _erode(m: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    """Erosion; outside the volume counts as foreground (no erosion from the edges)."""
    return ~_dilate(~m, r)


def _dilate_np(m: np.ndarray, r: tuple[int, int, int], dev: torch.device) -> np.ndarray:
    return _dilate(torch.as_tensor(m, device=dev), r).cpu().numpy()


def _bbox(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``margin`` (clipped to the array)."""
    box = []
    for dim in range(3):
        other = tuple(d for d in range(3) if d != dim)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(0, int(idx[0]) - margin[dim]) if idx.size else 0
        hi = min(mask.shape[dim], int(idx[-1]) + 1 + margin[dim]) if idx.size else 0
        box.append(slice(lo, hi))
    return box[0], box[1], box[2]


def _close_np(m: np.ndarray, r: tuple[int, int, int], dev: torch.device) -> np.ndarray:
    t = torch.as_tensor(m, device=dev)
    # pad so that closing near the volume edge behaves like in the interior
    pad = (r[2], r[2], r[1], r[1], r[0], r[0])
    tp = F.pad(t[None, None].float(), pad, mode="replicate")[0, 0] > 0
    closed = _erode(_dilate(tp, r), r)
    return closed[
        r[0] : r[0] + t.shape[0], r[1] : r[1] + t.shape[1], r[2] : r[2] + t.shape[2]
    ].cpu().numpy() | m


def _grow(seeds: torch.Tensor, within: torch.Tensor, steps: int, r: tuple[int, int, int]) -> torch.Tensor:
    """Grow labels 1 and 2 at the same pace inside ``within``; contested voxels stay 0."""
    lab = seeds.clone()
    for _ in range(steps):
        free = within & (lab == 0)
        d1 = _dilate(lab == 1, r) & free
        d2 = _dilate(lab == 2, r) & free
        lab[d1 & ~d2] = 1
        lab[d2 & ~d1] = 2
    return lab


def _dilate_labels(lab: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    """Each label grown by ``r``; where two would meet, the original label (or none) wins."""
    out = lab.clone()
    grown = [(v, _dilate(lab == v, r)) for v in (RIGHT_LUNG, LEFT_LUNG)]
    contested = grown[0][1] & grown[1][1]
    for v, g in grown:
        out[g & (lab == 0) & ~contested] = v
    return out


def _erode_labels(lab: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    out = torch.zeros_like(lab)
    for v in (RIGHT_LUNG, LEFT_LUNG):
        out[_erode(lab == v, r)] = v
    return out


def _bbox_t(mask: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """Bounding box of a boolean tensor (None when empty), computed on its device."""
    box = []
    for dim in range(3):
        other = tuple(d for d in range(3) if d != dim)
        idx = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0])).flatten()
        if idx.numel() == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return box[0], box[1], box[2]


def _add_hists(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    if a is None or b is None:
        return a if b is None else b  # type: ignore[return-value]
    n = max(a.numel(), b.numel())
    return F.pad(a, (0, n - a.numel())) + F.pad(b, (0, n - b.numel()))


def _hist_measures(hist: torch.Tensor, low: float, laa_hu: float, q: float) -> tuple[float, float, float]:
    """Mean, LAA% and the q-th percentile (numpy's linear rule) of integer values
    given as counts per value ``low + index``; exact."""
    counts = hist.double()
    n = float(counts.sum())
    values = torch.arange(hist.numel(), dtype=torch.float64, device=hist.device) + low
    mean = float((counts * values).sum()) / n
    laa = 100.0 * float(counts[values < laa_hu].sum()) / n
    cum = torch.cumsum(hist, 0)
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)

    def kth(k: int) -> float:  # the k-th smallest value, 0-based
        return float(values[int(torch.searchsorted(cum, torch.tensor([k + 1], device=cum.device))[0])])

    v_lo = kth(lo)
    frac = pos - lo
    return mean, laa, v_lo if frac == 0 else v_lo + (kth(lo + 1) - v_lo) * frac


def _percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated percentile (as numpy's default), exact, on any device.

    ``torch.quantile`` refuses inputs over 16 M elements; ``kthvalue`` does not.
    """
    n = values.numel()
    if n == 1:
        return float(values.reshape(-1)[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    frac = pos - lo
    flat = values.reshape(-1)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    if frac == 0.0:
        return v_lo
    v_hi = float(torch.kthvalue(flat, lo + 2).values)
    return v_lo + (v_hi - v_lo) * frac
