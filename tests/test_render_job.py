"""Render job: outputs of a tiny run, and clear errors for bad product images (before any model is loaded)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from caig_jax.data import product as product_lib
from caig_jax.jobs import render as render_job
from caig_jax.main import JOBS, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    config = load_config(os.path.join(REPO, "configs", "render.py") + ":tiny")
    # tests/test_pipeline.py's sampling settings (DDIM, 3 steps, CFG, 4x2x1 mesh, bucket 8): in one pytest run
    # the compiled program is reused. The ancestral sampler is covered there.
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
    config.scheduler = "ddim"
    config.steps = 3
    config.guidance_scale = 3.0
    config.batch_size = 4
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def write_products(folder, images: dict[str, object]) -> str:
    """images: id -> uint8 array (saved as PNG), raw bytes (written as is) or None (file left missing)."""
    entries = []
    for pid, image in images.items():
        name = f"{pid}.png"
        path = os.path.join(folder, name)
        if isinstance(image, bytes):
            with open(path, "wb") as f:
                f.write(image)
        elif image is not None:
            Image.fromarray(image).save(path)
        entries.append({"id": pid, "image": name, "caption": f"caption of {pid}", "prompt": ["wooden desk", "sky"]})
    path = os.path.join(folder, "products.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def good_rgba(size=40):
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[8:32, 10:30] = (200, 60, 40, 255)
    return rgba


@pytest.mark.parametrize(
    "bad,message",
    [
        (None, "does not exist"),
        (np.full((20, 20, 3), 128, np.uint8), "no alpha channel"),
        (np.zeros((20, 20, 4), np.uint8), "empty alpha"),
        (b"this is not a png", "cannot be read as an image"),
        (np.pad(np.full((1, 1, 4), 255, np.uint8), ((9, 10), (9, 10), (0, 0))), "is 1x1 px; at least 8 px"),
    ],
    ids=["missing", "no_alpha", "empty_alpha", "unreadable", "one_pixel"],
)
def test_bad_product_image_names_the_file(tmp_path, bad, message):
    products = write_products(tmp_path, {"good": good_rgba(), "bad_one": bad})
    config = tiny_config(products=products)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        render_job.run(config, str(tmp_path / "work"))
    assert os.path.join(str(tmp_path), "bad_one.png") in str(info.value)
    assert not os.path.exists(tmp_path / "work" / "tiny_sd"), "inputs must be checked before loading a model"


def test_tiny_cutout_through_main_is_one_line(tmp_path):
    """A 1x1 product cut-out stops the job before any model exists (it is never rendered as a flat block)."""
    from .test_errors import _main

    tiny = np.zeros((20, 20, 4), np.uint8)
    tiny[5, 7] = (255, 0, 0, 255)
    products = write_products(tmp_path, {"good": good_rgba(), "dot": tiny})
    workdir = tmp_path / "work"
    code, err = _main("--config=configs/render.py:tiny", f"--workdir={workdir}", f"--config.products={products}")
    assert code == 2, err
    assert err.splitlines()[0] == (
        f"error: product image {os.path.join(str(tmp_path), 'dot.png')!r}: the product (its alpha's bounding box) is "
        "1x1 px; at least 8 px on the short side is needed (placement scales it to 0.78 of the canvas)")
    assert len(err.splitlines()) == 2 and not os.path.exists(workdir / "tiny_sd")


def test_products_list_reads_new_caption_and_relative_images(tmp_path):
    (tmp_path / "cutouts").mkdir()
    Image.fromarray(good_rgba()).save(tmp_path / "cutouts" / "a.png")
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"id": "a", "image": "cutouts/a.png", "new_caption": "CAIG caption", "prompt": "x"}]))
    (product,) = product_lib.read_products(str(path))
    assert product["caption"] == "CAIG caption" and product["image_path"] == str(tmp_path / "cutouts" / "a.png")


def test_tiny_weights_round_trip_through_the_export_path(tmp_path):
    """`write_tiny_sd` (our modules, `host_init`, `convert.diffusers.save_pipeline`) is read back unchanged by our
    loaders: the export path is the loaders' inverse. (tests/test_pipeline.py loads the same folder in diffusers.)"""
    from flax import nnx

    from caig_jax.convert.clip import load_clip_text_model
    from caig_jax.convert.diffusers import load_controlnet, load_unet, load_vae
    from caig_jax.models.controlnet import ControlNetConfig, ControlNetModel
    from caig_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    folder = str(tmp_path / "sd")
    render_job.write_tiny_sd(folder, seed=3)

    def flat(module):
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    unet = render_job.host_init(
        lambda: UNet2DConditionModel(UNet2DConditionConfig.from_dict(render_job.TINY_UNET), rngs=nnx.Rngs(0)), 3)
    controlnet = render_job.host_init(
        lambda: ControlNetModel(ControlNetConfig.from_dict(render_job.TINY_CONTROLNET), rngs=nnx.Rngs(0)), 6)
    for original, loaded in ((unet, load_unet(f"{folder}/unet")), (controlnet, load_controlnet(f"{folder}/controlnet"))):
        want, got = flat(original), flat(loaded)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert load_vae(f"{folder}/vae").config.block_out_channels == (16, 32, 32)
    text = load_clip_text_model(f"{folder}/text_encoder")
    assert text.config.vocab_size == len(render_job.tiny_clip_tokenizer()) and text.config.hidden_size == 32
    assert json.load(open(f"{folder}/model_index.json"))["controlnet"] == ["diffusers", "ControlNetModel"]


def test_malformed_products_file(tmp_path):
    path = tmp_path / "products.json"
    path.write_text(json.dumps([{"id": "a", "image": "a.png"}]))
    with pytest.raises(ValueError, match="entry 0: missing key 'prompt'"):
        product_lib.read_products(str(path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        product_lib.read_products(str(tmp_path / "nope.json"))


def test_render_job_tiny(tmp_path):
    assert JOBS["render"] == "caig_jax.jobs.render"
    workdir = str(tmp_path / "work")
    config = tiny_config(num_products=3, prompts_per_product=2)
    render_job.run(config, workdir)

    report = json.load(open(os.path.join(workdir, "render_report.json")))
    assert report["num_images"] == 6 and report["num_products"] == 3 and report["tiny_random_weights"]
    assert report["bucket_size"] == 8 and report["images_per_second_steady"] > 0
    products = product_lib.read_products(report["products_file"])
    for entry in report["renders"]:
        image = np.asarray(Image.open(os.path.join(workdir, entry["file"])))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        # The product's own pixels are pasted back untouched.
        product = next(p for p in products if p["id"] == entry["id"])
        placed = product_lib.place_product(product["rgba"], size=64)
        opaque = placed[..., 3] == 255
        np.testing.assert_array_equal(image[opaque], placed[..., :3][opaque])
    sheet = np.asarray(Image.open(os.path.join(workdir, report["contact_sheet"])))
    assert sheet.shape[0] >= 3 * 64 and sheet.shape[1] >= 2 * 64
    assert "TINY RANDOM" in open(os.path.join(workdir, "render_report.md")).read()
    assert len(os.listdir(os.path.join(workdir, "renders"))) == 6
