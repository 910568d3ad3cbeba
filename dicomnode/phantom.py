"""A synthetic chest CT realistic enough for the lung model (``dicomnode demo``).

The simple phantom of :mod:`dicomnode.synthetic` (two air ellipses in a soft-tissue
ellipse) exercises the pipeline but looks like no chest. This one is built, slice by
slice, from the structures a chest CT shows, in Hounsfield units and patient
coordinates (DICOM LPS: +x the patient's left, +y posterior, +z head; head-first
supine), so that :mod:`models.lung_density` meets on it what it meets on a patient:

* body: an elliptic trunk narrowing to the neck above the lung apices, skin-side fat
  (-100 HU) around muscle (40 HU), and a couch under the back;
* bones: a ring of ribs (cortical bone, +700 HU) recurring every 25 mm along z and
  sloping down towards the front, vertebral bodies with their spinal canal, the sternum;
* mediastinum: the heart (45 HU) above the left dome of the diaphragm, ascending and
  descending aorta, the trachea (air, -1000 HU, with its wall) from the neck down to the
  carina and the two main bronchi below it;
* two lungs: domed bases (the right dome higher, above the liver), rounded apices,
  cut around the mediastinum; parenchyma about -850 HU with a posterior (dependent)
  density gradient and noise, branching vessels from each hilum, and a few low
  attenuation (emphysema-like, -970 HU) patches in the upper zones;
* image noise (12 HU) everywhere, so nothing is a perfect threshold.

Everything is deterministic for a given ``seed``. On the default 256 x 256 x 120
series (1.4 mm pixels, 2.5 mm slices; about 5 s to make) the lung model finds both
lungs: right 2.77 l, left 2.47 l, mean lung density -831 HU, LAA%-950 0.5 %, PD15
-888 HU, with the trachea and main bronchi left out (tests/test_phantom.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.synthetic import write_ct_series

AIR, FAT, SOFT, BLOOD, BONE, CANCELLOUS = -1000.0, -100.0, 40.0, 45.0, 700.0, 250.0
LUNG = -850.0
EMPHYSEMA = -970.0


@dataclass(frozen=True)
class _Vessel:
    start: np.ndarray  # (3,) mm, at the hilum
    end: np.ndarray  # (3,) mm, towards the periphery
    radius: float  # mm at the hilum; tapers to a third at the end


class ChestPhantom:
    """The HU of a synthetic chest at any axial position (see the module docstring)."""

    def __init__(self, rows: int = 256, cols: int = 256, fov_mm: float = 360.0,
                 seed: int = 0) -> None:
        if rows < 64 or cols < 64:
            raise ValueError(f"rows, cols: at least 64 pixels each, got {rows} x {cols}")
        self.rows, self.cols = rows, cols
        self.pixel_spacing = fov_mm / cols
        corner = -self.pixel_spacing * cols / 2.0
        self.y, self.x = np.mgrid[0:rows, 0:cols].astype(np.float64)
        self.x = corner + self.x * self.pixel_spacing
        self.y = corner + self.y * self.pixel_spacing
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.vessels = [v for side in (-1, 1) for v in self._vessel_tree(side, rng)]
        self.bullae = [(np.array([side * 70.0 + rng.uniform(-15, 15), rng.uniform(-30, 20),
                                  rng.uniform(60, 100)]), rng.uniform(6, 11))
                       for side in (-1, 1) for _ in range(3)]

    # -- geometry ----------------------------------------------------------------------

    @staticmethod
    def _ell(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
             ) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2

    def _body_axes(self, z: float) -> tuple[float, float]:
        """Trunk (165 x 120 mm semi-axes) narrowing to the neck above z = 120 mm."""
        t = float(np.clip((z - 115.0) / 30.0, 0.0, 1.0))
        return 165.0 * (1 - t) + 62.0 * t, 120.0 * (1 - t) + 58.0 * t

    def _heart(self, z: float) -> tuple[float, float, float, float] | None:
        h = 1.0 - ((z + 45.0) / 48.0) ** 2
        if h <= 0:
            return None
        s = float(np.sqrt(h))
        return 20.0, -18.0, 62.0 * s, 50.0 * s

    @staticmethod
    def _trachea(z: float) -> list[tuple[float, float, float]]:
        """(cx, cy, lumen radius) of the airway lumens at ``z``: trachea above the carina
        (z = 50 mm), two main bronchi heading to the hila below it."""
        if z >= 50.0:
            return [(0.0, 2.0, 9.0)]
        if z < 5.0:
            return []
        t = (50.0 - z) / 45.0
        return [(side * 45.0 * t, 2.0 + 8.0 * t, 6.5) for side in (-1, 1)]

    def _diaphragm(self, side: int) -> np.ndarray:
        """z of the lung base under each pixel: a dome, higher in the middle; the right
        (side -1) one higher, over the liver."""
        top = -62.0 if side < 0 else -72.0
        r2 = np.clip(self._ell(self.x, self.y, side * 72.0, 10.0, 85.0, 95.0), 0, 1)
        return top - 55.0 * r2

    def _lung_mask(self, side: int, z: float, cage: np.ndarray, organs: np.ndarray
                   ) -> np.ndarray:
        apex = 118.0 if side < 0 else 115.0
        if z > apex:
            return np.zeros_like(cage)
        w = float(np.sqrt(np.clip((apex - z) / 45.0, 0.0, 1.0)))
        ax, ay = 64.0 * w + 6.0, 88.0 * w + 8.0
        cx = side * (80.0 - 10.0 * (1 - w))
        lung = self._ell(self.x, self.y, cx, 8.0, ax, ay) <= 1.0
        lung &= z > self._diaphragm(side)
        lung &= side * self.x > 14.0  # the mediastinum between the lungs
        return lung & cage & ~organs

    def _vessel_tree(self, side: int, rng: np.random.Generator) -> list[_Vessel]:
        hilum = np.array([side * 45.0, 5.0, 10.0])
        out = []
        for _ in range(26):
            direction = np.array([side * rng.uniform(0.2, 1.0), rng.uniform(-1, 1),
                                  rng.uniform(-1.2, 1.2)])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(50, 95)
            trunk_end = hilum + direction * length
            out.append(_Vessel(hilum, trunk_end, rng.uniform(3.0, 4.5)))
            for _ in range(2):  # two branches from each trunk's far half
                origin = hilum + direction * length * rng.uniform(0.45, 0.8)
                d2 = direction + rng.normal(0, 0.6, 3)
                d2 /= np.linalg.norm(d2)
                out.append(_Vessel(origin, origin + d2 * rng.uniform(25, 45),
                                   rng.uniform(1.5, 2.5)))
        return out

    # -- one slice -----------------------------------------------------------------------

    def slice_hu(self, z: float, index: int) -> np.ndarray:
        """The HU image at table position ``z`` (mm); ``index`` seeds its noise."""
        x, y = self.x, self.y
        rng = np.random.default_rng([self.seed, index])
        hu = np.full(x.shape, AIR)
        bx, by = self._body_axes(z)
        body_r = self._ell(x, y, 0.0, 5.0, bx, by)
        body = body_r <= 1.0
        hu[body] = FAT
        muscle = body_r <= 0.86
        hu[muscle] = SOFT
        # couch: a curved plate under the back
        couch = (y > 5.0 + by + 12.0) & (y < 5.0 + by + 20.0) & (np.abs(x) < 170.0)
        hu[couch] = 150.0

        organs = np.zeros(x.shape, dtype=bool)
        in_chest = -130.0 < z < 125.0
        if in_chest:
            # ribs: a ring just inside the muscle, one rib every 25 mm, sloping forwards
            ring = (body_r > 0.70) & (body_r <= 0.78)
            angle = np.arctan2(y - 5.0, x)
            phase = (z + 18.0 * np.sin(angle) + 9.0 * np.abs(np.cos(angle))) % 25.0
            ribs = ring & (phase < 9.0) & (y > -95.0)  # no ribs over the sternum gap
            hu[ribs] = BONE
            sternum = (self._ell(x, y, 0.0, -5.0 - by * 0.8, 20.0, 7.0) <= 1.0) & (z < 100.0)
            hu[sternum] = BONE
        # spine: vertebral body (cancellous, cortical rim), canal, posterior arch
        vb = self._ell(x, y, 0.0, 5.0 + by * 0.62, 19.0, 16.0)
        hu[vb <= 1.0] = BONE
        hu[vb <= 0.7] = CANCELLOUS
        canal = self._ell(x, y, 0.0, 5.0 + by * 0.62 + 24.0, 8.0, 8.0) <= 1.0
        arch = (self._ell(x, y, 0.0, 5.0 + by * 0.62 + 26.0, 16.0, 14.0) <= 1.0) & ~canal
        hu[arch] = BONE
        hu[canal] = SOFT
        organs |= vb <= 1.6
        organs |= arch | canal
        # mediastinum
        heart = self._heart(z)
        if heart is not None:
            m = self._ell(x, y, *heart) <= 1.0
            hu[m] = BLOOD
            organs |= self._ell(x, y, *heart) <= 1.25
        if -130.0 < z < 60.0:  # descending aorta
            m = self._ell(x, y, 24.0, 5.0 + by * 0.45, 12.0, 12.0)
            hu[m <= 1.0] = BLOOD
            organs |= m <= 1.6
        if -20.0 < z < 60.0:  # ascending aorta
            m = self._ell(x, y, 8.0, -22.0, 15.0, 15.0)
            hu[m <= 1.0] = BLOOD
            organs |= m <= 1.5
        if in_chest:
            organs |= (np.abs(x) < 16.0) & (y < 5.0 + by * 0.5)  # mediastinal fat/vessels

        # lungs: inside the rib cage; parenchyma with a dependent gradient
        cage = body_r <= 0.66
        for side in (-1, 1):
            lung = self._lung_mask(side, z, cage, organs)
            if lung.any():
                hu[lung] = LUNG + 45.0 * np.clip((y[lung] - 8.0) / 88.0, -1, 1)
                hu[lung] += rng.normal(0, 25.0, int(lung.sum()))
                lungs_here = lung
                for centre, radius in self.bullae:
                    if abs(centre[2] - z) < radius:
                        r = float(np.sqrt(radius ** 2 - (centre[2] - z) ** 2))
                        b = lungs_here & (self._ell(x, y, centre[0], centre[1], r, r) <= 1.0)
                        hu[b] = EMPHYSEMA + rng.normal(0, 12.0, int(b.sum()))
                for v in self.vessels:
                    self._draw_vessel(hu, lungs_here, v, z)

        # airway lumen and wall (drawn last: it runs through the mediastinum)
        for cx, cy, r in self._trachea(z):
            d = self._ell(x, y, cx, cy, r, r)
            hu[(d <= (r + 2.5) ** 2 / r ** 2) & (d > 1.0) & (hu < -500)] = SOFT
            hu[(d > 1.0) & (d <= (r + 2.5) ** 2 / r ** 2) & muscle & ~(hu < -500)] = SOFT
            hu[d <= 1.0] = AIR
        hu += rng.normal(0, 12.0, hu.shape)
        return hu

    def _draw_vessel(self, hu: np.ndarray, lung: np.ndarray, v: _Vessel, z: float) -> None:
        z0, z1 = v.start[2], v.end[2]
        if abs(z1 - z0) < 1e-6 or not (min(z0, z1) <= z <= max(z0, z1)):
            return
        t = (z - z0) / (z1 - z0)
        p = v.start + t * (v.end - v.start)
        r = v.radius * (1.0 - 2.0 * t / 3.0)
        # an oblique vessel cuts an ellipse, longer along its in-plane direction
        d = v.end - v.start
        stretch = float(min(4.0, np.linalg.norm(d) / max(abs(d[2]), 1e-3)))
        rx = r * (1 + (stretch - 1) * abs(d[0]) / max(np.hypot(d[0], d[1]), 1e-6))
        ry = r * (1 + (stretch - 1) * abs(d[1]) / max(np.hypot(d[0], d[1]), 1e-6))
        m = lung & (self._ell(self.x, self.y, p[0], p[1], rx, ry) <= 1.0)
        hu[m] = BLOOD


def make_chest_phantom(out_dir: Path, *, n_slices: int = 120, rows: int = 256,
                       cols: int = 256, slice_thickness: float = 2.5, seed: int = 0,
                       study_uid: str | None = None) -> list[Path]:
    """Write the synthetic chest CT series (see the module docstring); returns the paths."""
    if n_slices < 20:
        raise ValueError(f"n_slices: the lung model needs at least 20 slices, got {n_slices}")
    phantom = ChestPhantom(rows, cols, seed=seed)
    z0 = -n_slices * slice_thickness / 2
    slices = (np.rint(phantom.slice_hu(z0 + i * slice_thickness, i)) for i in range(n_slices))
    return write_ct_series(
        out_dir, slices, n_slices=n_slices, rows=rows, cols=cols,
        pixel_spacing=phantom.pixel_spacing, slice_thickness=slice_thickness,
        study_uid=study_uid, study_description="SYNTHETIC CHEST PHANTOM (dicomnode demo)",
        series_description=f"CHEST PHANTOM AXIAL {slice_thickness:g}mm",
        patient_name="PHANTOM^CHEST", patient_id="DEMO0001", window=(40.0, 400.0),
    )


__all__ = ["ChestPhantom", "make_chest_phantom"]
