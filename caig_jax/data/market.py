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
places the product with the renderer's code (`caig_jax.data.product`: crop to alpha, fit 0.78 of the
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

`caig_jax.data.simulation.make_market(out_dir, config, seed=...)` writes everything; see its docstring for the layout
on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Sequence

import cv2
import numpy as np

from caig_jax.data import product as product_lib

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
        add = LIGHTING[name]
        light = Lighting(light.brightness + add.brightness, light.temperature + add.temperature,
                         light.contrast * add.contrast, max(light.vignette, add.vignette), light.glow or add.glow)
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


MARKET_VERSION = 3  # bump when the simulation changes, so old worlds are not silently reused
