"""The embedded domain pair: procedural street scenes with a synthetic-looking *source* domain
and a camera-like *target* domain, so the whole CBST loop runs (and is tested) without files.

Each image is a pure function of (domain, split, seed, index, size): a ``SeedSequence`` of
(seed, domain, split, index) draws the scene layout in size-independent units, then the scene
is rasterised at the requested size. Labels are real Cityscapes trainIds (19-class table,
palette and metrics apply); 11 of the 19 classes are drawn and the other 8 never appear.

What is drawn (far to near): a sky gradient, façade columns (buildings with window grids or
vegetation with a ragged top) that grow taller away from the vanishing point, a perspective
road trapezoid with dashed lane marks, sidewalk bands, then objects placed at ground points
with perspective scale: poles carrying a traffic light or a sign, trees, persons on the
sidewalk, riders (bike + person) at the road edge and cars on the road. Small objects keep a
minimum size (poles >= 2 px, lights 3x7 px, signs ~5-7 px at 64x128) so the rare classes stay
learnable after the shift.

The two domains share the camera (horizon, vanishing point, road and sidewalk geometry), as two
dashboard cameras do. The target shift, calibrated so that the source-only model's per-class
IoU on target resembles GTA5->Cityscapes' (docs/results.md), is in the surfaces' appearance
(an overcast, patchy sky as grey as the façades; greyer, lighter façades; a grey sidewalk that
blends into the road; textured asphalt; dull foliage; poles kept neutral grey under the warm
white balance), in the content (taller façades, so less sky; more poles, persons and trees,
fewer cars; smaller small objects) and in a global camera pipeline (blur, low-frequency
illumination field, warm/darker white balance, chroma mixing, haze, sensor noise).
``camera_shift=True`` is the named variant whose target camera sits higher
(``SHIFTED_HORIZON``). No target option changes the source domain.
See docs/synthetic.md for measured class shares and generation speed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cbst_jax.data.io import DatasetError
from cbst_jax.labels import CITYSCAPES_CLASSES, IGNORE_INDEX

ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, SKY, PERSON, RIDER, CAR = (
    0, 1, 2, 5, 6, 7, 8, 10, 11, 12, 13)
# The trainIds the generator draws; every other Cityscapes class has zero pixels.
DRAWN_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, SKY, PERSON, RIDER, CAR)
LARGE_CLASSES = (ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR)
RARE_CLASSES = (POLE, LIGHT, SIGN, PERSON, RIDER)

DOMAINS = ("source", "target")
SPLITS = ("train", "val", "test")
# (domain, split) -> default number of images (the feasibility study's sizes).
DEFAULT_COUNTS = {("source", "train"): 1500, ("source", "val"): 300, ("source", "test"): 300,
                  ("target", "train"): 400, ("target", "val"): 300, ("target", "test"): 300}
# Named resolutions: CPU runs, a finer CPU run, and GPU-sized runs.


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """Camera, content and appearance parameters of one domain (ranges are (low, high)).

    The fields after ``noise`` default to the flat "game" look of the source; the target sets them."""
    horizon: tuple            # horizon row as a fraction of H
    road_half: tuple          # road half-width at the bottom row, fraction of W
    sidewalk: tuple           # sidewalk band width at the bottom row, fraction of W
    poles: tuple              # object counts per image, inclusive ranges
    persons: tuple
    riders: tuple
    cars: tuple
    trees: tuple
    veg_facade: float         # probability that a façade column is vegetation
    small_scale: float        # size factor of lights, signs, persons, riders
    object_chroma: float      # saturation kept in sign, lamp and bike colours (1 = the source palette)
    light_housing: tuple      # traffic-light housing colour
    pole_rgb: tuple
    sky_top: tuple            # clear-sky gradient
    sky_bottom: tuple
    road_rgb: tuple
    sidewalk_rgb: tuple       # one end of the per-image sidewalk colour blend
    jitter: float             # per-instance colour jitter
    noise: float              # Gaussian sensor noise (fraction of full scale)
    sidewalk_alt: tuple | None = None    # the other end of the blend (None: always sidewalk_rgb)
    overcast: tuple = (0.0, 0.0)         # per-image cloud cover: 0 = clear sky, 1 = overcast
    cloud_rgb: tuple = (0.8, 0.8, 0.8)   # colour of the cloud layer
    cloud_patchiness: float = 0.0        # amplitude of the low-frequency field added to the cover
    facade_height: float = 1.0           # height factor of the façade columns
    facade_light: tuple = (0.45, 0.78)   # lightness (red channel) of building façades
    facade_grey: float = 0.0             # up to this share of a façade's saturation is removed
    road_light: tuple = (1.0, 1.0)       # per-image lightness factor of the asphalt
    road_grain: float = 0.0              # amplitude of the asphalt texture (grain and patches)
    paving: float = 0.0                  # darkening of the sidewalk's paving joints
    veg_dull: float = 0.0                # up to this share of the foliage colour turns olive-grey
    blur_sigma: float = 0.0   # at 64 px height; scaled with the image
    illumination: float = 0.0  # amplitude of the low-frequency illumination field
    wb_gains: tuple = (1.0, 1.0, 1.0)
    wb_range: tuple = (1.0, 1.0)
    chroma_mix: float = 0.0
    haze: tuple = (0.0, 1.0)  # out = haze[0] + haze[1] * img


SOURCE_STYLE = DomainStyle(
    horizon=(0.36, 0.50), road_half=(0.36, 0.46), sidewalk=(0.10, 0.16),
    poles=(1, 4), persons=(0, 3), riders=(0, 2), cars=(1, 4), trees=(0, 3),
    veg_facade=0.30, small_scale=1.0, object_chroma=1.0, light_housing=(0.22, 0.20, 0.12),
    pole_rgb=(0.56, 0.56, 0.56),
    sky_top=(0.42, 0.62, 0.92), sky_bottom=(0.70, 0.82, 0.96),
    road_rgb=(0.34, 0.34, 0.37), sidewalk_rgb=(0.72, 0.60, 0.62),
    jitter=0.06, noise=0.01)

# The target camera and road geometry are the source's (both are dashboard cameras); the shift
# is in the surfaces' appearance, the content (counts, façade height) and the camera pipeline.
TARGET_STYLE = DomainStyle(
    horizon=SOURCE_STYLE.horizon, road_half=SOURCE_STYLE.road_half, sidewalk=SOURCE_STYLE.sidewalk,
    poles=(2, 6), persons=(1, 5), riders=(0, 3), cars=(0, 3), trees=(1, 4),
    veg_facade=0.40, small_scale=0.85, object_chroma=0.75, light_housing=(0.28, 0.27, 0.22),
    pole_rgb=(0.48, 0.52, 0.62),                          # neutral grey after the warm white balance
    sky_top=(0.45, 0.62, 0.98), sky_bottom=(0.68, 0.80, 1.0),
    road_rgb=(0.38, 0.37, 0.37), sidewalk_rgb=(0.39, 0.38, 0.38), sidewalk_alt=(0.62, 0.50, 0.48),
    jitter=0.08, noise=0.025,
    overcast=(0.2, 1.0), cloud_rgb=(0.84, 0.84, 0.86), cloud_patchiness=0.6,
    facade_height=2.0, facade_light=(0.45, 0.85), facade_grey=0.4,
    road_light=(0.85, 1.1), road_grain=0.06, paving=0.1, veg_dull=1.0,
    blur_sigma=0.6, illumination=0.15,
    wb_gains=(1.06, 0.97, 0.85), wb_range=(0.75, 0.95), chroma_mix=0.5, haze=(0.10, 0.85))

STYLES = {"source": SOURCE_STYLE, "target": TARGET_STYLE}
# The named camera-shift variant: the target camera pitched up, so the horizon sits higher than
# the source's (fraction of H). It breaks the shared layout that a spatial prior assumes.
SHIFTED_HORIZON = (0.30, 0.42)
# A fixed colour cross-talk matrix (rows: output R, G, B); blended in by ``chroma_mix``.
_CHROMA = np.array([[0.70, 0.22, 0.08], [0.12, 0.72, 0.16], [0.06, 0.24, 0.70]], np.float32)
# Where dull foliage drifts to (dry, shaded or dusty leaves).
_OLIVE_GREY = np.array((0.36, 0.37, 0.28), np.float32)


def _rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), DOMAINS.index(domain), SPLITS.index(split), int(index)]))


def _mute(rgb, chroma):
    """Moves a colour towards its grey level, keeping ``chroma`` of its saturation."""
    rgb = np.asarray(rgb, np.float32)
    return (rgb.mean() + chroma * (rgb - rgb.mean())).astype(np.float32)


def _jit(rng, rgb, amount):
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(np.float32)


def _foliage(rng, style, rgb, amount):
    """A jittered foliage colour; ``style.veg_dull`` moves it part of the way to olive-grey."""
    rgb = _jit(rng, rgb, amount)
    if style.veg_dull > 0:
        k = np.float32(style.veg_dull * rng.uniform())
        rgb = (1.0 - k) * rgb + k * _OLIVE_GREY
    return rgb.astype(np.float32)


class _Canvas:
    """Image (float32 RGB in [0, 1]) and label map drawn together; shapes clip at the borders."""

    def __init__(self, height, width):
        self.h, self.w = height, width
        self.img = np.empty((height, width, 3), np.float32)
        self.lab = np.empty((height, width), np.uint8)

    def rect(self, y0, y1, x0, x1, rgb, cls):
        y0, y1 = max(int(round(y0)), 0), min(int(round(y1)), self.h)
        x0, x1 = max(int(round(x0)), 0), min(int(round(x1)), self.w)
        if y1 > y0 and x1 > x0:
            self.img[y0:y1, x0:x1] = rgb
            self.lab[y0:y1, x0:x1] = cls

    def disc(self, cy, cx, r, rgb, cls):
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, self.h)
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, self.w)
        if y1 <= y0 or x1 <= x0:
            return
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        m = yy * yy + xx * xx <= r * r + 0.25
        self.img[y0:y1, x0:x1][m] = rgb
        self.lab[y0:y1, x0:x1][m] = cls


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, so a coarse grid upsamples by two matmuls."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _smooth_field(rng, height: int, width: int, knots: tuple) -> np.ndarray:
    """A (height, width) field in [-1, 1], bilinear between random values on a ``knots`` grid."""
    grid = rng.uniform(-1.0, 1.0, knots).astype(np.float32)
    return _interp_matrix(height, knots[0]) @ grid @ _interp_matrix(width, knots[1]).T


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(k[j] * p[j:j + h] for j in range(2 * r + 1))
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[j] * p[:, j:j + w] for j in range(2 * r + 1))


def _draw_sky(rng, style, cv, ys, yh):
    """A vertical clear-sky gradient, under a patchy cloud layer where ``style.overcast`` is set."""
    top_c, bot_c = _jit(rng, style.sky_top, style.jitter), _jit(rng, style.sky_bottom, style.jitter)
    a = np.clip(ys / max(yh, 1.0), 0.0, 1.0)[:, :, None]
    cv.img[:] = (1.0 - a) * top_c + a * bot_c
    if style.overcast[1] > 0:
        cover = rng.uniform(*style.overcast) + style.cloud_patchiness * _smooth_field(rng, cv.h, cv.w, (3, 6))
        cover = np.clip(cover, 0.0, 1.0)[:, :, None]
        cloud = _jit(rng, style.cloud_rgb, style.jitter)
        cv.img[:] = (1.0 - cover) * cv.img + cover * cloud
    cv.lab[:] = SKY


def _draw_facades(rng, style, cv, ys, xs, yh, xv, s):
    """Façade columns (buildings with window grids, or vegetation with a ragged top) that grow
    taller away from the vanishing point."""
    H, W = cv.h, cv.w
    top = np.empty(W, np.float32)
    kind = np.empty(W, np.uint8)
    col_rgb = np.empty((W, 3), np.float32)
    x0_of = np.empty(W, np.float32)
    wp = np.empty(W, np.float32)           # window period (px), 0 for vegetation
    x = 0.0
    while x < W:
        cw = rng.uniform(6, 22) * W / 128.0
        i0, i1 = int(round(x)), min(int(round(x + cw)), W)
        x += cw
        if i1 <= i0:
            continue
        dist = abs((i0 + i1) / 2.0 - xv) / W
        height_px = (0.04 + rng.uniform(0.45, 1.0) * dist) * H * style.facade_height
        veg = rng.random() < style.veg_facade
        if veg:
            kind[i0:i1] = VEGETATION
            col_rgb[i0:i1] = _foliage(rng, style, (0.30, 0.52, 0.20), 0.07)
            walk = np.cumsum(rng.normal(0.0, 0.8 * s, i1 - i0))
            top[i0:i1] = yh - height_px + walk - walk.mean()
            wp[i0:i1] = 0
        else:
            kind[i0:i1] = BUILDING
            r_ = rng.uniform(*style.facade_light)   # warm/grey façades: never sky-blue or leaf-green
            rgb = (r_, r_ * rng.uniform(0.7, 1.0), r_ * rng.uniform(0.6, 1.0))
            if style.facade_grey > 0:
                rgb = _mute(rgb, 1.0 - style.facade_grey * rng.uniform())
            col_rgb[i0:i1] = rgb
            top[i0:i1] = yh - height_px
            wp[i0:i1] = max(2.0, round(rng.uniform(2.5, 4.0) * s))
        x0_of[i0:i1] = i0
    top = np.maximum(np.minimum(top, yh - 1.0), -1.0)
    fac = ys >= top[None, :]
    fimg = np.broadcast_to(col_rgb[None], (H, W, 3)).copy()
    is_b = (kind == BUILDING)[None, :]
    wpi = np.maximum(wp, 1.0)[None, :]
    win = (is_b & (((ys - top[None, :]) % wpi) >= 0.5 * wpi) & (((xs - x0_of[None, :]) % wpi) >= 0.5 * wpi)
           & (ys > top[None, :] + wpi) & (ys < yh))
    fimg *= np.where(win, np.float32(0.55), np.float32(1.0))[:, :, None]
    veg_px = np.broadcast_to(kind[None, :] == VEGETATION, (H, W))
    speck = rng.uniform(0.75, 1.2, (H, W)).astype(np.float32)
    fimg *= np.where(veg_px, speck, np.float32(1.0))[:, :, None]
    np.copyto(cv.img, fimg, where=fac[:, :, None])
    np.copyto(cv.lab, np.broadcast_to(kind[None, :], (H, W)), where=fac)


def _draw_ground(rng, style, cv, ys, xs, yh, xv, s):
    """Perspective road trapezoid with dashed lane marks, and sidewalk bands; returns the road
    half-width and sidewalk width at the bottom row (px)."""
    H = cv.h
    rw = rng.uniform(*style.road_half) * cv.w
    sw = rng.uniform(*style.sidewalk) * cv.w
    t = np.clip((ys - yh) / (H - yh), 0.0, None)
    ground = ys >= yh
    dx = np.abs(xs - xv)
    road = ground & (dx <= t * rw)
    side = ground & (dx <= t * (rw + sw)) & ~road
    side_c = np.asarray(style.sidewalk_rgb, np.float32)
    if style.sidewalk_alt is not None:
        side_c = side_c + np.float32(rng.uniform()) * (np.asarray(style.sidewalk_alt, np.float32) - side_c)
    np.copyto(cv.img, _jit(rng, side_c, style.jitter), where=side[:, :, None])
    np.copyto(cv.lab, np.uint8(SIDEWALK), where=side)
    road_c = _jit(rng, style.road_rgb, style.jitter * 0.5)
    if style.road_light != (1.0, 1.0):
        road_c = np.clip(road_c * rng.uniform(*style.road_light), 0.0, 1.0)
    np.copyto(cv.img, road_c, where=road[:, :, None])
    np.copyto(cv.lab, np.uint8(ROAD), where=road)
    phase = rng.uniform(0, 1)
    inv_t = 1.0 / np.maximum(t, 1e-3)      # depth, in units of the bottom row's distance
    dash = road & (dx <= np.maximum(t * 1.6 * s, 0.35)) & ((inv_t * 1.5 + phase) % 1.0 < 0.5)
    np.copyto(cv.img, np.array((0.92, 0.92, 0.90), np.float32), where=dash[:, :, None])
    if style.road_grain > 0:               # asphalt grain and repaired/worn patches
        tex = 0.5 * rng.normal(0.0, 1.0, (H, cv.w)) + _smooth_field(rng, H, cv.w, (4, 8))
        cv.img *= np.where(road, 1.0 + style.road_grain * tex, 1.0).astype(np.float32)[:, :, None]
    if style.paving > 0:                   # paving joints: rows in depth, columns across the band
        across = ((dx * inv_t - rw) / max(sw / 2.5, 1.0)) % 1.0
        joint = side & (((inv_t * 4.0) % 1.0 < 0.2) | (across < 0.2))
        cv.img *= np.where(joint, np.float32(1.0 - style.paving), np.float32(1.0))[:, :, None]
    return rw, sw


def _draw_objects(rng, style, cv, yh, xv, rw, sw, s):
    """Poles (with a light or a sign), trees, persons, riders and cars at ground points, far to near."""
    H = cv.h
    objs = []
    def ground_point(lo, hi):
        tt = rng.uniform(lo, hi)
        return tt, yh + tt * (H - yh)
    for _ in range(rng.integers(style.poles[0], style.poles[1] + 1)):
        tt, yg = ground_point(0.15, 1.0)
        side_sign = rng.choice((-1.0, 1.0))
        objs.append((yg, "pole", tt, xv + side_sign * tt * (rw + sw * rng.uniform(0.3, 0.8)), side_sign))
    for _ in range(rng.integers(style.trees[0], style.trees[1] + 1)):
        tt, yg = ground_point(0.15, 1.0)
        side_sign = rng.choice((-1.0, 1.0))
        objs.append((yg, "tree", tt, xv + side_sign * tt * (rw + sw * rng.uniform(0.5, 1.4)), side_sign))
    for _ in range(rng.integers(style.persons[0], style.persons[1] + 1)):
        tt, yg = ground_point(0.2, 1.0)
        side_sign = rng.choice((-1.0, 1.0))
        objs.append((yg, "person", tt, xv + side_sign * tt * (rw + sw * rng.uniform(0.2, 0.9)), side_sign))
    for _ in range(rng.integers(style.riders[0], style.riders[1] + 1)):
        tt, yg = ground_point(0.2, 1.0)
        side_sign = rng.choice((-1.0, 1.0))
        objs.append((yg, "rider", tt, xv + side_sign * tt * rw * rng.uniform(0.75, 0.92), side_sign))
    for _ in range(rng.integers(style.cars[0], style.cars[1] + 1)):
        tt, yg = ground_point(0.12, 1.0)
        objs.append((yg, "car", tt, xv + tt * rw * rng.uniform(-0.6, 0.6), 0.0))
    objs.sort(key=lambda o: o[0])

    k = style.small_scale
    for yg, what, tt, xg, side_sign in objs:
        d = yg - yh                     # perspective scale: pixels per unit height at this depth
        if what == "pole":
            ph = max(0.95 * d * rng.uniform(0.9, 1.15), 14 * s)
            pw = max(2 * s, 0.05 * d)
            cv.rect(yg - ph, yg, xg - pw / 2, xg + pw / 2, _jit(rng, style.pole_rgb, 0.05), POLE)
            r = rng.random()
            if r < 0.4:                 # traffic light: dark housing, one lit lamp
                lw, lh = max(3 * s, 0.08 * d * k), max(7 * s, 0.18 * d * k)
                lx = xg - side_sign * (pw / 2 + lw / 2) * 0.0
                cv.rect(yg - ph - lh * 0.2, yg - ph + lh * 0.8, lx - lw / 2, lx + lw / 2,
                        _jit(rng, style.light_housing, 0.04), LIGHT)
                lamp = ((0.95, 0.25, 0.15), (0.95, 0.75, 0.15), (0.25, 0.9, 0.3))[rng.integers(3)]
                ly = yg - ph - lh * 0.2 + lh * rng.choice((0.2, 0.5, 0.8))
                cv.disc(ly, lx, max(1.0 * s, 0.25 * lw), _mute(lamp, style.object_chroma), LIGHT)
            elif r < 0.9:               # traffic sign: round or square, blue/red/yellow
                sz = max(5 * s, 0.16 * d * k)
                rgb = _mute(_jit(rng, ((0.12, 0.30, 0.85), (0.85, 0.12, 0.12), (0.92, 0.82, 0.12))[rng.integers(3)],
                                 0.05), style.object_chroma)
                cy = yg - ph + sz / 2
                if rng.random() < 0.5:
                    cv.disc(cy, xg, sz / 2, rgb, SIGN)
                else:
                    cv.rect(cy - sz / 2, cy + sz / 2, xg - sz / 2, xg + sz / 2, rgb, SIGN)
        elif what == "tree":
            th = max(0.9 * d * rng.uniform(0.8, 1.2), 10 * s)
            tw = max(2 * s, 0.06 * d)
            cr = max(3 * s, 0.28 * d * rng.uniform(0.8, 1.2))
            cv.rect(yg - th + cr, yg, xg - tw / 2, xg + tw / 2, _jit(rng, (0.38, 0.26, 0.16), 0.04), VEGETATION)
            cv.disc(yg - th + cr * 0.5, xg, cr, _foliage(rng, style, (0.26, 0.50, 0.18), 0.07), VEGETATION)
        elif what == "person":
            ph = max(0.42 * d * k * rng.uniform(0.85, 1.15), 7 * s)
            pw = max(2.5 * s, 0.3 * ph)
            cloth = rng.uniform(0.1, 0.9, 3).astype(np.float32)
            cv.rect(yg - ph * 0.45, yg, xg - pw / 3, xg + pw / 3, _jit(rng, (0.20, 0.20, 0.28), 0.1), PERSON)
            cv.rect(yg - ph * 0.82, yg - ph * 0.42, xg - pw / 2, xg + pw / 2, cloth, PERSON)
            cv.disc(yg - ph * 0.9, xg, max(0.9 * s, ph * 0.1), _jit(rng, (0.85, 0.66, 0.52), 0.08), PERSON)
        elif what == "rider":
            rh = max(0.48 * d * k * rng.uniform(0.9, 1.1), 8 * s)
            bw = max(5 * s, 0.55 * rh)
            bike = rng.uniform(0.25, 0.95, 3).astype(np.float32)
            bike[rng.integers(3)] = rng.uniform(0.7, 1.0)        # a clearly coloured frame, never road-grey
            bike = _mute(bike, style.object_chroma)
            wr = max(1.2 * s, 0.16 * rh)
            cv.rect(yg - wr * 2.2, yg - wr * 1.2, xg - bw / 2, xg + bw / 2, bike, RIDER)
            cv.disc(yg - wr, xg - bw / 2 + wr, wr, (0.08, 0.08, 0.08), RIDER)
            cv.disc(yg - wr, xg + bw / 2 - wr, wr, (0.08, 0.08, 0.08), RIDER)
            cloth = rng.uniform(0.1, 0.9, 3).astype(np.float32)
            cv.rect(yg - rh * 0.85, yg - wr * 1.6, xg - bw * 0.22, xg + bw * 0.22, cloth, RIDER)
            cv.disc(yg - rh * 0.92, xg, max(0.9 * s, rh * 0.1), _jit(rng, (0.85, 0.66, 0.52), 0.08), RIDER)
        else:                           # car
            cw = max(6 * s, 0.62 * d * rng.uniform(0.9, 1.15))
            chh = 0.5 * cw
            body = rng.uniform(0.1, 0.95, 3).astype(np.float32)
            cv.rect(yg - chh * 0.62, yg - chh * 0.12, xg - cw / 2, xg + cw / 2, body, CAR)
            cv.rect(yg - chh, yg - chh * 0.6, xg - cw * 0.32, xg + cw * 0.32, body * 0.9, CAR)
            cv.rect(yg - chh * 0.92, yg - chh * 0.62, xg - cw * 0.27, xg + cw * 0.27, (0.12, 0.14, 0.18), CAR)
            cv.rect(yg - chh * 0.2, yg, xg - cw * 0.44, xg - cw * 0.22, (0.06, 0.06, 0.06), CAR)
            cv.rect(yg - chh * 0.2, yg, xg + cw * 0.22, xg + cw * 0.44, (0.06, 0.06, 0.06), CAR)


def _camera_pipeline(rng, style, img, s):
    """The global appearance pipeline, the same for every class: blur, illumination field, white
    balance, chroma cross-talk, haze and sensor noise; returns the uint8 image."""
    H, W = img.shape[:2]
    if style.blur_sigma > 0:
        img = _blur(img, style.blur_sigma * s)
    if style.illumination > 0:
        img = img * (1.0 + style.illumination * _smooth_field(rng, H, W, (3, 5)))[:, :, None]
    if style.wb_range != (1.0, 1.0) or style.wb_gains != (1.0, 1.0, 1.0):
        img = img * (np.asarray(style.wb_gains, np.float32) * rng.uniform(*style.wb_range))
    if style.chroma_mix > 0:
        img = (1.0 - style.chroma_mix) * img + style.chroma_mix * (img @ _CHROMA.T)
    if style.haze != (0.0, 1.0):
        img = style.haze[0] + style.haze[1] * img
    img = img + rng.normal(0.0, style.noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(domain: str, split: str, index: int, *, height: int = 64, width: int = 128,
           seed: int = 0, camera_shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 (H, W, 3) image, uint8 (H, W) trainId label map).

    ``camera_shift`` raises the target camera's horizon to ``SHIFTED_HORIZON`` (the same scene
    otherwise: the same random draws, mapped to the other range); the source camera never moves."""
    style = STYLES[domain]
    rng = _rng(seed, domain, split, index)
    H, W = height, width
    s = H / 64.0                       # pixel unit: sizes are specified at 64 px height
    cv = _Canvas(H, W)

    horizon = SHIFTED_HORIZON if camera_shift and domain == "target" else style.horizon
    yh = rng.uniform(*horizon) * H
    xv = rng.uniform(0.40, 0.60) * W
    ys = np.arange(H, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(W, dtype=np.float32)[None, :] + 0.5

    _draw_sky(rng, style, cv, ys, yh)
    _draw_facades(rng, style, cv, ys, xs, yh, xv, s)
    rw, sw = _draw_ground(rng, style, cv, ys, xs, yh, xv, s)
    _draw_objects(rng, style, cv, yh, xv, rw, sw, s)
    return _camera_pipeline(rng, style, cv.img, s), cv.lab


class SyntheticSource:
    """Random-access record source over one (domain, split) stream of generated scenes.

    ``source[i]`` -> ``{"image": uint8 (H,W,3), "label": uint8 (H,W), "name": str}``; the target
    ``train`` split is unlabelled for training: its records carry ``"hidden_label"`` (for
    measuring pseudo-label precision) instead of ``"label"``, and ``has_labels`` is False.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    ignore_index = IGNORE_INDEX

    def __init__(self, domain: str, split: str, *, height: int = 64, width: int = 128,
                 num_images: int | None = None, seed: int = 0, camera_shift: bool = False):
        if domain not in DOMAINS:
            raise DatasetError(f"unknown synthetic domain {domain!r}; expected one of {DOMAINS}")
        if split not in SPLITS:
            raise DatasetError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
        self.domain, self.split, self.seed = domain, split, int(seed)
        self.camera_shift = bool(camera_shift)
        self.height, self.width = int(height), int(width)
        self.num_images = DEFAULT_COUNTS[(domain, split)] if num_images is None else int(num_images)
        self.has_labels = not (domain == "target" and split == "train")
        self.label_key = "label" if self.has_labels else "hidden_label"

    def __len__(self) -> int:
        return self.num_images

    def _index(self, i) -> int:
        """``i`` as a record index in [0, num_images), negative counting from the end."""
        i = int(i)
        if i < 0:
            i += self.num_images
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        return i

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        image, label = render(self.domain, self.split, i, height=self.height, width=self.width, seed=self.seed,
                              camera_shift=self.camera_shift)
        return {"image": image, self.label_key: label, "name": self._name(i)}

    def _name(self, i: int) -> str:
        return f"synthetic_{self.domain}_{self.split}_s{self.seed}_{i:05d}"

    @property
    def names(self) -> list[str]:
        """Record names (stems), as the folder readers give them (``check_disjoint`` compares these)."""
        return [self._name(i) for i in range(self.num_images)]

    def __repr__(self) -> str:
        return (f"SyntheticSource({self.domain!r}, {self.split!r}, {self.height}x{self.width}, "
                f"n={self.num_images}, seed={self.seed}{', camera_shift' if self.camera_shift else ''})")


# Below this many pixels in a split, rendering it in one process beats starting worker processes
# (each spawned worker imports numpy and this module first, ~1 s on the 2-core development box).
PARALLEL_MIN_PIXELS = 4_000_000


def _render_chunk(args):
    """Images and labels of ``indices`` of one stream (a worker process's share)."""
    domain, split, indices, options = args
    pairs = [render(domain, split, i, **options) for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class RenderedSource(SyntheticSource):
    """A :class:`SyntheticSource` rendered once, into memory: the same records (the same arrays,
    read-only), read back instead of rendered for every batch. ``workers`` > 1 renders in that many
    spawned processes when the split holds at least ``min_pixels`` pixels (``PARALLEL_MIN_PIXELS``)."""

    def __init__(self, source: SyntheticSource, workers: int = 1, min_pixels: int = PARALLEL_MIN_PIXELS):
        super().__init__(source.domain, source.split, height=source.height, width=source.width,
                         num_images=source.num_images, seed=source.seed, camera_shift=source.camera_shift)
        n, h, w = self.num_images, self.height, self.width
        options = dict(height=h, width=w, seed=self.seed, camera_shift=self.camera_shift)
        self.images = np.empty((n, h, w, 3), np.uint8)
        self.labels = np.empty((n, h, w), np.uint8)
        workers = min(int(workers), n) if n * h * w >= min_pixels else 1
        chunks = [c for c in np.array_split(np.arange(n), 4 * workers) if len(c)]
        jobs = [(self.domain, self.split, c.tolist(), options) for c in chunks]
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
                results = list(pool.map(_render_chunk, jobs))
        else:
            results = map(_render_chunk, jobs)
        for c, (images, labels) in zip(chunks, results):
            self.images[c], self.labels[c] = images, labels
        self.images.flags.writeable = self.labels.flags.writeable = False

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        return {"image": self.images[i], self.label_key: self.labels[i], "name": self._name(i)}

    def __repr__(self) -> str:
        return "Rendered" + super().__repr__()


def open_synthetic(domain: str, split: str, *, height: int = 64, width: int = 128,
                   num_images: int | None = None, seed: int = 0, camera_shift: bool = False) -> SyntheticSource:
    """The synthetic ``domain`` ("source" | "target") ``split`` ("train" | "val" | "test").
    ``camera_shift=True`` is the
    named variant whose target camera sits higher (horizon ``SHIFTED_HORIZON`` instead of the
    source's); it leaves the source domain unchanged, so it may be passed to both sides."""
    return SyntheticSource(domain, split, height=height, width=width, num_images=num_images, seed=seed,
                           camera_shift=camera_shift)


def class_shares(source: SyntheticSource, n: int | None = None) -> np.ndarray:
    """Fraction of pixels per trainId (19,) over the first ``n`` records of ``source``."""
    counts = np.zeros(256, np.int64)
    for i in range(len(source) if n is None else min(n, len(source))):
        counts += np.bincount(source[i][source.label_key].ravel(), minlength=256)
    return counts[:19] / max(counts.sum(), 1)
