"""Dassl's RandAugment in Pillow (``vlprompt.data.randaugment``): every op at Dassl's m = 10
against a reference written from its formula in numpy, on fixed images; the op draw; the
Resize + RandAugment + Normalize pipeline; determinism from the item's generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import CLIP_MEAN, CLIP_STD, build_transform
from vlprompt.data import randaugment as RA

M = 10  # Dassl's INPUT.RANDAUGMENT_M
F32 = np.float32(0.7)  # Color/Contrast/Brightness/Sharpness factor at m = 10: 0.1 + 1.8 / 3


def image(w=24, h=20, seed=0) -> np.ndarray:
    """A fixed RGB image, values spread over most of [0, 255] but not all (autocontrast acts)."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 231, size=(h, w, 3), dtype=np.uint8)


def scripted(*values):
    it = iter(values)
    return lambda: next(it)


def apply(name: str, arr: np.ndarray, *draws: float) -> np.ndarray:
    op = next(o for o in RA.OPS if o.name == name)
    return np.asarray(op.fn(Image.fromarray(arr), op.magnitude(M), scripted(*draws)))


# ------------------------------------------------------------------------- references
def affine_nearest(a: np.ndarray, matrix) -> np.ndarray:
    """Output pixel (x, y) shows input pixel floor(A (x + .5, y + .5) + c), black outside."""
    h, w = a.shape[:2]
    ma, mb, mc, md, me, mf = matrix
    y, x = np.mgrid[0:h, 0:w] + 0.5
    xs = np.floor(ma * x + mb * y + mc).astype(int)
    ys = np.floor(md * x + me * y + mf).astype(int)
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    out = np.zeros_like(a)
    out[ok] = a[ys[ok], xs[ok]]
    return out


def rotation_matrix(w: int, h: int, degrees: float):
    """Counter-clockwise rotation about the centre, as the output -> input map."""
    t = -math.radians(degrees)
    a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
    cx, cy = w / 2, h / 2
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


