"""A synthetic marketplace with a known click model: the embedded default dataset of caig_jax.

Real CTR logs (Alibaba's CreativeRanking, JD's) cannot be shipped, so this module simulates a small
e-commerce world in which every stage of CAIG can be measured end to end on a laptop: products, a
background painter that stands in for the diffusion renderer, a *hidden* click model, and logs written in
the exact public layouts that the real-data readers (`caig_jax.data.ctr_logs`) consume.

Products
--------
`CATEGORIES` has 10 categories of procedurally drawn RGBA cut-outs (water bottle, sneaker, smartphone,
coffee mug, t-shirt, wristwatch, lipstick, potted plant, handbag, headphones). Every item varies in colour,
proportions, accents and a small rotation, and gets a title ("Aurora teal insulated water bottle") and
attributes (colour, material, brand, price).

Background vocabulary (what prompts are made of)
------------------------------------------------
`paint_background(prompt, size, seed)` reads the descriptors below from a prompt (case-insensitive phrase
match, longest phrase first; words it does not know are ignored) and paints a background:

- colours (`COLOURS`): white, cream, beige, yellow, orange, red, pink, pastel pink, purple, lavender, navy,
  blue, pastel blue, teal, mint, green, olive, brown, grey, charcoal, black, gold. The first colour tints
  the wall/backdrop, a second one the floor/surface.
- materials (`MATERIALS`): wooden, marble, concrete, linen, velvet, brushed metal, paper, sand, stone,
  leather. A material covers the surface (the whole backdrop in a studio) with its colour and texture.
- scenes (`SCENES`): studio backdrop, kitchen counter, bathroom shelf, office desk, living room, bedroom,
  beach, forest, garden, city street, night sky, cafe. A scene sets the layout (wall + surface, sky +
  ground, blocks, foliage, stars) and default colours. No scene = studio backdrop.
- lighting (`LIGHTING`): soft lighting, warm lighting, cool lighting, bright daylight, golden hour,
  dramatic lighting, neon glow, dim light, studio lighting: brightness, colour temperature, contrast,
  vignette and glows.
- patterns (`PATTERNS`): plain, gradient, bokeh, stripes, polka dots, checkered, minimalist, cluttered.

The seed only moves texture phases and blob positions; the look is set by the prompt. `compose_ad`
places the product with the renderer's code (`caig_jax.render.product`: crop to alpha, fit 0.78 of the
canvas, centre), paints the background and pastes the product back with its undilated alpha.

The hidden click model (`true_ctr(composed_rgb_uint8, category)`)
-----------------------------------------------------------------
Made to be *visible at low resolution*: everything is computed on the composed ad downsampled to 32x32
(area average), so a model that looks at 32-64 px images can in principle see all of it.

1. Background statistics on the outer ring (3 px of the 32x32 image: pure background, because the product
   fills at most the central 78%): luma `b`, warmth `w = mean(R - B)`, greenness `g = mean(G - (R+B)/2)`,
   saturation `s = mean(max - min)` and texture `t = mean |luma difference of neighbours|`; all in [0, 1]
   units. And `pop`, the RGB distance between the centre 12x12 (mostly product) and the ring, /sqrt(3).
2. Every category has a preferred look: the statistics of its *ideal prompt* (`CATEGORIES[c].ideal`,
   e.g. coffee mug: "wooden kitchen counter, warm lighting"; smartphone: "black studio backdrop, brushed
   metal, dramatic lighting"), painted once with fixed seeds. Appeal is a Gaussian bump around it:
   `appeal = exp(-0.5 * sum_k ((f_k - f*_k) / scale_k)^2)` over k in (b, w, g, s, t) with
   `FEATURE_SCALES`. The best background therefore depends on the product.
3. `logit(CTR) = logit(base_ctr[c]) + APPEAL_GAIN * (appeal - 0.5) + POP_GAIN * (pop - 0.25)`, clipped
   to CTR in [0.3%, 12%]; typical CTRs are 1-5%. (`market` adds a per-item offset for the item's own
   attractiveness, which cancels inside a pair.)

Logs
----
Each product gets several creatives (`creatives_per_product`); each creative's prompt is, with probability
`on_brief`, drawn from the category's preferred descriptors, else from the whole vocabulary. Impressions
are log-normal (`impressions_median`, `impressions_sigma`) except a fraction `low_impression_fraction`
drawn in [100, 1000) so the impressions > 1000 rule has work to do; clicks ~ Binomial(impressions, CTR),
spread over 1-3 daily rows, written in the CreativeRanking layout. The label noise of the logs, and so
the *oracle accuracy* (how often the logged label agrees with the true CTR order on the pairs kept by
CAIG's rule), is set by the impressions: about 0.7-0.8 with the presets.

Pre-training conversations (LLaVA JSON), three task families:
`describe_product` (product cut-out -> description), `describe_background` (composed ad -> background
description, or -> product title), `background_prompt` (product + title -> a background prompt, the
prompts of the item's logged creatives).

`make_market(config, seed)` writes everything; see its docstring for the layout on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from caig_jax.render import product as product_lib

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 240),
    "cream": (243, 229, 200),
    "beige": (220, 198, 160),
    "yellow": (238, 206, 62),
    "orange": (232, 136, 48),
    "red": (196, 42, 40),
    "pink": (238, 140, 176),
    "pastel pink": (248, 202, 216),
    "purple": (118, 62, 160),
    "lavender": (190, 170, 226),
    "navy": (28, 38, 92),
    "blue": (46, 98, 200),
    "pastel blue": (178, 208, 240),
    "teal": (28, 128, 130),
    "mint": (168, 228, 198),
    "green": (58, 140, 58),
    "olive": (112, 120, 48),
    "brown": (118, 78, 48),
    "grey": (128, 128, 128),
    "charcoal": (54, 54, 60),
    "black": (18, 18, 22),
    "gold": (212, 172, 56),
}


@dataclasses.dataclass(frozen=True)
class Material:
    colour: tuple[int, int, int]
    texture: str  # wood | veins | noise | weave | soft | streaks | flat | speckle | blotch | grain
    amplitude: float  # texture contrast in [0, 1] units


MATERIALS: dict[str, Material] = {
    "wooden": Material((150, 104, 64), "wood", 0.16),
    "marble": Material((232, 230, 226), "veins", 0.14),
    "concrete": Material((148, 148, 146), "noise", 0.12),
    "linen": Material((226, 216, 196), "weave", 0.05),
    "velvet": Material((112, 36, 70), "soft", 0.08),
    "brushed metal": Material((182, 184, 190), "streaks", 0.08),
    "paper": Material((240, 238, 230), "flat", 0.02),
    "sand": Material((222, 196, 150), "speckle", 0.07),
    "stone": Material((118, 114, 108), "blotch", 0.16),
    "leather": Material((102, 62, 36), "grain", 0.06),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    layout: str  # studio | surface | tiles | sky | foliage | blocks | stars | room
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    floor_fraction: float
    floor_material: str | None = None


SCENES: dict[str, Scene] = {
    "studio backdrop": Scene("studio", (206, 206, 204), (186, 186, 184), 0.0),
    "kitchen counter": Scene("surface", (236, 226, 206), (228, 226, 222), 0.38, "marble"),
    "bathroom shelf": Scene("tiles", (214, 236, 232), (240, 240, 238), 0.30),
    "office desk": Scene("surface", (176, 186, 200), (150, 104, 64), 0.36, "wooden"),
    "living room": Scene("room", (226, 208, 182), (140, 100, 70), 0.30),
    "bedroom": Scene("room", (232, 218, 222), (236, 232, 224), 0.34, "linen"),
    "beach": Scene("sky", (150, 200, 238), (222, 196, 150), 0.40, "sand"),
    "forest": Scene("foliage", (40, 86, 44), (70, 58, 40), 0.25),
    "garden": Scene("foliage", (120, 186, 96), (96, 140, 64), 0.30),
    "city street": Scene("blocks", (132, 138, 150), (82, 84, 88), 0.30, "concrete"),
    "night sky": Scene("stars", (14, 18, 48), (10, 12, 30), 0.0),
    "cafe": Scene("room", (120, 78, 50), (90, 60, 40), 0.32, "wooden"),
}


@dataclasses.dataclass(frozen=True)
class Lighting:
    brightness: float = 0.0  # added to luma, [0, 1] units
    temperature: float = 0.0  # >0 warmer (R up, B down)
    contrast: float = 1.0
    vignette: float = 0.0  # darkening at the corners, 0..1
    glow: bool = False  # neon glows


LIGHTING: dict[str, Lighting] = {
    "soft lighting": Lighting(brightness=0.05, contrast=0.75),
    "warm lighting": Lighting(temperature=0.10, brightness=0.02),
    "cool lighting": Lighting(temperature=-0.10),
    "bright daylight": Lighting(brightness=0.16, contrast=0.95),
    "golden hour": Lighting(temperature=0.16, brightness=0.05),
    "dramatic lighting": Lighting(brightness=-0.10, contrast=1.35, vignette=0.65),
    "neon glow": Lighting(brightness=-0.22, contrast=1.1, glow=True),
    "dim light": Lighting(brightness=-0.24, contrast=0.9, vignette=0.3),
    "studio lighting": Lighting(brightness=0.08, vignette=0.15),
}

PATTERNS: tuple[str, ...] = ("plain", "gradient", "bokeh", "stripes", "polka dots", "checkered", "minimalist", "cluttered")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "material": tuple(MATERIALS),
    "scene": tuple(SCENES),
    "lighting": tuple(LIGHTING),
    "pattern": PATTERNS,
}


@dataclasses.dataclass(frozen=True)
class ParsedPrompt:
    colours: tuple[str, ...] = ()
    materials: tuple[str, ...] = ()
    scenes: tuple[str, ...] = ()
    lighting: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    def descriptors(self) -> tuple[str, ...]:
        return self.colours + self.materials + self.scenes + self.lighting + self.patterns


@functools.lru_cache(maxsize=1)
def _phrase_regex() -> tuple[re.Pattern, dict[str, str]]:
    kinds = {phrase: kind for kind, phrases in VOCABULARY.items() for phrase in phrases}
    phrases = sorted(kinds, key=len, reverse=True)  # longest first: "pastel pink" before "pink"
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in phrases) + r")\b")
    return pattern, kinds


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The vocabulary descriptors of a prompt, by kind, in order of appearance (unknown words ignored)."""
    pattern, kinds = _phrase_regex()
    found: dict[str, list[str]] = {k: [] for k in VOCABULARY}
    for m in pattern.finditer(prompt.lower()):
        phrase = m.group(1)
        if phrase not in found[kinds[phrase]]:
            found[kinds[phrase]].append(phrase)
    return ParsedPrompt(
        colours=tuple(found["colour"]),
        materials=tuple(found["material"]),
        scenes=tuple(found["scene"]),
        lighting=tuple(found["lighting"]),
        patterns=tuple(found["pattern"]),
    )


