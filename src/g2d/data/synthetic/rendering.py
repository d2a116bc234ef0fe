"""Rendering a synthetic radiograph: anatomy on a canvas, findings drawn into it, masks and boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from g2d.data.synthetic.findings import FINDINGS, SyntheticCXRCfg, choose_findings, validate_findings
from g2d.data.synthetic.reports import make_report

# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: ``x``, ``y`` each ``[S, S]`` float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, n: int) -> np.ndarray:
    """``[S, n]`` smooth interpolation weights; rows have unit L2 norm so that
    ``A @ N @ A.T`` of i.i.d. unit normals ``N`` has unit variance at every pixel."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * n - 0.5
    d = pos[:, None] - np.arange(n)[None, :]
    w = np.exp(-0.5 * (d / 0.7) ** 2)
    w[w < 1e-6] = 0.0  # float32 denormals would make the matmul ~20x slower
    return (w / np.sqrt((w * w).sum(1, keepdims=True))).astype(np.float32)


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed ``[2S, 2S]`` unit-variance noise, white and smooth (~20 blobs per image side).

    Per-sample random crops are much cheaper than sampling fresh noise at every pixel.
    """
    rng = np.random.default_rng(20240611)
    white = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    a = _upsample_matrix(2 * size, 40)
    smooth = a @ rng.standard_normal((40, 40), dtype=np.float32) @ a.T
    return white, smooth


def _smooth_noise(rng: np.random.Generator, size: int, n: int, win: tuple[slice, slice] | None = None) -> np.ndarray:
    """Unit-variance band-limited noise with ~``n`` blobs across; ``[S, S]`` or the window."""
    a = _upsample_matrix(size, n)
    g = rng.standard_normal((n, n), dtype=np.float32)
    if win is None:
        return a @ g @ a.T
    return a[win[0]] @ g @ a[win[1]].T


def _ramp(sd: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance (negative inside), edge ``width`` wide."""
    return np.clip(0.5 - sd / width, 0.0, 1.0)