def blend(degenerate: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Pillow's blend in float32 with truncation: d + f (x - d)."""
    d, x = degenerate.astype(np.float32), a.astype(np.float32)
    return np.clip(np.floor(d + F32 * (x - d)), 0, 255).astype(np.uint8)


def grey(a: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in Pillow's fixed point."""
    a = a.astype(np.int64)
    return (a[..., 0] * 19595 + a[..., 1] * 38470 + a[..., 2] * 7471 + 0x8000) >> 16


def smooth(a: np.ndarray) -> np.ndarray:
    """Pillow's SMOOTH filter (3x3, centre 5, others 1, / 13), border pixels unchanged."""
    x = a.astype(np.float64)
    out = x.copy()
    k = np.ones((3, 3))
    k[1, 1] = 5
    acc = sum(k[i, j] * x[i: i + x.shape[0] - 2, j: j + x.shape[1] - 2]
              for i in range(3) for j in range(3))
    out[1:-1, 1:-1] = np.floor(acc / 13 + 0.5)
    return out


def equalize_ref(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    for c in range(3):
        hist = np.bincount(a[..., c].ravel(), minlength=256)
        nz = hist[hist > 0]
        step = (nz.sum() - nz[-1]) // 255
        if len(nz) <= 1 or step == 0:
            out[..., c] = a[..., c]
            continue
        lut = (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step
        out[..., c] = np.clip(lut, 0, 255)[a[..., c]]
    return out


def autocontrast_ref(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    for c in range(3):
        lo, hi = int(a[..., c].min()), int(a[..., c].max())
        scale = 255.0 / (hi - lo)
        lut = np.clip((np.arange(256) * scale - lo * scale).astype(int), 0, 255)
        out[..., c] = lut[a[..., c]]
    return out


REFERENCES = {
    "AutoContrast": lambda a: autocontrast_ref(a),
    "Equalize": lambda a: equalize_ref(a),
    "Invert": lambda a: 255 - a,
    "Posterize": lambda a: a & 0b11111000,  # int(4 + 4/3) = 5 bits kept
    "Solarize": lambda a: np.where(a < 256 / 3, a, 255 - a),
    "SolarizeAdd": lambda a: (lambda y: np.where(y < 128, y, 255 - y))(
        np.floor(np.clip(a + 110 / 3, 0, 255)).astype(np.uint8)),
    "Color": lambda a: blend(np.repeat(grey(a)[..., None], 3, axis=2), a),
    "Contrast": lambda a: blend(np.full_like(a, int(grey(a).mean() + 0.5)), a),
    "Brightness": lambda a: blend(np.zeros_like(a), a),
    "Sharpness": lambda a: blend(smooth(a), a),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_unsigned_ops_match_their_formulas(name):
    for seed in range(3):
        a = image(seed=seed)
        np.testing.assert_array_equal(apply(name, a), REFERENCES[name](a))


@pytest.mark.parametrize("flip", [0.2, 0.8])  # a draw > 0.5 negates the value
def test_geometric_ops_match_their_formulas(flip):
    a = image(23, 19)
    h, w = a.shape[:2]
    sign = -1.0 if flip > 0.5 else 1.0
    shear, shift, angle = sign * 0.1, sign * 100 / 3, sign * 10.0
    cases = {"ShearX": (1, shear, 0, 0, 1, 0), "ShearY": (1, 0, 0, shear, 1, 0),
             "TranslateXabs": (1, 0, shift, 0, 1, 0), "TranslateYabs": (1, 0, 0, 0, 1, shift),
             "Rotate": rotation_matrix(w, h, angle)}
    for name, matrix in cases.items():
        np.testing.assert_array_equal(apply(name, a, flip), affine_nearest(a, matrix), name)
    # the translation is a plain shift by 33 pixels (nearest neighbour of 33.33 from centres)
    out = apply("TranslateXabs", image(50, 10), flip)
    src = image(50, 10)
    if sign > 0:
        np.testing.assert_array_equal(out[:, :17], src[:, 33:])
        assert (out[:, 17:] == 0).all()
    else:
        np.testing.assert_array_equal(out[:, 33:], src[:, :17])
        assert (out[:, :33] == 0).all()


@pytest.mark.parametrize("u", [(0.0, 0.0), (0.3, 0.9), (0.99, 0.5), (1 - 1e-12, 1 - 1e-12)])
def test_cutout_paints_dassls_square_with_the_numpy_uniform_quirk(u):
    a = image(30, 26)
    h, w = a.shape[:2]
    v = 40 / 3
    # np.random.uniform(w) = uniform(low=w, high=1): w + (1 - w) u
    x0 = int(max(0, w + (1 - w) * u[0] - v / 2))
    y0 = int(max(0, h + (1 - h) * u[1] - v / 2))
    x1, y1 = min(w - 1, math.floor(x0 + v)), min(h - 1, math.floor(y0 + v))
    want = a.copy()
    want[y0: y1 + 1, x0: x1 + 1] = RA.CUTOUT_FILL
    np.testing.assert_array_equal(apply("CutoutAbs", a, *u), want)


def test_op_list_and_magnitudes_are_dassls():
    names = [o.name for o in RA.OPS]
    assert names == ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                     "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                     "ShearY", "CutoutAbs", "TranslateXabs", "TranslateYabs"]
    mags = {o.name: o.magnitude(M) for o in RA.OPS}
    assert mags["Rotate"] == pytest.approx(10.0) and mags["Posterize"] == pytest.approx(16 / 3)
    assert mags["Solarize"] == pytest.approx(256 / 3) and mags["SolarizeAdd"] == pytest.approx(
        110 / 3)
    assert mags["Color"] == pytest.approx(0.7) and mags["ShearX"] == pytest.approx(0.1)
    assert mags["CutoutAbs"] == pytest.approx(40 / 3)
    assert mags["TranslateXabs"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="magnitude"):
        RA.RandAugment(2, 31)


def _replay(a: np.ndarray, seed: int, n: int = 2) -> np.ndarray:
    """The reference pipeline: n op indices floor(16 u) first, then each op with the next draws
    of the same float64 stream."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        return float(torch.rand((), dtype=torch.float64, generator=g))

    ops = [RA.OPS[int(draw() * 16)] for _ in range(n)]
    for op in ops:
        if op.name in REFERENCES:
            a = REFERENCES[op.name](a)
        elif op.name == "CutoutAbs":
            a = np.asarray(op.fn(Image.fromarray(a), op.magnitude(M), draw))
        else:
            sign = -1.0 if draw() > 0.5 else 1.0
            h, w = a.shape[:2]
            v = sign * op.magnitude(M)
            matrix = {"Rotate": rotation_matrix(w, h, v), "ShearX": (1, v, 0, 0, 1, 0),
                      "ShearY": (1, 0, 0, v, 1, 0), "TranslateXabs": (1, 0, v, 0, 1, 0),
                      "TranslateYabs": (1, 0, 0, 0, 1, v)}[op.name]
            a = affine_nearest(a, matrix)
    return a


def test_the_whole_randaugment_equals_the_replayed_reference():
    ra = RA.RandAugment(2, M)
    seen = set()
    for seed in range(40):
        a = image(seed=seed)
        out = np.asarray(ra(Image.fromarray(a), torch.Generator().manual_seed(seed)))
        np.testing.assert_array_equal(out, _replay(a, seed), f"seed {seed}")
        g = torch.Generator().manual_seed(seed)
        seen.update(o.name for o in ra.choose(RA.uniform_source(g)))
    assert len(seen) >= 12  # the draw reaches (nearly) every op


def test_resize_randaugment_pipeline_and_determinism():
    src = Image.fromarray(image(40, 30, seed=4))
    t = build_transform(True, image_size=16, augment="resize_randaugment")
    t.generator = torch.Generator().manual_seed(11)
    x = t(src)
    assert x.shape == (3, 16, 16)
    resized = src.resize((16, 16), Image.BICUBIC)  # aspect not kept, no crop, no flip
    want = _replay(np.asarray(resized), 11).astype(np.float32) / 255.0
    want = (torch.from_numpy(want).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    t.generator = torch.Generator().manual_seed(11)
    assert torch.equal(t(src), x)
    outs = set()
    for s in range(8):
        t.generator = torch.Generator().manual_seed(s)
        outs.add(t(src).sum().item())
    assert len(outs) > 4
    with pytest.raises(ValueError, match="resize_randaugment"):
        build_transform(True, augment="autoaugment")