# ----------------------------------------------------------------------------------------------------------
# Background painter
# ----------------------------------------------------------------------------------------------------------


def _rgb(c: Sequence[float]) -> np.ndarray:
    return np.asarray(c, np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1], float32[size, size], with about `cells` blobs per side."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(-1.0, 1.0)


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A zero-mean luma texture, float32[size, size], roughly unit amplitude."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "wood":
        warp = _smooth_noise(rng, size, 3) * 0.08
        return np.sin((yy + warp) * 2 * np.pi * rng.uniform(5.0, 7.0) + rng.uniform(0, 6.28)).astype(np.float32)
    if kind == "veins":
        n = _smooth_noise(rng, size, 4) + 0.5 * _smooth_noise(rng, size, 8)
        veins = np.exp(-np.sin((xx + 0.6 * yy + n * 0.35) * 7.0) ** 2 / 0.03)
        return (-2.0 * (veins - veins.mean())).astype(np.float32)
    if kind == "noise":
        return (0.6 * _smooth_noise(rng, size, 8) + 0.4 * _smooth_noise(rng, size, 16)).astype(np.float32)
    if kind == "weave":
        return (np.sign(np.sin(xx * size * 0.8)) * np.sign(np.sin(yy * size * 0.8))).astype(np.float32)
    if kind == "soft":
        return _smooth_noise(rng, size, 3)
    if kind == "streaks":
        s = cv2.resize(rng.uniform(-1, 1, (1, 48)).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        return s
    if kind == "flat":
        return _smooth_noise(rng, size, 2)
    if kind == "speckle":
        return (0.5 * _smooth_noise(rng, size, 12) + 0.5 * _smooth_noise(rng, size, 6)).astype(np.float32)
    if kind == "blotch":
        return np.tanh(2.0 * _smooth_noise(rng, size, 6)).astype(np.float32)
    if kind == "grain":
        return _smooth_noise(rng, size, 10)
    raise ValueError(f"unknown texture kind {kind!r}")


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a * (1.0 - t) + b * t


def _disc(img: np.ndarray, cx: float, cy: float, r: float, colour: np.ndarray, alpha: float, soft: float) -> None:
    """Alpha-blends a soft disc into img (float32[H, W, 3]) in place."""
    size = img.shape[0]
    yy, xx = np.ogrid[0:size, 0:size]
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    a = np.clip((r - d) / max(soft, 1e-3), 0.0, 1.0)[..., None] * alpha
    img *= 1.0 - a
    img += a * colour


def paint_background(prompt: str, size: int = 512, seed: int = 0) -> np.ndarray:
    """Paints the background a prompt describes in this simulated world. Returns uint8[size, size, 3].

    Deterministic in (prompt, size, seed); see the module docstring for the vocabulary.
    """
    p = parse_prompt(prompt)
    # The seed moves texture phases and blob positions only; the prompt sets the look.
    key = int.from_bytes(hashlib.sha256(prompt.lower().encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, key])
    scene_name = p.scenes[0] if p.scenes else "studio backdrop"
    scene = SCENES[scene_name]
    wall, floor = _rgb(scene.wall), _rgb(scene.floor)
    if p.colours:
        wall = _mix(wall, _rgb(COLOURS[p.colours[0]]), 0.8)
        floor = _mix(floor, _rgb(COLOURS[p.colours[-1]]), 0.55 if len(p.colours) > 1 else 0.35)
    material_name = p.materials[0] if p.materials else scene.floor_material
    material = MATERIALS[material_name] if material_name else None
    if material is not None and p.materials:
        floor = _mix(floor, _rgb(material.colour), 0.75)
        if scene.layout == "studio":  # a studio has no floor: the material is the backdrop
            wall = _mix(wall, _rgb(material.colour), 0.7 if not p.colours else 0.35)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = 1.0 - scene.floor_fraction + rng.uniform(-0.03, 0.03) if scene.floor_fraction > 0 else 2.0
    is_floor = (yy >= horizon)[..., None].astype(np.float32)
    img = wall[None, None, :] * (1.0 - is_floor) + floor[None, None, :] * is_floor
    img = img.astype(np.float32)

    # Layout details.
    if scene.layout == "studio":
        img *= (1.05 - 0.12 * yy)[..., None]  # seamless backdrop falls off towards the bottom
    elif scene.layout == "tiles":
        grid = ((np.floor(xx * 6) + np.floor(yy * 6)) % 2)[..., None]
        img = img * (1.0 - 0.06 * grid * (1.0 - is_floor))
    elif scene.layout == "sky":
        img = img * (1.0 - is_floor) * (0.9 + 0.15 * yy[..., None]) + img * is_floor
        sea = ((yy > horizon - 0.08) & (yy < horizon))[..., None].astype(np.float32)
        img = img * (1 - sea) + sea * _rgb((40, 110, 170))
    elif scene.layout == "foliage":
        leaf_a, leaf_b = wall * 0.7, np.clip(wall * 1.35, 0, 1)
        for _ in range(14):
            _disc(img, rng.uniform(0, size), rng.uniform(0, size * horizon), rng.uniform(0.06, 0.16) * size,
                  leaf_a if rng.random() < 0.5 else leaf_b, 0.8, size * 0.02)
    elif scene.layout == "blocks":
        for _ in range(6):
            x0, w = rng.uniform(0, 0.9), rng.uniform(0.1, 0.25)
            top = rng.uniform(0.1, 0.5)
            shade = rng.uniform(0.7, 1.15)
            m = ((xx >= x0) & (xx < x0 + w) & (yy >= top) & (yy < horizon))[..., None].astype(np.float32)
            img = img * (1 - m) + m * np.clip(wall * shade, 0, 1)
    elif scene.layout == "stars":
        n = int(size * size * 0.0015) + 5
        ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
        img[ys, xs] = 0.9
    elif scene.layout == "room":
        for _ in range(3):  # furniture: soft darker blocks against the wall
            x0, w = rng.uniform(0, 0.8), rng.uniform(0.15, 0.35)
            top = rng.uniform(0.3, 0.55)
            m = ((xx >= x0) & (xx < x0 + w) & (yy >= top) & (yy < horizon))[..., None].astype(np.float32)
            img = img * (1 - 0.25 * m)

    # Surface material texture (the whole canvas when the scene is a studio).
    if material is not None:
        tex = _texture(material.texture, rng, size)[..., None] * material.amplitude
        region = np.ones_like(is_floor) if scene.layout == "studio" else is_floor
        img = img + tex * region

    # Patterns.
    for pat in p.patterns:
        if pat == "gradient":
            img = img * (0.8 + 0.35 * (1 - yy))[..., None]
        elif pat == "stripes":
            stripes = (np.sin(xx * 2 * np.pi * 5 + rng.uniform(0, 6.28)) > 0)[..., None].astype(np.float32)
            img = img * (1.0 - 0.18 * stripes) + 0.06 * stripes
        elif pat == "polka dots":
            r = size * 0.045
            for cy in np.arange(size * 0.1, size, size * 0.2):
                for cx in np.arange(size * 0.1, size, size * 0.2):
                    _disc(img, cx + rng.uniform(-2, 2), cy, r, np.clip(img[int(cy), int(cx)] * 0.6 + 0.4, 0, 1), 0.9, 1.0)
        elif pat == "checkered":
            grid = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2)[..., None]
            img = img * (1.0 - 0.2 * grid)
        elif pat == "bokeh":
            for _ in range(18):
                _disc(img, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.02, 0.07) * size,
                      np.clip(img.mean(axis=(0, 1)) + 0.35, 0, 1), 0.45, size * 0.02)
            img = cv2.GaussianBlur(img, (0, 0), size * 0.006)
        elif pat == "minimalist":
            img = cv2.GaussianBlur(img, (0, 0), size * 0.02)
        elif pat == "cluttered":
            for _ in range(20):
                x0, y0 = rng.uniform(-0.1, 1.0, 2)
                w, h = rng.uniform(0.05, 0.2, 2)
                m = ((xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h))[..., None].astype(np.float32)
                img = img * (1 - m) + m * rng.uniform(0.1, 0.9, 3).astype(np.float32)

    # Lighting.
    light = Lighting()
    for name in p.lighting:
        l = LIGHTING[name]
        light = Lighting(light.brightness + l.brightness, light.temperature + l.temperature,
                         light.contrast * l.contrast, max(light.vignette, l.vignette), light.glow or l.glow)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * light.contrast + mean + light.brightness
    img = img + np.array([light.temperature, 0.2 * light.temperature, -light.temperature], np.float32)
    if light.vignette > 0:
        d = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.7071
        img = img * (1.0 - light.vignette * d**2)[..., None]
    if light.glow:
        for colour in ((1.0, 0.2, 0.8), (0.1, 0.9, 1.0)):
            _disc(img, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.5) * size, size * 0.3,
                  np.array(colour, np.float32), 0.55, size * 0.25)
    img = img + rng.normal(0.0, 0.004, img.shape).astype(np.float32)  # sensor-like grain, seed-dependent
    return np.clip(img * 255.0, 0, 255).round().astype(np.uint8)