def _lin(t: np.ndarray) -> np.ndarray:
    return np.clip(t, 0.0, 1.0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(z2: np.ndarray) -> np.ndarray:
    """``exp(-z2)`` without float32 denormals (they slow every later op on the array)."""
    return np.exp(-np.minimum(z2, 80.0))


def _ellipse_sd(du: np.ndarray, dv: np.ndarray, ru: Any, rv: Any) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (first-order, (q-1)/|grad q|)."""
    x = du / ru
    y = dv / rv
    q = np.sqrt(x * x + y * y) + 1e-6
    xr = x / ru
    yr = y / rv
    g = np.sqrt(xr * xr + yr * yr) + 1e-6
    return (q - 1.0) * q / g


@lru_cache(maxsize=4)
def _polar_tables(n_a: int, n_r: int, res_a: int, res_r: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation matrices from a coarse periodic (angle) x (radius) grid to a fine one."""
    pa = np.arange(res_a) / res_a * n_a
    da = (pa[:, None] - np.arange(n_a)[None, :] + n_a / 2) % n_a - n_a / 2  # periodic
    wa = np.maximum(1.0 - np.abs(da), 0.0)
    pr = np.arange(res_r) / (res_r - 1) * (n_r - 1)
    wr = np.maximum(1.0 - np.abs(pr[:, None] - np.arange(n_r)[None, :]), 0.0)
    return wa.astype(np.float32), wr.astype(np.float32)


def _polar_noise(rng: np.random.Generator, ang: np.ndarray, r: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Noise on polar coordinates (``ang`` in radians, ``r`` in [0, 0.5]), one field per side.

    A coarse random ``[40 angles, 5 radii]`` grid per side is interpolated onto a fine
    ``[512, 48]`` table once, then looked up with a single gather (fast nearest-neighbour on
    a table much finer than a pixel at these radii).
    """
    n_a, n_r, res_a, res_r = 40, 5, 512, 48
    wa, wr = _polar_tables(n_a, n_r, res_a, res_r)
    g = rng.standard_normal((2, n_a, n_r), dtype=np.float32)
    table = np.stack([wa @ g[0] @ wr.T, wa @ g[1] @ wr.T]).reshape(-1)
    ia = ((ang + np.pi) * (res_a / (2 * np.pi))).astype(np.int32)
    ia &= res_a - 1  # res_a is a power of two; wraps the angle
    ir = (np.minimum(r, 0.5) * ((res_r - 1) / 0.5) + 0.5).astype(np.int32)
    idx = ia * res_r + ir
    idx += side * (res_a * res_r)
    return np.take(table, idx)


def _box_of(mask: np.ndarray) -> list[float]:
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def _child_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    # Independent streams so that forcing findings leaves anatomy/noise/text untouched.
    seeds = rng.integers(0, 2**63 - 1, size=n)
    return [np.random.default_rng(int(s)) for s in seeds]


# --------------------------------------------------------------------------- anatomy


_ANATOMY_RANGES: dict[str, tuple[float, float]] = {
    "scale": (0.92, 1.04),
    "shift_x": (-0.02, 0.02),
    "shift_y": (-0.025, 0.025),
    "rot_deg": (-4.0, 4.0),
    "lung_ac": (0.19, 0.21),  # lung centre distance from midline
    "lung_vc": (0.44, 0.48),
    "lung_top": (0.30, 0.34),  # centre-to-apex
    "lung_med": (0.12, 0.14),
    "lung_lat": (0.155, 0.175),
    "dome_r": (0.63, 0.67),  # right hemidiaphragm is higher (liver)
    "dome_l": (0.66, 0.70),
    "dome_k": (3.0, 4.0),
    "heart_u": (0.07, 0.085),
    "heart_v": (0.625, 0.65),
    "heart_rx": (0.14, 0.155),
    "heart_ry": (0.11, 0.125),
    "heart_rot_deg": (12.0, 24.0),
    "ra_u": (0.03, 0.04),
    "ra_r": (0.05, 0.06),
    "med_w": (0.045, 0.06),
    "torso_w": (0.42, 0.47),
    "shoulder": (0.08, 0.13),
    "clav_v": (0.2, 0.23),
    "rib_sp": (0.95, 1.08),
    "rib_phase": (0.0, 1.0),
    "rib_curve": (1.0, 1.5),
    "tissue": (0.58, 0.66),
    "air": (0.36, 0.43),
    "gamma": (0.85, 1.2),
    "contrast": (0.9, 1.1),
    "bright": (-0.04, 0.04),
    "noise": (0.006, 0.018),
    "bubble": (0.0, 1.0),
}
_ANATOMY_LO = np.array([lo for lo, _ in _ANATOMY_RANGES.values()])
_ANATOMY_HI = np.array([hi for _, hi in _ANATOMY_RANGES.values()])


def _sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-sample anatomy / exposure parameters in canonical units (image side = 1)."""
    vals = rng.uniform(_ANATOMY_LO, _ANATOMY_HI).tolist()
    a = dict(zip(_ANATOMY_RANGES, vals))
    a["rot"] = math.radians(a.pop("rot_deg"))
    a["heart_rot"] = math.radians(a.pop("heart_rot_deg"))
    return a


class _Canvas:
    """Pixel grid plus the per-sample similarity transform to canonical anatomy coordinates.

    Canonical coordinates ``(u, v)`` put the patient upright in ``[0, 1]^2`` with the midline
    at ``u = 0.5``; image = ``0.5 + shift + scale * R(rot) (canonical - 0.5)``.  Structures
    that cover a small part of the image are evaluated only inside a window (``win``), which
    keeps rendering fast.
    """

    def __init__(self, a: dict[str, float], size: int) -> None:
        self.size = size
        self.scale = a["scale"]
        self.sx, self.sy = a["shift_x"], a["shift_y"]
        self.c, self.s = math.cos(a["rot"]), math.sin(a["rot"])
        x, y = _pixel_grid(size)
        px = (x - (0.5 + self.sx)) * (1.0 / self.scale)
        py = (y - (0.5 + self.sy)) * (1.0 / self.scale)
        self.u = self.c * px + self.s * py + 0.5
        self.v = (self.c * py + 0.5) - self.s * px
        du = self.u - 0.5
        self.side = du > 0  # True = image right = patient's LEFT
        self.lat = np.abs(du)  # distance from the midline
        self.px = 1.0 / (size * self.scale)  # one pixel in canonical units

    def win(self, u0: float, u1: float, v0: float, v1: float, pad: int = 2) -> tuple[slice, slice]:
        """Pixel slices covering the canonical rectangle ``[u0, u1] x [v0, v1]``."""
        us = np.array([u0, u1, u0, u1]) - 0.5
        vs = np.array([v0, v0, v1, v1]) - 0.5
        xs = (0.5 + self.sx + self.scale * (self.c * us - self.s * vs)) * self.size - 0.5
        ys = (0.5 + self.sy + self.scale * (self.s * us + self.c * vs)) * self.size - 0.5
        n = self.size
        r0 = min(max(int(math.floor(ys.min())) - pad, 0), n)
        r1 = min(max(int(math.ceil(ys.max())) + pad + 1, 0), n)
        c0 = min(max(int(math.floor(xs.min())) - pad, 0), n)
        c1 = min(max(int(math.ceil(xs.max())) + pad + 1, 0), n)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _anatomy_fields(a: dict[str, float], cv: _Canvas, heart_scale: float) -> dict[str, Any]:
    """Signed-distance fields (negative inside) of body, diaphragm, heart, mediastinum, lungs.

    Each is ``[S, S]`` float32; fields evaluated in a window hold a constant outside it.
    """
    S = cv.size
    u, v, lat, side = cv.u, cv.v, cv.lat, cv.side
    # Body: neck + sloping shoulders + torso.
    shoulder_v = (0.02 + a["shoulder"] * _smoothstep((lat - 0.06) * (1 / 0.16))
                  + 2.5 * np.square(np.maximum(lat - 0.28, 0.0)))
    torso_half = (a["torso_w"] + 0.04) - 0.04 * _lin((v - 0.1) * (1 / 0.35)) - 0.03 * _lin((v - 0.7) * (1 / 0.3))
    body_sd = np.maximum(shoulder_v - v, lat - torso_half)

    # Diaphragm domes (one parabola per side); only the lower part of the image can be below.
    dome_min = min(a["dome_l"], a["dome_r"])
    wd = cv.win(0.0, 1.0, dome_min - 0.02, 1.2)
    dome_sd = np.full((S, S), -1.0, np.float32)
    ddl = lat[wd] - 0.17
    dome_v = np.where(side[wd], np.float32(a["dome_l"]), np.float32(a["dome_r"])) + a["dome_k"] * ddl * ddl
    dome_sd[wd] = (v[wd] - dome_v) / np.sqrt(1.0 + np.square((2.0 * a["dome_k"]) * ddl))

    # Heart: rotated ellipse right of the image midline plus the right-atrial bulge that
    # crosses the spine on the image's left.
    hs = heart_scale
    hcu = 0.5 + a["heart_u"] + 0.03 * (hs - 1.0)
    hrx, hry = a["heart_rx"] * hs, a["heart_ry"] * (1 + 0.35 * (hs - 1))
    ra_r = a["ra_r"] * (1 + 0.5 * (hs - 1))
    ra_u = 0.5 - a["ra_u"] - 0.02 * (hs - 1)
    ra_v = a["heart_v"] + 0.01
    hr_max = max(hrx, hry) + 0.01
    wh = cv.win(min(hcu - hr_max, ra_u - ra_r - 0.01), hcu + hr_max, min(a["heart_v"] - hr_max, ra_v - ra_r - 0.01),
                a["heart_v"] + hr_max)
    heart_sd = np.full((S, S), 1.0, np.float32)
    hu = u[wh] - hcu
    hv = v[wh] - a["heart_v"]
    ch, sh = math.cos(a["heart_rot"]), math.sin(a["heart_rot"])
    hsd = _ellipse_sd(ch * hu + sh * hv, ch * hv - sh * hu, hrx, hry)
    ra_sd = np.sqrt(np.square(u[wh] - ra_u) + np.square(v[wh] - ra_v)) - ra_r
    heart_sd[wh] = np.minimum(hsd, ra_sd)

    # Mediastinum: central band widening downwards plus the aortic knob (patient's left).
    wm = cv.win(0.38, 0.62, -0.1, 1.1)
    med_sd = np.full((S, S), 1.0, np.float32)
    um, vm = u[wm], v[wm]
    med_half = a["med_w"] + 0.02 * _smoothstep((vm - 0.25) * (1 / 0.3))
    knob = np.sqrt(np.square(um - 0.555) + np.square(vm - 0.31)) - 0.038
    med_sd[wm] = np.maximum(np.minimum(lat[wm] - med_half, knob), 0.02 - vm)

    # Lungs: quarter-ellipses around a per-side centre, cut by dome, heart and mediastinum.
    lung_v0 = a["lung_vc"] - a["lung_top"]
    # Lowest lung point (costophrenic angle), from a 1-D scan: the window stops just below it.
    lat_max = a["lung_ac"] + a["lung_lat"]
    ls = np.linspace(a["lung_ac"], lat_max, 64)
    ell_bottom = a["lung_vc"] + 0.5 * np.sqrt(np.maximum(1.0 - ((ls - a["lung_ac"]) / a["lung_lat"]) ** 2, 0.0))
    dome_bottom = max(a["dome_l"], a["dome_r"]) + a["dome_k"] * (ls - 0.17) ** 2
    lung_v1 = float(np.max(np.minimum(ell_bottom, dome_bottom))) + 0.02
    wl = cv.win(0.5 - lat_max - 0.01, 0.5 + lat_max + 0.01, lung_v0 - 0.01, lung_v1)
    lung_sd = np.full((S, S), 1.0, np.float32)
    da = lat[wl] - a["lung_ac"]
    dv = v[wl] - a["lung_vc"]
    ru = np.where(da > 0, np.float32(a["lung_lat"]), np.float32(a["lung_med"]))
    rv = np.where(dv > 0, np.float32(0.5), np.float32(a["lung_top"]))
    lsd = _ellipse_sd(da, dv, ru, rv)
    lsd = np.maximum(lsd, dome_sd[wl])
    lsd = np.maximum(lsd, -heart_sd[wl])
    lsd = np.maximum(lsd, -med_sd[wl])
    lung_sd[wl] = np.maximum(lsd, body_sd[wl])
    return {
        "body_sd": body_sd, "dome_sd": dome_sd, "heart_sd": heart_sd, "med_sd": med_sd, "lung_sd": lung_sd,
        "wd": wd, "wh": wh, "wm": wm, "wl": wl,
    }


def _pick_point(
    rng: np.random.Generator, lung_sd: np.ndarray, side: np.ndarray, loc: str, margin: float, avoid: np.ndarray
) -> tuple[int, int] | None:
    """Random pixel well inside the lung zone named by ``loc`` (``"<side> <level> zone"``).

    Zones are the upper / middle / lower thirds of that lung's pixel rows.  Pixels in
    ``avoid`` (fluid, pneumothorax gap) are used only if nothing else is left.
    """
    side_name, level = loc.split()[:2]
    side_lung = (lung_sd < 0) & (side if side_name == "left" else ~side)
    rows = np.flatnonzero(side_lung.any(1))
    if rows.size == 0:
        return None
    k = {"upper": 0, "mid": 1, "lower": 2}[level]
    height = rows[-1] + 1 - rows[0]
    lo = int(math.ceil(rows[0] + height * k / 3.0 - 1e-6))
    hi = int(math.ceil(rows[0] + height * (k + 1) / 3.0 - 1e-6))
    for m, av in ((margin, True), (margin / 2, True), (0.0, True), (0.0, False)):
        cand = side_lung[lo:hi] & (lung_sd[lo:hi] < -m)
        if av:
            cand &= ~avoid[lo:hi]
        idx = np.flatnonzero(cand)
        if idx.size:
            i = int(idx[int(rng.integers(idx.size))])
            r, c = divmod(i, lung_sd.shape[1])
            return r + lo, c
    return None


# --------------------------------------------------------------------------- rendering


def render_sample(
    rng: np.random.Generator,
    cfg: SyntheticCXRCfg,
    findings: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Render one synthetic radiograph and its report from ``rng`` (pure function).

    Args:
        rng: the per-sample generator, e.g. ``numpy.random.default_rng([seed, index])``.
        cfg: only ``image_size``, ``normal_fraction`` and ``max_findings`` are used.
        findings: optionally force the ``(finding, location)`` list (distinct finding types);
            anatomy, noise and phrasing then stay those that ``rng`` gives for any findings.

    Returns:
        dict with ``image`` ``[1, S, S]`` float32 in [0, 1]; ``text`` str; ``mask`` ``[1, S, S]``
        union of finding masks; ``boxes`` ``[N, 4]`` xyxy pixels; ``box_labels`` ``[N]`` int64
        index into FINDINGS; ``labels`` ``[len(FINDINGS)]`` multi-hot; ``findings`` list of
        ``(finding, location)``; ``body``, ``lungs``, ``heart`` ``[1, S, S]`` 0/1 masks;
        ``finding_masks`` ``[N, S, S]`` 0/1 per-finding masks (same order as ``boxes``).
    """
    S = cfg.image_size
    r_find, r_anat, r_noise, r_text = _child_rngs(rng, 4)
    chosen = choose_findings(r_find, cfg)
    if findings is not None:
        chosen = validate_findings(findings)
    kinds = {fd for fd, _ in chosen}
    heart_scale = float(r_find.uniform(1.4, 1.6)) if "cardiomegaly" in kinds else 1.0
    # Size words in the report follow the rendered size, so they are learnable too.
    severity: dict[str, str] = {"cardiomegaly": "moderate" if heart_scale >= 1.5 else "mild"}

    A = _sample_anatomy(r_anat)
    cv = _Canvas(A, S)
    F = _anatomy_fields(A, cv, heart_scale)
    px = cv.px
    u, v, lat, side = cv.u, cv.v, cv.lat, cv.side
    body_sd, lung_sd, heart_sd = F["body_sd"], F["lung_sd"], F["heart_sd"]
    wd, wh, wm, wl = F["wd"], F["wh"], F["wm"], F["wl"]
    body = body_sd < 0
    lung = lung_sd < 0
    # The heart's part below the diaphragm is invisible on film, so the mask stops there.
    heart = (heart_sd < 0) & body & (F["dome_sd"] < 0.01)

    # Everything below is an additive "density" D; the image is a monotone map of it.
    body_s = _ramp(body_sd, 1.5 * px)
    # Tissue gets thicker away from the skin line.
    D = body_s * (A["tissue"] * (0.75 + 0.25 * _lin(body_sd * (-1 / 0.06))))
    # Upper abdomen, mediastinum and heart: soft tissue of similar density, so they merge
    # (max, not sum) and the heart's lower border disappears into the diaphragm as on film.
    central = np.zeros((S, S), np.float32)
    central[wd] = 0.05 * _ramp(-F["dome_sd"][wd], 3 * px)
    central[wm] = np.maximum(central[wm], 0.05 * _ramp(F["med_sd"][wm], 2 * px))
    central[wh] = np.maximum(central[wh], 0.06 * _ramp(heart_sd[wh], 2 * px))
    D += central * body_s

    # ---- lung field (window wl): air, vascular markings, ribs over it.
    vl, latl, sidel = v[wl], lat[wl], side[wl]
    lsd = lung_sd[wl]
    lung_s = _ramp(lsd, 1.5 * px)
    # Air: darker centrally and towards the apices, lighter at the bases.
    lung_depth = A["air"] * (0.8 + 0.2 * _lin(lsd * (-1 / 0.05))) * (1.05 - 0.25 * _smoothstep((vl - 0.4) * (1 / 0.35)))
    # Vascular markings fan out from the hila and fade towards the periphery: zero crossings
    # of noise that varies fast in angle and slowly in radius give branching, tapering lines.
    ha = latl - 0.09
    hv = vl - 0.47
    hr = np.sqrt(ha * ha + hv * hv)
    n1 = _smooth_noise(r_anat, S, 28, wl)
    n2 = _smooth_noise(r_anat, S, 12, wl)
    ang = np.arctan2(hv, ha) + 0.08 * n2
    field = _polar_noise(r_anat, ang, hr, sidel.view(np.int8).astype(np.int32))
    vessels = _gauss(np.square(field * (hr + 0.05) * (1 / 0.04))) * _lin(hr * (1 / 0.08))
    markings = (0.07 * vessels + 0.015 * n1 + 0.02) * _gauss(hr * (1 / 0.28)) + 0.006 * n1
    markings += 0.10 * _gauss(np.square(hr * (1 / 0.045)))  # hilar shadows
    # Ribs: posterior ribs near-horizontal medially, curving down laterally, spacing growing
    # downwards; anterior ribs fainter, sloping down towards the midline.  Only drawn over
    # the thorax (they fade below the domes and at the spine).
    w = vl + latl * (0.15 - A["rib_curve"] * latl)
    phase = (2 * np.pi * 9.0 * A["rib_sp"]) * np.sqrt(np.maximum(w, 0.0) + 0.02) + 2 * np.pi * A["rib_phase"]
    post = np.clip((np.cos(phase) - 0.35) * 4.0, 0.0, 1.0)
    wa = vl + 0.55 * latl
    ant = np.clip((np.cos((2 * np.pi * 11.0 * A["rib_sp"]) * wa + 2 * np.pi * A["rib_phase"]) - 0.55) * 3.0, 0.0, 1.0)
    thorax = _lin((latl - 0.035) * (1 / 0.03)) * _lin((0.04 - F["dome_sd"][wl]) * (1 / 0.04)) * body_s[wl]
    ribs = (0.075 * post * (0.3 + 0.7 * lung_s) + 0.025 * ant * lung_s) * thorax

    # ---- findings, each with a pixel mask; effects accumulate in window-wl arrays.
    extra = np.zeros_like(lsd)
    ptx_soft = np.zeros_like(lsd)
    fluid_soft = np.zeros_like(lsd)
    lungl = lsd < 0
    masks: list[np.ndarray] = []
    kept: list[tuple[str, str]] = []
    taken = np.zeros((S, S), bool)
    # Pleural findings first, so that opacities / nodules are placed in the remaining lung.
    for fd, loc in sorted(chosen, key=lambda p: p[0] in ("opacity", "nodule")):
        m = np.zeros((S, S), bool)
        if fd in ("opacity", "nodule"):
            radius = float(r_find.uniform(0.07, 0.11)) if fd == "opacity" else float(r_find.uniform(0.02, 0.03))
            pt = _pick_point(r_find, lung_sd, side, loc, (0.7 if fd == "opacity" else 1.3) * radius, taken)
            if pt is None:
                continue
            cu, cvv = float(u[pt]), float(v[pt])
            reach = radius * 1.4 + 2 * px
            wf = cv.win(cu - reach, cu + reach, cvv - reach, cvv + reach)
            # window relative to wl (wl contains every lung pixel and its ramp)
            rs = slice(max(wf[0].start, wl[0].start), min(wf[0].stop, wl[0].stop))
            cs = slice(max(wf[1].start, wl[1].start), min(wf[1].stop, wl[1].stop))
            loc_w = (slice(rs.start - wl[0].start, rs.stop - wl[0].start),
                     slice(cs.start - wl[1].start, cs.stop - wl[1].start))
            du, dv = u[rs, cs] - cu, v[rs, cs] - cvv
            # no lung tissue in a pneumothorax gap / under fluid: keep the blob out of them
            ls_w = lung_s[loc_w] * (1.0 - np.maximum(ptx_soft[loc_w], fluid_soft[loc_w]))
            free_w = lungl[loc_w] & ~taken[rs, cs]
            if fd == "opacity":
                ang_o = np.arctan2(dv, du)
                wob: Any = 1.0  # becomes a map
                for k in (2, 3, 4):
                    amp = float(r_find.uniform(0.03, 0.09))
                    wob = wob + amp * np.cos(k * ang_o + float(r_find.uniform(0, 2 * np.pi)))
                rn = np.sqrt(du * du + dv * dv) / (radius * wob)
                prof = _smoothstep((1.0 - rn) * 2.0) * (0.85 + 0.15 * np.clip(n1[loc_w], -1.5, 1.5))
                amp = float(r_find.uniform(0.26, 0.34))
                extra[loc_w] += amp * prof * ls_w
                m[rs, cs] = (rn < 0.8) & free_w
            else:
                sd = np.sqrt(du * du + dv * dv) - radius
                amp = float(r_find.uniform(0.3, 0.38))
                extra[loc_w] += amp * _ramp(sd, 1.2 * px) * ls_w
                m[rs, cs] = (sd < 0) & free_w
        elif fd == "effusion":
            sel = sidel if loc.startswith("left") else ~sidel
            dome = A["dome_l"] if loc.startswith("left") else A["dome_r"]
            depth = float(r_find.uniform(0.05, 0.12))
            severity["effusion"] = "small" if depth < 0.085 else "moderate"
            meniscus = float(r_find.uniform(0.05, 0.09))
            # Fluid top: concave upwards, rising along the lateral chest wall (meniscus).
            top = dome - depth - meniscus * _lin((latl - 0.06) * (1 / 0.3)) ** 2.5
            sd_side = np.where(sel, top - vl, np.float32(1.0))
            fluid = _ramp(sd_side, 3 * px) * lung_s
            fluid_soft = np.maximum(fluid_soft, fluid)
            extra += (fluid * (A["air"] * float(r_find.uniform(0.8, 0.95)))
                      * (0.8 + 0.2 * _smoothstep((vl - top) * (1 / 0.06))))
            m[wl] = (sd_side < 0) & lungl
        elif fd == "pneumothorax":
            sel = sidel if loc.startswith("left") else ~sidel
            apex_v = A["lung_vc"] - A["lung_top"]
            gap = float(r_find.uniform(0.05, 0.09))
            severity["pneumothorax"] = "small" if gap < 0.07 else "moderate"
            # Gap between chest wall and the collapsed lung edge: widest at the apex,
            # tapering to zero down the lateral wall and medially.
            taper = _smoothstep((apex_v + 0.28 - vl) * (1 / 0.2)) * _smoothstep((latl - 0.08) * (1 / 0.06))
            psd = np.where(sel, -lsd - gap * taper, np.float32(1.0))  # < 0 inside the gap
            ptx_soft = np.maximum(ptx_soft, _ramp(psd, 1.5 * px) * lung_s)
            line = _gauss(np.square(psd * (1 / (0.8 * px)))) * lung_s * (taper > 0.05)
            extra += 0.14 * line
            m[wl] = (psd < 0) & lungl & (taper > 0.05)
        elif fd == "cardiomegaly":
            m = heart.copy()
        if not m.any():
            continue
        masks.append(m)
        kept.append((fd, loc))
        if fd != "cardiomegaly":
            taken |= m
    order = sorted(range(len(kept)), key=lambda k: FINDINGS.index(kept[k][0]))
    masks = [masks[k] for k in order]
    kept = [kept[k] for k in order]

    if fluid_soft.any():  # fluid hides the vessels and most of the rib contrast
        markings = markings * (1.0 - fluid_soft)
        ribs = ribs * (1.0 - 0.6 * fluid_soft)
    if ptx_soft.any():  # no lung markings beyond the pleural line; air is darker
        markings = markings * (1.0 - ptx_soft)
        ribs = ribs * (1.0 - 0.5 * ptx_soft)
        lung_depth = lung_depth + 0.1 * ptx_soft
    D[wl] += (markings - lung_depth) * lung_s + ribs + extra

    # ---- spine with vertebral bodies, trachea, clavicles, gastric bubble.
    ws = cv.win(0.46, 0.54, -0.1, 1.1)
    vs_ = v[ws]
    vert = 0.75 + 0.25 * (np.cos((2 * np.pi / 0.048) * vs_) > -0.55)
    D[ws] += (0.07 * _ramp(lat[ws] - 0.032, 1.5 * px)) * vert * body_s[ws]
    wt = cv.win(0.46, 0.54, -0.1, 0.36)
    vt = v[wt]
    trachea = (_ramp(lat[wt] - (0.013 + 0.01 * _smoothstep((vt - 0.26) * (1 / 0.08))), 1.5 * px)
               * _ramp(vt - 0.32, 4 * px))
    D[wt] -= 0.12 * trachea * body_s[wt]
    # Clavicles: from the sternal end beside the trachea up and out to the shoulder.
    wc = cv.win(0.06, 0.94, A["clav_v"] - 0.14, A["clav_v"] + 0.03)
    latc = lat[wc]
    clav_c = A["clav_v"] - 0.25 * (latc - 0.04) + 0.3 * np.square(latc - 0.2)
    clav_sd = np.maximum(np.abs(v[wc] - clav_c) - 0.013, np.abs(latc - 0.23) - 0.19)
    D[wc] += 0.09 * _ramp(clav_sd, 1.5 * px) * body_s[wc]
    if A["bubble"] < 0.7:  # gastric air bubble under the left hemidiaphragm
        bv = A["dome_l"] + 0.07
        wb = cv.win(0.6, 0.72, bv - 0.04, bv + 0.04)
        bub = _ellipse_sd(u[wb] - 0.66, v[wb] - bv, 0.045, 0.03)
        D[wb] -= 0.12 * _ramp(bub, 2.5 * px) * body_s[wb]

    # ---- exposure / detector: gamma, window, smooth + fine noise.
    img = np.clip(D + 0.04, 0.0, 1.0) ** A["gamma"]
    img = img * A["contrast"] + (0.5 + A["bright"] - 0.5 * A["contrast"])
    oy, ox, oy2, ox2 = (int(t) for t in r_noise.integers(0, S, size=4))
    white, smooth = _noise_bank(S)
    img += 0.012 * smooth[oy2 : oy2 + S, ox2 : ox2 + S] + A["noise"] * white[oy : oy + S, ox : ox + S]
    img = np.clip(img, 0.0, 1.0)

    union = np.zeros((S, S), bool)
    for m in masks:
        union |= m
    labels = np.zeros(len(FINDINGS), np.float32)
    for fd, _ in kept:
        labels[FINDINGS.index(fd)] = 1.0
    text = make_report(r_text, kept, severity)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]

    return {
        "image": t(img),
        "text": text,
        "mask": t(union),
        "boxes": torch.tensor([_box_of(m) for m in masks], dtype=torch.float32).reshape(-1, 4),
        "box_labels": torch.tensor([FINDINGS.index(fd) for fd, _ in kept], dtype=torch.int64),
        "labels": torch.from_numpy(labels),
        "findings": kept,
        "body": t(body),
        "lungs": t(lung),
        "heart": t(heart),
        "finding_masks": torch.from_numpy(np.stack(masks).astype(np.float32)) if masks else torch.zeros(0, S, S),
    }
