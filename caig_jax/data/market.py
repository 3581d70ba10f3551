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

The hidden click model (market version 3: `true_ctr(ad_rgb, product)`)
---------------------------------------------------------------------
Made to be *visible at low resolution* and *learnable from pixels*: it is computed on the composed ad
downsampled to 32x32 (area average), so a model that looks at 32-64 px images sees all of it.

1. The background's colour look: the mean RGB of the outer ring (3 px of the 32x32 image: pure background,
   because the product fills at most the central 78%), turned into luma, warmth `R - B` and greenness
   `G - (R + B) / 2` (`background_look`; all linear in the ring's mean colour).
2. Every *product* has an ideal look. Its category's is the look of the category's *ideal prompt*
   (`CATEGORIES[c].ideal`, e.g. coffee mug: "wooden kitchen counter, warm lighting"; smartphone: "black studio
   backdrop, brushed metal, dramatic lighting"), painted once with fixed seeds (`category_target`). The
   product's own colour (`attributes["colour"]`: named in its title, painted on its cut-out; each category
   comes in 10 colours) moves it, for contrast, away from that colour:
       target_p = target_c - PRODUCT_CONTRAST * (look(colour_p) - mean look of the category's 10 colours)
   with PRODUCT_CONTRAST = 0.5 (`product_target`): a white t-shirt's shoppers like a darker background than a
   black t-shirt's, a red mug's a cooler one than a teal mug's.
3. The CTR falls linearly with the distance from that ideal, measured in units of the looks' spread over
   the prompt vocabulary (`look_scale`, one standard deviation per component):
       d = |(look - target_p) / look_scale|
       logit(CTR) = logit(base_ctr[c]) + CTR_GAIN * (TYPICAL_DISTANCE - d),   CTR_GAIN = 0.25, TYPICAL_DISTANCE = 2.5
   clipped to CTR in [0.3%, 12%] (the clip almost never binds: typical CTRs are 1.5-5%). `market` adds a
   per-item offset (the item's own attractiveness) that cancels inside a pair; `true_ctr` leaves it out
   unless `item_offset` is given. `ctr_from_looks(look, product)` is the same function on the hidden look.

Why product-specific: in version 2 the best background depended only on the category, so a Prompt Model was
optimal by reading one word of the title, and the product-background match between siblings was 0.5
whatever it did. Now siblings of different colours have different best backgrounds (the world report's
*sibling separability*: a product's own best prompt is strictly better for it than a same-category
sibling's in about 89% of sibling pairs; the rest are siblings of the same colour), learnable from the
product's image and title. Why an ideal point rather than a product direction (`d_p = normalize(d_c + beta *
u_p)`, measured on the same palettes): with a direction the best background is always an extreme of the
paintable looks, few extremes serve all products, and separability was 0.68 / 0.80 / 0.86 at beta 0.5 / 1 / 2
(the colour has to outweigh the category), against 0.90 for the ideal point at 0.5.

Why less saturation: version 2's `tanh(projection / 0.12)` put 55% of the creatives on its flat ends, where
two ads of a product have nearly equal CTRs; 37-40% of the CAIG test pairs then had a true ratio below 1.02
(they passed the 1.05-1.20 filter on binomial noise) and the oracle fell to 0.69. A distance has the same
slope everywhere (the world report's *flat-stretch share* is 0 unless the clip binds), so the within-product
CTR spread has no pile-up of near-equal values: about 10% of the test pairs are true near-ties, and a
logistic regression on the exact hidden features orders 97% of the true-ratio pairs (README: the figures).

Within a product the CTR order of two ads is the order of one number, the distance of their background
look from the product's ideal: a model has to find the background, read its colour, and know what this
product's shoppers prefer, from its category and its colour. (Version 1 of this world added a texture
penalty and a product-contrast term that nearly cancelled on CAIG's pairs: see `caig_jax/data/README.md`.)
`caig_jax.data.world` measures all this (`world_report`) and scores prompts against the truth
(`match_rate_sibling`, `match_rate_cross`).

Logs
----
Each product gets several creatives (`min_creatives`..`max_creatives`); each creative's prompt is, with probability
`on_brief`, drawn from the category's preferred descriptors, else from the whole vocabulary. Impressions
are log-normal (`impressions_median`, `impressions_sigma`) except a fraction `low_impression_fraction`
drawn in [100, 1000) so the impressions > 1000 rule has work to do; clicks ~ Binomial(impressions, CTR),
spread over 1-3 daily rows, written in the CreativeRanking layout. The label noise of the logs, and so
the *oracle accuracy* (how often the logged label agrees with the true CTR order on the pairs kept by
CAIG's rule), is set by the impressions and the CTR spread inside a product: about 0.75 with the presets.

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
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from caig_jax.data.images import encode_image
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
    yy, xx = _grid(size)
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
    """Alpha-blends a soft disc into img (float32[H, W, 3]) in place (only its bounding box is touched)."""
    size = img.shape[0]
    y0, y1 = max(0, int(cy - r - 1)), min(size, int(cy + r + 2))
    x0, x1 = max(0, int(cx - r - 1)), min(size, int(cx + r + 2))
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32)
    a = (np.clip((r - d) / max(soft, 1e-3), 0.0, 1.0) * alpha)[..., None].astype(np.float32)
    view = img[y0:y1, x0:x1]
    view *= 1.0 - a
    view += a * colour


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


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

    yy, xx = _grid(size)
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
            light_colour = np.clip(img.mean(axis=(0, 1)) + 0.35, 0, 1)
            for _ in range(18):
                _disc(img, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.02, 0.07) * size,
                      light_colour, 0.45, size * 0.02)
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
    if light.contrast != 1.0:
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = (img - mean) * light.contrast + mean
    if light.brightness or light.temperature:
        img = img + np.array([light.brightness + light.temperature, light.brightness + 0.2 * light.temperature,
                              light.brightness - light.temperature], np.float32)
    if light.vignette > 0:
        d = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.7071
        img = img * (1.0 - light.vignette * d**2)[..., None]
    if light.glow:
        for colour in ((1.0, 0.2, 0.8), (0.1, 0.9, 1.0)):
            _disc(img, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.5) * size, size * 0.3,
                  np.array(colour, np.float32), 0.55, size * 0.25)
    return np.clip(img * 255.0, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    noun: str
    base_ctr: float  # CTR of an average-looking ad for this category
    ideal: str  # the prompt whose painted look this category's shoppers like best
    colours: tuple[str, ...]  # on-brief descriptors (what `sample_prompt(rng, category)` draws from)
    materials: tuple[str, ...]
    scenes: tuple[str, ...]
    lighting: tuple[str, ...]
    patterns: tuple[str, ...]
    product_colours: tuple[str, ...]  # colours the product itself comes in (its palette: 10 vocabulary colours)
    product_materials: tuple[str, ...]
    adjectives: tuple[str, ...]
    aspect: float  # product height / width before jitter


CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in (
        Category("water_bottle", "water bottle", 0.030, "pastel blue beach, bright daylight",
                 ("pastel blue", "mint", "teal", "white"), ("sand",), ("beach", "garden"),
                 ("bright daylight", "cool lighting"), ("gradient",),
                 ("teal", "blue", "red", "black", "white", "green", "pink", "purple", "orange", "mint"),
                 ("stainless steel", "tritan plastic"),
                 ("insulated", "leak-proof", "sports"), 3.0),
        Category("sneaker", "sneaker", 0.028, "grey concrete city street, cool lighting",
                 ("grey", "charcoal", "white"), ("concrete", "stone"), ("city street",),
                 ("cool lighting", "dramatic lighting"), ("stripes",),
                 ("white", "red", "black", "blue", "orange", "grey", "green", "navy", "yellow", "pink"),
                 ("mesh", "leather", "suede"),
                 ("running", "lightweight", "retro"), 0.5),
        Category("smartphone", "smartphone", 0.022, "black studio backdrop, brushed metal, dramatic lighting",
                 ("black", "charcoal", "navy"), ("brushed metal",), ("studio backdrop", "office desk"),
                 ("dramatic lighting", "studio lighting", "cool lighting"), ("minimalist",),
                 ("black", "white", "blue", "gold", "purple", "red", "green", "lavender", "mint", "charcoal"),
                 ("aluminium", "glass"),
                 ("5G", "dual-camera", "slim"), 2.0),
        Category("coffee_mug", "coffee mug", 0.034, "wooden kitchen counter, warm lighting",
                 ("cream", "brown", "beige"), ("wooden", "marble"), ("kitchen counter", "cafe"),
                 ("warm lighting", "golden hour", "soft lighting"), ("bokeh",),
                 ("white", "red", "yellow", "teal", "black", "blue", "green", "pink", "orange", "cream"),
                 ("ceramic", "stoneware"),
                 ("handmade", "large", "glazed"), 0.85),
        Category("t_shirt", "t-shirt", 0.026, "cream linen bedroom, soft lighting",
                 ("cream", "white", "beige"), ("linen", "paper"), ("bedroom", "living room"),
                 ("soft lighting", "bright daylight"), ("plain",),
                 ("white", "black", "red", "navy", "green", "yellow", "grey", "pink", "olive", "orange"),
                 ("cotton", "organic cotton"),
                 ("oversized", "classic", "crew-neck"), 0.95),
        Category("wristwatch", "wristwatch", 0.020, "navy velvet studio backdrop, dramatic lighting",
                 ("navy", "black", "gold"), ("velvet", "leather"), ("studio backdrop",),
                 ("dramatic lighting", "dim light"), ("minimalist",),
                 ("gold", "white", "black", "brown", "blue", "green", "navy", "grey", "charcoal", "beige"),
                 ("stainless steel", "leather strap"),
                 ("automatic", "chronograph", "classic"), 2.2),
        Category("lipstick", "lipstick", 0.036, "pastel pink studio backdrop, soft lighting",
                 ("pastel pink", "pink", "lavender", "white"), ("marble", "paper"),
                 ("studio backdrop", "bathroom shelf"), ("soft lighting", "studio lighting"), ("bokeh", "polka dots"),
                 ("red", "pink", "purple", "orange", "brown", "pastel pink", "beige", "lavender", "black", "gold"),
                 ("matte", "satin"),
                 ("long-lasting", "velvet matte", "hydrating"), 3.4),
        Category("potted_plant", "potted plant", 0.032, "green garden, bright daylight",
                 ("green", "mint", "olive"), ("stone", "wooden"), ("garden", "forest"),
                 ("bright daylight", "soft lighting"), ("plain",),
                 ("white", "orange", "grey", "blue", "black", "teal", "yellow", "beige", "brown", "pink"),
                 ("terracotta", "ceramic"),
                 ("indoor", "low-maintenance", "air-purifying"), 1.3),
        Category("handbag", "handbag", 0.024, "gold leather living room, golden hour",
                 ("gold", "beige", "brown"), ("leather", "velvet"), ("living room", "city street"),
                 ("golden hour", "warm lighting"), ("gradient",),
                 ("black", "brown", "red", "beige", "white", "navy", "pink", "green", "cream", "olive"),
                 ("leather", "canvas"),
                 ("designer", "everyday", "quilted"), 0.85),
        Category("headphones", "headphones", 0.027, "purple night sky, neon glow",
                 ("purple", "navy", "black"), ("brushed metal",), ("night sky", "city street"),
                 ("neon glow", "dramatic lighting"), ("bokeh",),
                 ("black", "white", "red", "blue", "pink", "green", "gold", "navy", "grey", "lavender"),
                 ("plastic", "aluminium"),
                 ("wireless", "noise-cancelling", "over-ear"), 1.0),
    )
}

BRANDS = ("Aurora", "Nimbus", "Kestrel", "Lumen", "Orbit", "Verde", "Solace", "Ember", "Tidal", "Quill")


class _Canvas:
    """Draws shaded flat shapes into colour + alpha layers, in unit coordinates (0..1) of a square."""

    def __init__(self, size: int):
        self.size = size
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.alpha = np.zeros((size, size), np.float32)

    def _px(self, pts) -> np.ndarray:
        return (np.asarray(pts, np.float32) * self.size).round().astype(np.int32)

    def _blend(self, mask: np.ndarray, colour, shade: float) -> None:
        box = cv2.boundingRect(mask)  # (x, y, w, h) of the non-zero mask: work inside it only
        x0, y0, w, h = box
        if w == 0 or h == 0:
            return
        m = mask[y0 : y0 + h, x0 : x0 + w].astype(np.float32)[..., None] / 255.0
        rel = np.arange(w, dtype=np.float32) / max(w, 1)
        # Cylindrical shading across the shape, lit slightly from the left.
        light = (1.0 - shade) + shade * (0.55 + 0.6 * np.sin(np.pi * rel) - 0.15 * rel)
        layer = _rgb(colour)[None, None, :] * light[None, :, None]
        rgb, alpha = self.rgb[y0 : y0 + h, x0 : x0 + w], self.alpha[y0 : y0 + h, x0 : x0 + w]
        rgb *= 1.0 - m
        rgb += layer * m
        np.maximum(alpha, m[..., 0], out=alpha)

    def poly(self, pts, colour, shade: float = 0.5) -> None:
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(mask, [self._px(pts)], 255)
        self._blend(mask, colour, shade)

    def ellipse(self, centre, axes, colour, angle: float = 0.0, shade: float = 0.5, thickness: int = -1) -> None:
        mask = np.zeros((self.size, self.size), np.uint8)
        c = tuple(int(v) for v in self._px(centre))
        a = tuple(max(1, int(v)) for v in self._px(axes))
        cv2.ellipse(mask, c, a, angle, 0, 360, 255, thickness if thickness < 0 else max(1, int(thickness * self.size / 100)))
        self._blend(mask, colour, shade)

    def rect(self, x0, y0, x1, y1, colour, shade: float = 0.5, radius: float = 0.0) -> None:
        if radius <= 0:
            self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour, shade)
            return
        mask = np.zeros((self.size, self.size), np.uint8)
        r = int(radius * self.size)
        p0, p1 = self._px((x0, y0)), self._px((x1, y1))
        cv2.rectangle(mask, (int(p0[0]) + r, int(p0[1])), (int(p1[0]) - r, int(p1[1])), 255, -1)
        cv2.rectangle(mask, (int(p0[0]), int(p0[1]) + r), (int(p1[0]), int(p1[1]) - r), 255, -1)
        for cx, cy in ((p0[0] + r, p0[1] + r), (p1[0] - r, p0[1] + r), (p0[0] + r, p1[1] - r), (p1[0] - r, p1[1] - r)):
            cv2.circle(mask, (int(cx), int(cy)), r, 255, -1)
        self._blend(mask, colour, shade)

    def line(self, pts, colour, width: float) -> None:
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.polylines(mask, [self._px(pts)], False, 255, max(1, int(width * self.size)))
        self._blend(mask, colour, 0.0)

    def rgba(self) -> np.ndarray:
        out = np.concatenate([np.clip(self.rgb, 0, 1) * 255.0, self.alpha[..., None] * 255.0], axis=-1)
        return out.round().astype(np.uint8)


def _shade(c, k: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * k, 0, 255)) for v in c)


def _draw_product(category: str, rng: np.random.Generator, size: int, colour, accent) -> np.ndarray:
    """Draws one product of a category on a transparent square canvas (2x supersampled). uint8[S, S, 4]."""
    cv_ = _Canvas(size * 2)
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if category == "water_bottle":
        w = j(0.22, 0.3)
        cv_.rect(0.5 - w / 2, 0.22, 0.5 + w / 2, 0.92, colour, radius=0.06)
        cv_.rect(0.5 - w / 3, 0.12, 0.5 + w / 3, 0.24, _shade(colour, 0.85), radius=0.02)
        cv_.rect(0.5 - w / 3.2, 0.06, 0.5 + w / 3.2, 0.13, accent, radius=0.015)
        cv_.rect(0.5 - w / 2, j(0.45, 0.55), 0.5 + w / 2, 0.66, accent, shade=0.4)
    elif category == "sneaker":
        top = j(0.3, 0.4)
        cv_.poly([(0.08, 0.72), (0.14, top + 0.12), (0.42, top), (0.55, top + 0.14), (0.9, 0.56), (0.94, 0.72)], colour)
        cv_.rect(0.06, 0.7, 0.95, 0.8, (240, 240, 236), shade=0.2, radius=0.03)
        cv_.line([(0.3, 0.66), (0.5, 0.52), (0.78, 0.6)], accent, 0.035)
        for k in range(4):
            cv_.line([(0.4 + 0.04 * k, top + 0.06 + 0.03 * k), (0.46 + 0.04 * k, top + 0.1 + 0.03 * k)], (245, 245, 245), 0.01)
    elif category == "smartphone":
        w = j(0.36, 0.44)
        cv_.rect(0.5 - w / 2, 0.06, 0.5 + w / 2, 0.94, (30, 30, 34), shade=0.3, radius=0.05)
        cv_.rect(0.5 - w / 2 + 0.025, 0.1, 0.5 + w / 2 - 0.025, 0.9, colour, shade=0.2, radius=0.03)
        cv_.poly([(0.5 - w / 2 + 0.025, 0.9), (0.5 + w / 2 - 0.025, 0.35), (0.5 + w / 2 - 0.025, 0.9)], accent, shade=0.2)
        cv_.ellipse((0.5, 0.13), (0.015, 0.015), (10, 10, 10), shade=0.0)
    elif category == "coffee_mug":
        cv_.ellipse((0.76, 0.52), (0.14, j(0.16, 0.2)), colour, thickness=6, shade=0.3)
        cv_.rect(0.18, 0.28, 0.72, 0.86, colour, radius=0.04)
        cv_.ellipse((0.45, 0.28), (0.27, 0.05), _shade(colour, 0.7), shade=0.2)
        cv_.rect(0.18, j(0.45, 0.55), 0.72, 0.62, accent, shade=0.4)
    elif category == "t_shirt":
        cv_.poly([(0.3, 0.12), (0.42, 0.16), (0.58, 0.16), (0.7, 0.12), (0.95, 0.3), (0.84, 0.45), (0.76, 0.4),
                  (0.76, 0.92), (0.24, 0.92), (0.24, 0.4), (0.16, 0.45), (0.05, 0.3)], colour, shade=0.35)
        cv_.ellipse((0.5, 0.16), (0.09, 0.05), _shade(colour, 0.65), shade=0.0)
        if rng.random() < 0.7:
            cv_.ellipse((0.5, 0.5), (j(0.08, 0.14), j(0.06, 0.12)), accent, shade=0.1)
    elif category == "wristwatch":
        strap = accent
        cv_.rect(0.38, 0.02, 0.62, 0.35, strap, radius=0.03)
        cv_.rect(0.38, 0.65, 0.62, 0.98, strap, radius=0.03)
        cv_.ellipse((0.5, 0.5), (0.22, 0.22), colour, shade=0.4)
        cv_.ellipse((0.5, 0.5), (0.18, 0.18), (236, 234, 226), shade=0.15)
        a = j(0, 6.28)
        cv_.line([(0.5, 0.5), (0.5 + 0.13 * math.cos(a), 0.5 + 0.13 * math.sin(a))], (20, 20, 20), 0.02)
        cv_.line([(0.5, 0.5), (0.5, 0.38)], (20, 20, 20), 0.015)
    elif category == "lipstick":
        w = j(0.2, 0.26)
        cv_.rect(0.5 - w / 2, 0.52, 0.5 + w / 2, 0.96, accent, radius=0.02)
        cv_.rect(0.5 - w / 2.3, 0.36, 0.5 + w / 2.3, 0.54, (212, 172, 56), shade=0.6)
        cv_.poly([(0.5 - w / 2.6, 0.37), (0.5 - w / 2.6, 0.12), (0.5 + w / 2.6, 0.04), (0.5 + w / 2.6, 0.37)], colour)
    elif category == "potted_plant":
        leaf = (50 + int(rng.integers(0, 40)), 130 + int(rng.integers(0, 50)), 50)
        for _ in range(7):
            cv_.ellipse((j(0.3, 0.7), j(0.15, 0.45)), (j(0.08, 0.14), j(0.04, 0.07)), leaf, angle=j(0, 180), shade=0.3)
        cv_.poly([(0.25, 0.5), (0.75, 0.5), (0.68, 0.94), (0.32, 0.94)], colour, shade=0.5)
        cv_.rect(0.22, 0.48, 0.78, 0.56, _shade(colour, 0.85), shade=0.3)
    elif category == "handbag":
        cv_.ellipse((0.5, 0.38), (j(0.18, 0.24), 0.2), accent, thickness=5, shade=0.2)
        cv_.poly([(0.2, 0.38), (0.8, 0.38), (0.9, 0.9), (0.1, 0.9)], colour, shade=0.45)
        cv_.rect(0.44, 0.46, 0.56, 0.54, (212, 172, 56), shade=0.4)
    elif category == "headphones":
        cv_.ellipse((0.5, 0.5), (0.34, 0.38), colour, thickness=7, shade=0.2)
        cv_.rect(0.08, 0.5, 0.3, 0.85, colour, radius=0.06)
        cv_.rect(0.7, 0.5, 0.92, 0.85, colour, radius=0.06)
        cv_.rect(0.13, 0.55, 0.25, 0.8, accent, radius=0.04, shade=0.2)
        cv_.rect(0.75, 0.55, 0.87, 0.8, accent, radius=0.04, shade=0.2)
        # the band's lower half is hidden behind the ear cups
        cv_.alpha[int(cv_.size * 0.62):, int(cv_.size * 0.3):int(cv_.size * 0.7)] = 0.0
    else:
        raise ValueError(f"unknown category {category!r}; known: {sorted(CATEGORIES)}")
    rgba = cv_.rgba()
    angle = float(rng.uniform(-8.0, 8.0))
    m = cv2.getRotationMatrix2D((cv_.size / 2, cv_.size / 2), angle, 1.0)
    rgba = cv2.warpAffine(rgba, m, (cv_.size, cv_.size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))
    return product_lib._resize_rgba(rgba, size, size)  # 2x supersampling = antialiased edges


@dataclasses.dataclass(frozen=True)
class Product:
    id: str
    category: str
    title: str
    attributes: dict[str, str]  # colour (a vocabulary colour: the click model reads it), material, brand, price
    seed: int

    def __hash__(self) -> int:  # usable as a dict key (e.g. product -> prompts) despite the attributes dict
        return hash((self.id, self.category, self.title, self.seed))


def _stream(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream `stream` of product `index` (any integer index; negative ones get their own streams)."""
    index = int(index)
    return np.random.default_rng([seed, index, stream] if index >= 0 else [seed, -index, stream, 1])


def make_product(index: int, category: str, seed: int) -> Product:
    """The title and attributes of product `index` (its image is drawn by `product_image`). Any integer index
    works with any category (the marketplace deals categories round-robin, `index % len(categories)`)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {sorted(CATEGORIES)}")
    cat = CATEGORIES[category]
    rng = _stream(seed, index, 1)
    colour = str(rng.choice(cat.product_colours))
    material = str(rng.choice(cat.product_materials))
    brand = str(rng.choice(BRANDS))
    adjective = str(rng.choice(cat.adjectives))
    price = f"{float(rng.uniform(8, 180)):.2f}"
    title = f"{brand} {colour} {adjective} {material} {cat.noun}"
    attributes = {"colour": colour, "material": material, "brand": brand, "price": price, "category": cat.noun}
    return Product(f"item{int(index):05d}", category, title, attributes, seed)


def product_image(product: Product, size: int) -> np.ndarray:
    """The product's RGBA cut-out, uint8[size, size, 4] (deterministic in the product's index and seed); its
    body is painted in `attributes["colour"]`."""
    index = int(product.id[len("item"):])
    rng = _stream(product.seed, index, 2)
    colour = COLOURS.get(product.attributes["colour"], (128, 128, 128))
    accent = COLOURS[str(rng.choice(["white", "black", "gold", "grey", "red", "teal", "yellow"]))]
    return _draw_product(product.category, rng, size, colour, accent)


# ----------------------------------------------------------------------------------------------------------
# Composition and the hidden click model
# ----------------------------------------------------------------------------------------------------------


def compose_ad(product_rgba: np.ndarray, prompt: str, size: int = 512, seed: int = 0) -> np.ndarray:
    """The simulated renderer: place the product like CAIG (fit 0.78, centred), paint the prompt's
    background, paste the product back with its undilated alpha. Returns uint8[size, size, 3]."""
    placed = product_lib.place_product(product_rgba, size=size)
    return product_lib.paste_product(paint_background(prompt, size, seed), placed)


# The click model (market version 3). See the module docstring for the formula and the reasons.
PRODUCT_CONTRAST = 0.5  # beta: how far a product's ideal look moves away from its own colour
CTR_GAIN = 0.25  # log-odds per unit of look distance (distance in units of the looks' spread)
TYPICAL_DISTANCE = 2.5  # about the median distance of a logged creative: there, CTR = the category's base CTR
CTR_RANGE = (0.003, 0.12)
CLICK_MODEL_RES = 32  # the click model looks at the ad at this resolution
_RING = 3  # pixels of the 32x32 image's border that are always background (0.78 fit leaves 3.5 px)


def _ring_mask(res: int = CLICK_MODEL_RES, ring: int = _RING) -> np.ndarray:
    m = np.zeros((res, res), bool)
    m[:ring], m[-ring:], m[:, :ring], m[:, -ring:] = True, True, True, True
    return m


_LOOK_FROM_RGB = np.array([  # rows: luma, warmth = R - B, green = G - (R + B) / 2; linear in the mean RGB
    [0.299, 0.587, 0.114],
    [1.0, 0.0, -1.0],
    [-0.5, 1.0, -0.5],
], np.float32)


def background_look(image_rgb: np.ndarray) -> np.ndarray:
    """float32[3] (luma, warmth, green) of the background: linear functions of the mean RGB (in [0, 1]) of
    the outer ring of the image area-downsampled to 32x32. See the module docstring."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image uint8[H, W, 3], got shape {image_rgb.shape}")
    if min(image_rgb.shape[:2]) < CLICK_MODEL_RES:
        raise ValueError(f"the click model needs an image of at least {CLICK_MODEL_RES} px, got {image_rgb.shape[:2]}")
    small = cv2.resize(image_rgb, (CLICK_MODEL_RES, CLICK_MODEL_RES), interpolation=cv2.INTER_AREA)
    ring_mean = small[_ring_mask()].astype(np.float32).mean(0) / 255.0
    return _LOOK_FROM_RGB @ ring_mean


def colour_look(colour: str) -> np.ndarray:
    """The look (luma, warmth, green) of a flat vocabulary colour, float64[3]."""
    return (_LOOK_FROM_RGB @ (np.asarray(COLOURS[colour], np.float32) / 255.0)).astype(np.float64)


@functools.lru_cache(maxsize=1)
def look_scale() -> np.ndarray:
    """float64[3]: the standard deviation of each look component over 256 backgrounds painted from random
    vocabulary prompts (64 px): the unit in which the click model measures look distances."""
    rng = np.random.default_rng(12345)
    looks = [background_look(paint_background(sample_prompt(rng), 64, k)) for k in range(256)]
    return np.std(np.asarray(looks, np.float64), axis=0)


@functools.lru_cache(maxsize=None)
def category_target(category: str) -> np.ndarray:
    """The look (luma, warmth, green) of a category's ideal prompt, painted with 4 fixed seeds."""
    ideal = CATEGORIES[category].ideal
    return np.mean([background_look(paint_background(ideal, 64, seed)) for seed in range(4)], axis=0)


@functools.lru_cache(maxsize=None)
def _target(category: str, colour: str) -> np.ndarray:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {sorted(CATEGORIES)}")
    if colour not in COLOURS:
        raise ValueError(f"product colour {colour!r} is not a vocabulary colour; known: {sorted(COLOURS)}")
    palette = np.mean([colour_look(c) for c in CATEGORIES[category].product_colours], axis=0)
    target = category_target(category).astype(np.float64) - PRODUCT_CONTRAST * (colour_look(colour) - palette)
    target.setflags(write=False)
    return target


def product_target(product: Product) -> np.ndarray:
    """float64[3]: the look this product's shoppers like best: its category's ideal look, moved away from the
    product's own colour (relative to the category's palette) by `PRODUCT_CONTRAST`. Depends only on the
    product's category and its colour (`attributes["colour"]`, named in the title, painted on the cut-out)."""
    if not isinstance(product, Product):
        raise TypeError(f"expected a market.Product (market v3: the click model depends on the product, not only "
                        f"its category), got {type(product).__name__}")
    return _target(product.category, product.attributes["colour"])


def look_distance(looks: np.ndarray, product: Product) -> np.ndarray:
    """Distance of background look(s) float[..., 3] from the product's ideal look, in units of `look_scale`."""
    x = (np.asarray(looks, np.float64) - product_target(product)) / look_scale()
    return np.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + x[..., 2] ** 2)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def ctr_from_looks(looks: np.ndarray, product: Product, item_offset: float = 0.0) -> np.ndarray:
    """The click model on its hidden features: the true CTR (float64[...]) of ads of `product` whose
    backgrounds have the look(s) float[..., 3]. `true_ctr(ad, product)` is exactly
    `ctr_from_looks(background_look(ad), product)`."""
    logit = (_logit(CATEGORIES[product.category].base_ctr) + item_offset
             + CTR_GAIN * (TYPICAL_DISTANCE - look_distance(looks, product)))
    return np.clip(1.0 / (1.0 + np.exp(-logit)), *CTR_RANGE)


def true_ctr(ad_rgb: np.ndarray, product: Product, item_offset: float = 0.0) -> float:
    """The hidden ground-truth CTR of a composed ad of `product` (see the module docstring), in (0, 1).

    Deterministic; `ad_rgb` is uint8[H, W, 3] of any size >= 32 px (the click model downsamples to 32x32).
    `item_offset` is the product's own attractiveness in log-odds (the marketplace draws one per item; it
    cancels when two ads of the same product are compared, so callers can leave it out). Usable on any
    composed image, e.g. to measure the CTR lift of generated backgrounds.
    """
    if not isinstance(product, Product):
        raise TypeError(f"true_ctr(ad_rgb, product) takes a market.Product (market v3: the click model depends on "
                        f"the product, not only its category), got {type(product).__name__}: {product!r}")
    return float(ctr_from_looks(background_look(ad_rgb), product, item_offset))


def sample_prompt(rng: np.random.Generator, category: str | None = None) -> str:
    """A background prompt from the vocabulary: on the category's brief when `category` is given, else
    from the whole vocabulary. Shape: "<colour> <material> <scene>, <lighting>, <pattern>" (parts optional)."""
    cat = CATEGORIES[category] if category else None
    pick = lambda own, everything: str(rng.choice(own if own else everything))  # noqa: E731
    parts = []
    head = []
    if rng.random() < 0.75:
        head.append(pick(cat.colours if cat else None, VOCABULARY["colour"]))
    if rng.random() < 0.55:
        head.append(pick(cat.materials if cat else None, VOCABULARY["material"]))
    if rng.random() < 0.8:
        head.append(pick(cat.scenes if cat else None, VOCABULARY["scene"]))
    if not head:
        head.append(pick(cat.colours if cat else None, VOCABULARY["colour"]))
    parts.append(" ".join(head))
    if rng.random() < 0.75:
        parts.append(pick(cat.lighting if cat else None, VOCABULARY["lighting"]))
    if rng.random() < 0.3:
        parts.append(pick(cat.patterns if cat else None, VOCABULARY["pattern"]))
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# The simulated world on disk
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MarketConfig:
    """What `make_market` simulates. `configs/market.py` holds the presets."""

    num_products: int = 500
    categories: tuple[str, ...] = tuple(CATEGORIES)
    min_creatives: int = 8
    max_creatives: int = 12
    image_size: int = 96  # composed ads (the logs' images)
    product_size: int = 128  # RGBA cut-outs
    on_brief: float = 0.4  # probability that a creative's prompt is on the category's brief
    impressions_median: float = 3000.0
    impressions_sigma: float = 0.5
    low_impression_fraction: float = 0.05  # creatives with impressions in [100, 1000)
    item_offset_sd: float = 0.25  # the product's own attractiveness, log-odds
    max_days: int = 3  # each creative's impressions are spread over 1..max_days daily rows
    split_fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
    min_impressions: int = 1000  # the pair rule used for the oracle report
    min_ratio: float = 1.05
    max_ratio: float = 1.20
    contact_sheet_products: int = 10
    num_workers: int = 0  # >1: simulate items in that many processes

    @classmethod
    def make(cls, config: Any = None, **overrides: Any) -> MarketConfig:
        """From a MarketConfig, a mapping (e.g. a ConfigDict) or keyword overrides; unknown keys raise."""
        values: dict[str, Any] = {}
        if isinstance(config, MarketConfig):
            values = dataclasses.asdict(config)
        elif config is not None:
            values = dict(config.items() if hasattr(config, "items") else config)
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown market option(s) {unknown}; known: {sorted(known)}")
        if "categories" in values:
            values["categories"] = tuple(values["categories"])
            bad = sorted(set(values["categories"]) - set(CATEGORIES))
            if bad:
                raise ValueError(f"unknown categories {bad}; known: {sorted(CATEGORIES)}")
        if "split_fractions" in values:
            sf = values["split_fractions"]
            values["split_fractions"] = tuple((str(k), float(v)) for k, v in (sf.items() if hasattr(sf, "items") else sf))
        cfg = cls(**values)
        if not 2 <= cfg.min_creatives <= cfg.max_creatives:
            raise ValueError(f"need 2 <= min_creatives <= max_creatives, got {cfg.min_creatives}, {cfg.max_creatives}")
        return cfg


def _write_atomic(path: str, data: bytes) -> None:
    """Writes via a temporary file + rename, so an interrupted run never leaves a half-written file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png(image: np.ndarray) -> bytes:
    return encode_image(image, "png")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def _item_category(cfg: MarketConfig, index: int) -> str:
    return cfg.categories[index % len(cfg.categories)]


def _simulate_item(out_dir: str, cfg: MarketConfig, seed: int, index: int) -> dict[str, Any]:
    """Draws one product and its creatives, writes their images, returns the item's log (cached on disk)."""
    cache = os.path.join(out_dir, "_work", f"item{index:05d}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    category = _item_category(cfg, index)
    product = make_product(index, category, seed)
    cutout = product_image(product, cfg.product_size)
    product_path = os.path.join(out_dir, "products", "images", f"{product.id}.png")
    if not os.path.exists(product_path):
        _write_atomic(product_path, _png(cutout))
    placed = product_lib.place_product(cutout, size=cfg.image_size)
    rng = _stream(seed, index, 3)
    offset = float(rng.normal(0.0, cfg.item_offset_sd))
    creatives = []
    for j in range(int(rng.integers(cfg.min_creatives, cfg.max_creatives + 1))):
        on_brief = bool(rng.random() < cfg.on_brief)
        prompt = sample_prompt(rng, category if on_brief else None)
        bg_seed = int(rng.integers(0, 2**31 - 1))
        ad = product_lib.paste_product(paint_background(prompt, cfg.image_size, bg_seed), placed)
        look = background_look(ad)  # the click model's hidden feature of this ad (kept for the world report)
        ctr = float(ctr_from_looks(look, product, offset))  # == true_ctr(ad, product, offset)
        name = f"{product.id}_{j:02d}.png"
        path = os.path.join(out_dir, "logs", "images", name)
        if not os.path.exists(path):
            _write_atomic(path, _png(ad))
        if rng.random() < cfg.low_impression_fraction:
            impressions = int(rng.integers(100, 1000))
        else:
            impressions = int(round(math.exp(rng.normal(math.log(cfg.impressions_median), cfg.impressions_sigma))))
            impressions = max(impressions, 1)
        days = int(rng.integers(1, cfg.max_days + 1))
        per_day = rng.multinomial(impressions, [1.0 / days] * days)
        first_day = int(rng.integers(0, 28 - days))
        rows = [[f"202406{first_day + d + 1:02d}", int(n), int(rng.binomial(int(n), ctr))] for d, n in enumerate(per_day)]
        creatives.append({"name": name, "prompt": prompt, "on_brief": on_brief, "bg_seed": bg_seed,
                          "true_ctr": ctr, "look": [float(v) for v in look], "rows": rows})
    item = {"id": product.id, "index": index, "category": category, "title": product.title,
            "attributes": product.attributes, "item_offset": offset, "creatives": creatives}
    _write_atomic(cache, _json_bytes(item))
    return item


def _simulate_items(out_dir: str, cfg: MarketConfig, seed: int) -> list[dict[str, Any]]:
    indices = range(cfg.num_products)
    if cfg.num_workers > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # the parent may hold JAX threads: never fork it
        with concurrent.futures.ProcessPoolExecutor(cfg.num_workers, mp_context=ctx) as pool:
            return list(pool.map(_simulate_item, *zip(*[(out_dir, cfg, seed, i) for i in indices]), chunksize=8))
    return [_simulate_item(out_dir, cfg, seed, i) for i in indices]


def _assign_splits(cfg: MarketConfig, seed: int) -> dict[int, str]:
    """Whole items to splits, balanced over categories: items are dealt round-robin over categories (in a
    random order within each category), the smaller splits first, so every split sees every category as
    soon as it has that many items."""
    rng = np.random.default_rng([seed, 4])
    per_category = []
    for category in cfg.categories:
        members = [i for i in range(cfg.num_products) if _item_category(cfg, i) == category]
        per_category.append([members[k] for k in rng.permutation(len(members))])
    dealt = [m[r] for r in range(max(map(len, per_category))) for m in per_category if r < len(m)]
    n = len(dealt)
    names = [name for name, _ in cfg.split_fractions]
    fractions = np.array([f for _, f in cfg.split_fractions], np.float64)
    exact = fractions / fractions.sum() * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts))[: n - counts.sum()]:  # largest remainders get the leftovers
        counts[k] += 1
    out, start = {}, 0
    for k in np.argsort(fractions, kind="stable"):
        for i in dealt[start : start + counts[k]]:
            out[i] = names[k]
        start += counts[k]
    return out


_DESCRIBE_PRODUCT_Q = (
    "Describe the product in this image.",
    "What product is shown in this picture? Describe it briefly.",
    "Give a short description of this product.",
)
_DESCRIBE_BACKGROUND_Q = (
    "Describe the background of this advertising image.",
    "What does the background of this ad look like?",
)
_TITLE_Q = ("Write a short product title for this advertising image.", "Give this product a title.")
_PROMPT_Q = (
    "The product is '{title}'. Write a background prompt for an advertising image of this product.",
    "Write a Stable Diffusion background prompt for the product '{title}'.",
)


def _conversations(items: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
    """The three pre-training task families as LLaVA conversation lists (image paths relative to the root)."""
    fam: dict[str, list[dict[str, Any]]] = {"describe_product": [], "describe_background": [], "background_prompt": []}
    turn = lambda q, a: [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]  # noqa: E731
    for item in items:
        a = item["attributes"]
        cat = CATEGORIES[item["category"]]
        product_image_path = f"products/images/{item['id']}.png"
        fam["describe_product"].append({
            "id": f"{item['id']}_product",
            "image": product_image_path,
            "conversations": turn(str(rng.choice(_DESCRIBE_PRODUCT_Q)),
                                  f"A {a['colour']} {cat.noun} made of {a['material']} by {a['brand']}. "
                                  f"Title: {item['title']}."),
        })
        for c in item["creatives"][:3]:
            if rng.random() < 0.5:
                q, ans, kind = str(rng.choice(_DESCRIBE_BACKGROUND_Q)), f"The {cat.noun} is shown on a background of {c['prompt']}.", "bg"
            else:
                q, ans, kind = str(rng.choice(_TITLE_Q)), item["title"], "title"
            fam["describe_background"].append({
                "id": f"{c['name'][:-4]}_{kind}", "image": f"logs/images/{c['name']}", "conversations": turn(q, ans)})
        for c in item["creatives"]:
            fam["background_prompt"].append({
                "id": f"{c['name'][:-4]}_prompt",
                "image": product_image_path,
                "conversations": turn(str(rng.choice(_PROMPT_Q)).format(title=item["title"]), c["prompt"]),
            })
    return fam


def _contact_sheet(out_dir: str, items: list[dict[str, Any]], cfg: MarketConfig, tile: int = 128) -> np.ndarray:
    """One row per category: the cut-out on a checkerboard, then its ads sorted by true CTR (annotated)."""
    chosen, seen = [], set()
    for item in items:
        if item["category"] not in seen and len(chosen) < cfg.contact_sheet_products:
            chosen.append(item)
            seen.add(item["category"])
    rows = []
    ncol = 6
    for item in chosen:
        cut = np.asarray(Image.open(os.path.join(out_dir, "products", "images", f"{item['id']}.png")).convert("RGBA"))
        cut = cv2.resize(cut, (tile, tile), interpolation=cv2.INTER_AREA)
        yy, xx = np.mgrid[0:tile, 0:tile]
        checker = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 0, 230, 200).astype(np.float32)
        a = cut[..., 3:].astype(np.float32) / 255.0
        tiles = [(cut[..., :3] * a + checker * (1 - a)).astype(np.uint8)]
        cv2.putText(tiles[0], item["category"][:16], (3, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        ads = sorted(item["creatives"], key=lambda c: -c["true_ctr"])[: ncol - 1]
        for c in ads:
            ad = np.asarray(Image.open(os.path.join(out_dir, "logs", "images", c["name"])).convert("RGB"))
            ad = np.ascontiguousarray(cv2.resize(ad, (tile, tile), interpolation=cv2.INTER_CUBIC))
            imp = sum(r[1] for r in c["rows"])
            logged = sum(r[2] for r in c["rows"]) / max(imp, 1)
            ad[-14:] = (ad[-14:].astype(np.float32) * 0.35).astype(np.uint8)
            cv2.putText(ad, f"true {100 * c['true_ctr']:.1f}% log {100 * logged:.1f}%", (3, tile - 4),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(ad)
        while len(tiles) < ncol:
            tiles.append(np.full((tile, tile, 3), 255, np.uint8))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _fingerprint(cfg: MarketConfig, seed: int) -> str:
    click_model = [PRODUCT_CONTRAST, CTR_GAIN, TYPICAL_DISTANCE, list(CTR_RANGE), CLICK_MODEL_RES, _RING]
    blob = json.dumps({"config": dataclasses.asdict(cfg), "seed": seed, "version": MARKET_VERSION,
                       "click_model": click_model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MARKET_VERSION = 3  # bump when the simulation changes, so old worlds are not silently reused


def make_market(out_dir: str, config: Any = None, *, seed: int = 0, overwrite: bool = False, verbose: bool = True,
                **overrides: Any) -> dict[str, Any]:
    """Simulates the marketplace into `out_dir` and returns its report (also written as `report.json`).

    `config`: a `MarketConfig`, a mapping of its fields (e.g. `config.market` of configs/market.py), or
    None; keyword `overrides` win. Layout written under `out_dir`:

        products/images/<item>.png                RGBA cut-outs
        products/products.json                    CAIG tiny.json layout + category, attributes, split
        logs/images/<item>_<k>.png                composed ads (the CreativeRanking images folder)
        logs/list/{train,val,test}_data_list.txt  item_id, image_name, date, impressions, clicks (tab-separated)
        logs/truth.tsv                            image_name, true_ctr, item_id, prompt, on_brief (simulation only)
        conversations/<family>_<split>.json       LLaVA JSON: describe_product, describe_background,
                                                  background_prompt (image paths relative to out_dir)
        oracle.json, report.json, contact_sheet.png, market_config.json, COMPLETE
        world_report.json, world_report.md        the world's figures (`caig_jax.data.world.world_report`)

    Re-running with the same config and seed reuses a complete world; an interrupted run resumes (every
    file is written atomically and every item has its own random stream, so the result is identical).
    A world made with another config raises unless `overwrite=True`.
    """
    from caig_jax.data.ctr_logs import DataError

    cfg = MarketConfig.make(config, **overrides)
    fp = _fingerprint(cfg, seed)
    done = os.path.join(out_dir, "COMPLETE")
    config_path = os.path.join(out_dir, "market_config.json")
    previous = None  # the fingerprint of what is already in out_dir (finished or not)
    if os.path.exists(done):
        with open(done) as f:
            previous = f.read().strip()
        if previous == fp:
            with open(os.path.join(out_dir, "report.json")) as f:
                return json.load(f)
    elif os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f).get("fingerprint")
    if previous is not None and previous != fp:
        if not overwrite:
            raise DataError(f"{out_dir} holds a market made with another config or seed (fingerprint {previous}, "
                            f"now {fp}); use another directory or overwrite=True")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(config_path, _json_bytes({"config": dataclasses.asdict(cfg), "seed": seed, "fingerprint": fp}))

    items = _simulate_items(out_dir, cfg, seed)
    split_of_index = _assign_splits(cfg, seed)
    splits = {item["id"]: split_of_index[item["index"]] for item in items}

    products = [{"id": it["id"], "image": f"images/{it['id']}.png", "new_caption": it["title"],
                 "category": it["category"], "attributes": it["attributes"], "split": splits[it["id"]]} for it in items]
    _write_atomic(os.path.join(out_dir, "products", "products.json"), _json_bytes(products))

    for split, _ in cfg.split_fractions:
        lines = [f"{it['id']}\t{c['name']}\t{r[0]}\t{r[1]}\t{r[2]}" for it in items if splits[it["id"]] == split
                 for c in it["creatives"] for r in c["rows"]]
        _write_atomic(os.path.join(out_dir, "logs", "list", f"{split}_data_list.txt"), ("\n".join(lines) + "\n").encode())
    truth = ["image_name\ttrue_ctr\titem_id\tprompt\ton_brief"] + [
        f"{c['name']}\t{c['true_ctr']:.6f}\t{it['id']}\t{c['prompt']}\t{int(c['on_brief'])}" for it in items for c in it["creatives"]]
    _write_atomic(os.path.join(out_dir, "logs", "truth.tsv"), ("\n".join(truth) + "\n").encode())

    rng = np.random.default_rng([seed, 5])
    families = {split: _conversations([it for it in items if splits[it["id"]] == split], rng) for split, _ in cfg.split_fractions}
    conversation_files = {}
    for split, fam in families.items():
        for name, entries in fam.items():
            rel = f"conversations/{name}_{split}.json"
            _write_atomic(os.path.join(out_dir, rel), _json_bytes(entries))
            conversation_files.setdefault(split, []).append(rel)

    from caig_jax.data import pairs as pairs_lib
    from caig_jax.data import world as world_lib  # measures this world; imports this module (no cycle at import)

    rule = pairs_lib.PairRule(cfg.min_impressions, cfg.min_ratio, cfg.max_ratio)
    pairs_by_split = world_lib.caig_pairs(items, splits, rule, seed, [s for s, _ in cfg.split_fractions])
    oracle = world_lib.oracle_report(pairs_by_split, rule)
    _write_atomic(os.path.join(out_dir, "oracle.json"), _json_bytes(oracle))
    world = world_lib.world_report(items, splits, rule, seed, pairs_by_split=pairs_by_split, workers=cfg.num_workers)
    _write_atomic(os.path.join(out_dir, "world_report.json"), _json_bytes(world))
    _write_atomic(os.path.join(out_dir, "world_report.md"), world_lib.world_report_markdown(world).encode())
    sheet = _contact_sheet(out_dir, items, cfg)
    _write_atomic(os.path.join(out_dir, "contact_sheet.png"), _png(sheet))

    all_ctr = np.array([c["true_ctr"] for it in items for c in it["creatives"]])
    impressions = np.array([sum(r[1] for r in c["rows"]) for it in items for c in it["creatives"]])
    report = {
        "seed": seed,
        "fingerprint": fp,
        "products": len(items),
        "products_per_split": {s: sum(v == s for v in splits.values()) for s, _ in cfg.split_fractions},
        "creatives": int(all_ctr.size),
        "true_ctr_percentiles": dict(zip(("p5", "p25", "p50", "p75", "p95"),
                                         np.percentile(all_ctr, [5, 25, 50, 75, 95]).round(5).tolist())),
        "impressions_median": float(np.median(impressions)),
        "creatives_over_min_impressions": float(np.mean(impressions > cfg.min_impressions)),
        "conversations": {s: {n: len(v) for n, v in fam.items()} for s, fam in families.items()},
        "conversation_files": conversation_files,
        "oracle": oracle,
        "world": {k: world[k] for k in ("test_pairs", "oracle_accuracy", "near_tie_share", "true_ratio_pairs",
                                        "flat_stretch_share", "targets")}
                 | {"exact_feature_ceiling": world["exact_feature_ceiling"],
                    "prompt_ceiling": world["prompt_ceiling"]["mean_true_ctr"],
                    "sibling_separability": {k: v for k, v in world["sibling_separability"].items() if k != "per_product"}},
        "paths": {"products": "products/products.json", "logs": "logs", "truth": "logs/truth.tsv",
                  "contact_sheet": "contact_sheet.png", "oracle": "oracle.json", "world_report": "world_report.json",
                  "world_report_md": "world_report.md"},
    }
    _write_atomic(os.path.join(out_dir, "report.json"), _json_bytes(report))
    _write_atomic(done, fp.encode())
    if verbose:
        per = ", ".join(f"{s} {v['oracle_accuracy']:.3f} ({v['pairs']} pairs)" for s, v in oracle["splits"].items())
        print(f"market: {len(items)} products, {all_ctr.size} creatives in {out_dir}; oracle accuracy {per}")
        print("world: " + ", ".join(f"{k} {v['value']:.3f} ({v['target']})" for k, v in world["targets"].items()))
    return report
