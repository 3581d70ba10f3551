"""The MLLM input side against transformers 5.23 (PIL backend processors, LlavaProcessor / LlavaNextProcessor).

Pixel values are compared for exact equality: our pipeline runs the same PIL resampling on the same uint8
images and the same float64-rescale / float32-normalise arithmetic, so there is nothing to round.
Images are drawn scenes (gradients, shapes, text), RGBA product cut-outs (raw and composited on white), a
side-by-side reward-model pair, grayscale / palette / numpy inputs, small and large, not only noise.
Tokenizers are tiny Llama-style BPE tokenizers trained here and saved to tmp folders (no network), and the
project's own `build_word_tokenizer` (what the tiny presets use) checked for round trips, specials, determinism
and the Vicuna template / loss masks.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from caig_jax.models import image_processing as ip
from caig_jax.models import processing as pr

# ----------------------------------------------------------------------------------------------------
# Test images.
# ----------------------------------------------------------------------------------------------------


def _gradient(h, w, top, bottom):
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    rows = (1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)
    return Image.fromarray(np.broadcast_to(rows, (h, w, 3)).round().astype(np.uint8))


def scene(h, w, seed):
    """A tabletop-ish scene: sky/wall gradient, a 'table', shapes with soft edges, a caption."""
    rng = np.random.default_rng(seed)
    img = _gradient(h, w, rng.integers(0, 255, 3), rng.integers(0, 255, 3))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(h * 0.65), w, h], fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(5, max(6, w // 3)), y0 + rng.integers(5, max(6, h // 3))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    draw.text((max(1, w // 20), max(1, h // 20)), "SALE -30% wooden desk", fill=(255, 255, 255))
    return img.filter(ImageFilter.GaussianBlur(0.7))


def product_rgba(h, w, seed):
    """A mug-like product cut-out with anti-aliased (partial) alpha, drawn at 4x and downsampled."""
    rng = np.random.default_rng(seed)
    big = Image.new("RGBA", (4 * w, 4 * h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    body = tuple(int(v) for v in rng.integers(40, 230, 3)) + (255,)
    draw.rounded_rectangle([w // 2, h, 3 * w, 15 * h // 4], radius=w // 3, fill=body)
    draw.ellipse([5 * w // 2, 3 * h // 2, 7 * w // 2, 3 * h], outline=body, width=max(4, w // 6))
    draw.rectangle([w, 2 * h, 5 * w // 2, 5 * h // 2], fill=(250, 250, 250, 200))
    draw.text((w + 10, 2 * h + 10), "BRAND", fill=(20, 20, 20, 255))
    return big.resize((w, h), Image.Resampling.LANCZOS)


def on_white(rgba):
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def side_by_side(a, b):
    """The reward model's input: two renders resized to 512x512, left|right (1024x512)."""
    canvas = Image.new("RGB", (1024, 512))
    canvas.paste(a.resize((512, 512), Image.Resampling.BICUBIC), (0, 0))
    canvas.paste(b.resize((512, 512), Image.Resampling.BICUBIC), (512, 0))
    return canvas


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    product = product_rgba(500, 380, 1)
    return {
        "scene_480x640": scene(480, 640, 0),
        "scene_large_1000x1400": scene(1000, 1400, 1),
        "scene_tall_1800x560": scene(1800, 560, 2),
        "scene_wide_300x1100": scene(300, 1100, 3),
        "scene_small_37x53": scene(37, 53, 4),
        "product_rgba_raw": product,
        "product_on_white": on_white(product),
        "rm_pair_512x1024": side_by_side(on_white(product), scene(700, 500, 5)),
        "grayscale_300x301": scene(300, 301, 6).convert("L"),
        "palette_200x260": scene(200, 260, 7).convert("P"),
        "numpy_rgb_333x777": np.asarray(scene(333, 777, 8)),
        "numpy_rgba_120x90": np.asarray(product_rgba(120, 90, 2)),
        "noise_257x129": Image.fromarray(rng.integers(0, 256, (257, 129, 3), dtype=np.uint8)),
    }


def _list(images):
    return list(images.values())


# ----------------------------------------------------------------------------------------------------
# Tiny tokenizers (trained here, saved, loaded back with AutoTokenizer; no network).
# ----------------------------------------------------------------------------------------------------

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is shown in this image? ASSISTANT: A red mug on a wooden desk, warm lighting, bokeh.",
    "Describe the background. Rewrite the prompt. Judge whether the left picture or the right picture",
    "is more attractive based on the product caption. wooden desk surface, marble countertop, soft shadows",
]


def _make_tokenizer(folder, *, with_image_token):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, AutoTokenizer, LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    # Llama layout: <unk> <s> </s>, 256 byte-fallback tokens, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # BOS like Llama checkpoints
    if with_image_token:
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _make_tokenizer(str(tmp_path_factory.mktemp("tok")), with_image_token=True)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """Like original-LLaVA checkpoints: no `<image>` token, no pad token."""
    return _make_tokenizer(str(tmp_path_factory.mktemp("tok_plain")), with_image_token=False)


# ----------------------------------------------------------------------------------------------------
# Image preprocessing parity.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    dict(size={"shortest_edge": 224, "longest_edge": 400}, crop_size={"height": 224, "width": 224}),
    dict(size={"height": 200, "width": 300}, crop_size={"height": 180, "width": 280}, resample=2,
         image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.75]),
])
def test_clip_pixel_values_exact(images, kwargs):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(**kwargs)(_list(images), return_tensors="np")["pixel_values"]
    ours = ip.ImageProcessor(ip.ImageProcessorConfig(kind="clip", **kwargs))(_list(images))["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    for name, r, o in zip(images, ref, ours):
        assert np.array_equal(r, o), f"{name}: max|diff| = {np.abs(r - o).max()}"


def test_llava_pad_to_square_exact(images):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    kwargs = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    ref = LlavaImageProcessorPil(**kwargs)(_list(images), return_tensors="np")["pixel_values"]
    ours = ip.ImageProcessor(ip.ImageProcessorConfig(kind="llava", **kwargs))(_list(images))["pixel_values"]
    assert ours.shape == ref.shape == (len(images), 3, 336, 336)
    for name, r, o in zip(images, ref, ours):
        assert np.array_equal(r, o), f"{name}: max|diff| = {np.abs(r - o).max()}"


@pytest.mark.parametrize("kwargs", [
    dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
         image_grid_pinpoints=[[224, 448], [448, 224], [448, 448], [224, 896], [672, 224]]),
])
def test_llava_next_anyres_exact(images, kwargs):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ref = LlavaNextImageProcessorPil(**kwargs)(_list(images), return_tensors="np")
    ours = ip.ImageProcessor(ip.ImageProcessorConfig(kind="llava_next", **kwargs))(_list(images))
    assert ours["pixel_values"].shape == ref["pixel_values"].shape  # tiles padded to the batch maximum
    assert ours["pixel_values"].dtype == np.float32 and ours["image_sizes"].dtype == np.int32
    np.testing.assert_array_equal(ours["image_sizes"], ref["image_sizes"])
    pins = kwargs.get("image_grid_pinpoints", ip.LLAVA_NEXT_GRID_PINPOINTS)
    tile = kwargs["crop_size"]["height"]
    for i, name in enumerate(images):
        r, o = ref["pixel_values"][i], ours["pixel_values"][i]
        assert np.array_equal(r, o), f"{name}: max|diff| = {np.abs(r - o).max()}"
        used = ip.image_size_to_num_patches(ours["image_sizes"][i], pins, tile)
        assert not o[used:].any(), f"{name}: padding tiles after the first {used} must be zero"
    # Several distinct best resolutions are exercised, not one.
    best = {ip.select_best_resolution(tuple(s), pins) for s in ours["image_sizes"]}
    assert len(best) >= 3, best


def test_anyres_one_by_one_and_fixed_patch_padding(images):
    proc = ip.ImageProcessor(ip.ImageProcessorConfig(kind="llava_next"))
    batch = proc(_list(images)[:4], pad_patches_to=proc.max_num_patches())
    assert batch["pixel_values"].shape[1] == proc.max_num_patches() == 5
    for i, im in enumerate(_list(images)[:4]):
        one = proc([im])["pixel_values"][0]
        assert np.array_equal(batch["pixel_values"][i, :one.shape[0]], one)
    with pytest.raises(ValueError, match="pad_patches_to"):
        proc(_list(images)[:4], pad_patches_to=2)


def test_rgb_conversion_matches_transformers(images):
    from transformers.image_transforms import convert_to_rgb

    for name, im in images.items():
        ref = convert_to_rgb(im, return_numpy=True)
        np.testing.assert_array_equal(ip.to_rgb_uint8(im), ref, err_msg=name)
    with pytest.raises(TypeError, match="uint8"):
        ip.to_rgb_uint8(np.zeros((4, 4, 3), np.float32))


def test_image_processor_config_from_checkpoint_files(images, tokenizer, tmp_path):
    from transformers import LlavaNextProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    sample = [images["scene_480x640"], images["product_rgba_raw"], images["scene_wide_300x1100"]]
    # Flat preprocessor_config.json (what hub checkpoints ship).
    clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224)
    clip.save_pretrained(str(tmp_path / "clip"))
    ours = ip.ImageProcessor.from_pretrained(str(tmp_path / "clip"))
    assert ours.kind == "clip"
    assert np.array_equal(ours(sample)["pixel_values"], clip(sample, return_tensors="np")["pixel_values"])
    # processor_config.json with a nested image_processor (transformers 5.x save_pretrained).
    nxt = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]])
    LlavaNextProcessor(image_processor=nxt, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(str(tmp_path / "next"))
    assert not os.path.exists(tmp_path / "next" / "preprocessor_config.json")
    ours = ip.ImageProcessor.from_pretrained(str(tmp_path / "next"))
    assert ours.kind == "llava_next" and ours.config.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672))
    ref = nxt(sample, return_tensors="np")
    got = ours(sample)
    assert np.array_equal(got["pixel_values"], ref["pixel_values"])
    # No config: CLIP ViT-L/14-336 defaults.
    assert ip.ImageProcessor.from_pretrained(str(tmp_path)).config == ip.ImageProcessorConfig()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ValueError, match="preprocessor_config.json.*SiglipImageProcessor"):
        ip.ImageProcessor.from_pretrained(str(bad))


# ----------------------------------------------------------------------------------------------------
# Image-token counting.
# ----------------------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 3000), (3000, 1), (336, 336), (672, 336), (335, 673), (100, 100), (2000, 2000),
         (10, 700), (1008, 336), (337, 1009), (512, 1024), (480, 640), (1800, 560), (37, 53), (999, 1000),
         # Sizes where the unpadded side is x.9999999...: only round(., 7) gives transformers' count.
         (44, 55), (47, 47), (47, 94), (47, 188), (47, 1128)]


def _size_grid():
    rng = np.random.default_rng(0)
    return SIZES + [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(300)]


def test_num_image_tokens_matches_llava_next_processor(tokenizer):
    from transformers import LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    sizes = _size_grid()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                 crop_size={"height": 336, "width": 336})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    ref = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    hf_config = LlavaNextConfig()
    for config in (hf_config, hf_config.to_dict(), pr.ImageTokenSpec.from_config(hf_config)):
        ours = [pr.num_image_tokens(h, w, config) for h, w in sizes]
        assert ours == ref
    # 336x336 -> grid 1x2 (24x48 features), unpadded back to 24x24, plus 24 newlines.
    assert pr.num_image_tokens(336, 336, hf_config) == 576 + 24 * 24 + 24
    layout = pr.anyres_feature_layout(300, 1000, hf_config)
    assert (layout.grid_rows, layout.grid_cols, layout.num_tiles) == (1, 3, 4)
    with pytest.raises(ValueError, match="'default'"):
        pr.num_image_tokens(100, 100, LlavaNextConfig(vision_feature_select_strategy="full"))


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_num_image_tokens_llava15(tokenizer, images, strategy):
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out = processor(images=[images["scene_480x640"]], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="np")
    config = LlavaConfig(vision_feature_select_strategy=strategy)
    expected = 576 + (strategy == "full")
    assert (out["input_ids"] == image_id).sum() == expected == pr.num_image_tokens(480, 640, config)


def _tiny_vision_text(vocab_size):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)
    return vision, text


def test_counts_and_batches_run_in_transformers_models(tokenizer, images):
    """Our batches go straight into tiny LlavaNext / Llava torch models: transformers checks that the number
    of image tokens equals the number of image features it computes, image by image."""
    import torch
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision, text = _tiny_vision_text(len(tokenizer))
    pins = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    rng = np.random.default_rng(3)
    shapes = [(10, 100), (100, 10), (50, 60), (28, 28), (90, 30), (61, 17), (33, 97), (200, 150)]
    pics = [scene(h, w, int(rng.integers(1000))) for h, w in shapes]
    convs = [[{"role": "user", "content": f"<image>\nWhat is shown {i}?"},
              {"role": "assistant", "content": "A red mug."}] for i in range(len(pics))]
    torch.manual_seed(0)
    next_cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins,
                               image_token_index=image_id)
    model = LlavaNextForConditionalGeneration(next_cfg).eval()
    inputs = pr.LlavaInputs(tokenizer, None, next_cfg)
    assert inputs.image_processor.config.kind == "llava_next"
    batch = inputs(pics, convs)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=torch.from_numpy(batch["pixel_values"]),
                                               image_sizes=torch.from_numpy(batch["image_sizes"]))
        lens = [f.shape[0] for f in feats.pooler_output]
        assert lens == [pr.num_image_tokens(h, w, next_cfg) for h, w in shapes]
        assert len(set(lens)) >= 4  # the shapes really exercise different grids / unpadding
        out = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                    attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                    pixel_values=torch.from_numpy(batch["pixel_values"]),
                    image_sizes=torch.from_numpy(batch["image_sizes"]))
    assert np.isfinite(out.logits.numpy()).all()
    for strategy in ("default", "full"):
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          vision_feature_select_strategy=strategy)
        model = LlavaForConditionalGeneration(cfg).eval()
        batch = pr.LlavaInputs(tokenizer, None, cfg)(pics[:3], convs[:3])
        assert batch["pixel_values"].shape == (3, 3, 28, 28) and "image_sizes" not in batch
        assert (batch["input_ids"] == image_id).sum(axis=1).tolist() == [4 + (strategy == "full")] * 3
        with torch.no_grad():
            model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                  attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                  pixel_values=torch.from_numpy(batch["pixel_values"]))


# ----------------------------------------------------------------------------------------------------
# Conversation template and tokenisation.
# ----------------------------------------------------------------------------------------------------

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_render_conversation_vicuna_v1():
    turns = [{"role": "user", "content": "What is shown?\n<image>"},
             {"role": "assistant", "content": "A red mug."},
             {"role": "user", "content": "Background?"}]
    assert pr.render_conversation(turns, add_generation_prompt=True) == (
        SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A red mug.</s>USER: Background? ASSISTANT:")
    llava_json = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red mug."}]
    assert pr.render_conversation(llava_json, add_generation_prompt=False) == (
        SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A red mug.</s>")
    assert pr.render_conversation("Hi", add_generation_prompt=True, template=pr.VICUNA_V1) == (
        pr.VICUNA_V1.system + " USER: Hi ASSISTANT:")
    assert pr.render_conversation([("system", "Be brief."), ("user", "Hi")], add_generation_prompt=True) == (
        "Be brief. USER: Hi ASSISTANT:")
    with pytest.raises(ValueError, match="alternate"):
        pr.render_conversation([("user", "a"), ("user", "b")], add_generation_prompt=False)
    with pytest.raises(ValueError, match="ends with a user turn"):
        pr.render_conversation(llava_json, add_generation_prompt=True)


def _runs(mask):
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_tokenize_conversation_masks_and_padding(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    turns = [{"role": "user", "content": "<image>\nWhat is shown in this image?"},
             {"role": "assistant", "content": "A red mug on a wooden desk."},
             {"role": "user", "content": "Describe the background."},
             {"role": "assistant", "content": "warm lighting, bokeh"}]
    ex = pr.tokenize_conversation(tokenizer, turns, [7], None)
    ids, loss = ex["input_ids"], ex["loss_mask"]
    assert ids.dtype == np.int32 and ex["attention_mask"].all()
    assert ids[0] == tokenizer.bos_token_id
    # Same ids as tokenising the text with <image> repeated 7 times (what the transformers processors do).
    text = pr.render_conversation(turns, add_generation_prompt=False)
    assert ids.tolist() == tokenizer(text.replace("<image>", "<image>" * 7))["input_ids"]
    assert (ids == image_id).sum() == 7 and not loss[ids == image_id].any()
    runs = _runs(loss)
    assert len(runs) == 2
    answers = ["A red mug on a wooden desk.</s>", "warm lighting, bokeh</s>"]
    for (s, e), answer in zip(runs, answers):
        assert tokenizer.decode(ids[s:e]).strip() == answer
        assert tokenizer.decode(ids[:s]).rstrip().endswith("ASSISTANT:")
        assert ids[e - 1] == tokenizer.eos_token_id
    # Padding, both sides.
    pad = tokenizer.pad_token_id
    n = len(ids)
    right = pr.tokenize_conversation(tokenizer, turns, 7, n + 5)
    left = pr.tokenize_conversation(tokenizer, turns, 7, n + 5, padding_side="left")
    assert right["input_ids"][:n].tolist() == ids.tolist() and (right["input_ids"][n:] == pad).all()
    assert left["input_ids"][5:].tolist() == ids.tolist() and (left["input_ids"][:5] == pad).all()
    assert left["attention_mask"].tolist() == [0] * 5 + [1] * n
    assert left["loss_mask"][5:].tolist() == loss.tolist() and not left["loss_mask"][:5].any()
    # Explicit image id (the model config's), truncation rules.
    assert (pr.tokenize_conversation(tokenizer, turns, [3], None, image_token_index=-200)["input_ids"]
            == -200).sum() == 3
    with pytest.raises(ValueError, match="max_len"):
        pr.tokenize_conversation(tokenizer, turns, [7], n - 1)
    cut = pr.tokenize_conversation(tokenizer, turns, [7], n - 3, truncation=True)
    assert cut["input_ids"].tolist() == ids[:n - 3].tolist()
    with pytest.raises(ValueError, match="cut image tokens"):
        pr.tokenize_conversation(tokenizer, turns, [7], 12, truncation=True)
    with pytest.raises(ValueError, match="1 <image> token"):
        pr.tokenize_conversation(tokenizer, turns, [7, 7], None)


def test_tokenizer_without_image_token_splits_like_llava(plain_tokenizer):
    """Original-LLaVA tokenizers have no <image>: chunks are tokenised separately, BOS on the first only."""
    tok = plain_tokenizer
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red mug."}]
    text = pr.render_conversation(turns, add_generation_prompt=False)
    before, after = text.split("<image>")
    ex = pr.tokenize_conversation(tok, turns, [5], None, image_token_index=pr.LLAVA_IMAGE_TOKEN_INDEX)
    expected = tok(before)["input_ids"] + [-200] * 5 + tok(after)["input_ids"][1:]
    assert ex["input_ids"].tolist() == expected
    (s, e), = _runs(ex["loss_mask"])
    assert tok.decode(ex["input_ids"][s:e]).strip() == "A red mug.</s>"
    assert pr.pad_token_id(tok) == tok.unk_token_id  # LLaVA's Vicuna pad = unk
    with pytest.raises(ValueError, match="image_token_index"):
        pr.tokenize_conversation(tok, turns, [5], None)


def _processor_texts(convs, generation):
    return [pr.render_conversation(c, add_generation_prompt=generation) for c in convs]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_llava_next_batch_matches_transformers_processor(tokenizer, images, padding_side):
    from transformers import LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pics = [images["rm_pair_512x1024"], images["product_rgba_raw"], images["scene_tall_1800x560"]]
    convs = [
        [{"role": "user", "content": "<image>\nJudge whether the left picture or the right picture is more "
                                     "attractive based on the product caption."},
         {"role": "assistant", "content": "left"}],
        [{"role": "user", "content": "Describe the background."},  # no <image>: put in front
         {"role": "assistant", "content": "wooden desk surface, warm lighting, bokeh"}],
        [{"role": "user", "content": "<image>\nRewrite the prompt."},
         {"role": "assistant", "content": "marble countertop"},
         {"role": "user", "content": "Shorter."},
         {"role": "assistant", "content": "marble"}],
    ]
    hf_image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                    crop_size={"height": 336, "width": 336})
    processor = LlavaNextProcessor(image_processor=hf_image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaNextConfig(image_token_index=image_id)
    inputs = pr.LlavaInputs(tokenizer, ip.ImageProcessor(ip.ImageProcessorConfig(kind="llava_next")), config)
    for generation in (False, True):
        cs = [c[:1] for c in convs] if generation else convs
        ours = (inputs.prompts(pics, cs) if generation else inputs(pics, cs, padding_side=padding_side))
        side = "left" if generation else padding_side
        texts = [t if "<image>" in t else t.replace("USER: ", "USER: <image>\n", 1)
                 for t in _processor_texts(cs, generation)]
        ref = processor(images=pics, text=texts, return_tensors="np", padding=True, padding_side=side)
        assert ours["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
        np.testing.assert_array_equal(ours["image_sizes"], ref["image_sizes"])
        assert np.array_equal(ours["pixel_values"], ref["pixel_values"])
        counts = (ours["input_ids"] == image_id).sum(axis=1)
        assert counts.tolist() == inputs.count_image_tokens(ours["image_sizes"].tolist())
        if generation:
            assert not ours["loss_mask"].any()
        else:
            assert ours["loss_mask"].sum(axis=1).min() > 0
            assert not (ours["loss_mask"] & (1 - ours["attention_mask"])).any()


def test_llava_inputs_tokenise_each_conversation_once(tokenizer, images):
    """Repeated conversations come from the tokenisation cache, identical to a fresh processor's, whatever the
    padding side or truncation of the later batches."""
    from transformers import LlavaNextConfig

    config = LlavaNextConfig(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))

    def make():
        return pr.LlavaInputs(tokenizer, ip.ImageProcessor(ip.ImageProcessorConfig(kind="llava_next")), config)

    judge = [{"role": "user", "content": "<image>\nJudge whether the left or the right picture is more attractive."}]
    pics = [images["rm_pair_512x1024"], images["rm_pair_512x1024"], images["scene_tall_1800x560"]]
    convs = [judge, judge, [{"role": "user", "content": "Describe the background."}]]
    inputs = make()
    longest = inputs(pics, convs)["input_ids"].shape[1]
    calls = [dict(padding_side="right"), dict(padding_side="left"),
             dict(padding_side="right", max_len=longest - 2, truncation=True)]
    for kwargs in calls:
        ours, fresh = inputs(pics, convs, **kwargs), make()(pics, convs, **kwargs)
        assert ours.keys() == fresh.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], fresh[key], err_msg=f"{key} with {kwargs}")
    info = inputs._tokenize.cache_info()
    # 2 distinct (conversation, image token count) pairs untruncated + 2 truncated; everything else is a hit.
    assert (info.misses, info.hits) == (4, 8), info


def test_llava15_batch_matches_transformers_processor(tokenizer, images):
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pics = [images["scene_480x640"], images["numpy_rgba_120x90"]]
    prompts = ["<image>\nWhat is shown in this image?", "Describe the background.\n<image>"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    inputs = pr.LlavaInputs(tokenizer, None, LlavaConfig(image_token_index=image_id))
    ours = inputs.prompts(pics, prompts, pad_to_multiple_of=16)
    ref = processor(images=pics, text=_processor_texts(prompts, True), return_tensors="np", padding=True,
                    padding_side="left")
    extra = ours["input_ids"].shape[1] - ref["input_ids"].shape[1]
    assert ours["input_ids"].shape[1] % 16 == 0 and 0 <= extra < 16
    np.testing.assert_array_equal(ours["input_ids"][:, extra:], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"][:, extra:], ref["attention_mask"])
    assert not ours["attention_mask"][:, :extra].any()
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])
    # build_prompt_inputs is the text-only half of the same thing.
    text_only = pr.build_prompt_inputs(tokenizer, prompts, [576, 576], pad_to_multiple_of=16)
    np.testing.assert_array_equal(text_only["input_ids"], ours["input_ids"])


def test_llava_inputs_from_pretrained_folder(tokenizer, images, tmp_path):
    from transformers import AutoProcessor, LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    folder = str(tmp_path / "ckpt")
    pins = [[336, 672], [672, 336], [672, 672]]
    LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336},
                                                                  image_grid_pinpoints=pins),
                       tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(folder)
    LlavaNextConfig(image_token_index=image_id, image_grid_pinpoints=pins).save_pretrained(folder)
    inputs = pr.LlavaInputs.from_pretrained(folder)
    assert inputs.spec.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672))
    pics = [images["scene_large_1000x1400"], images["grayscale_300x301"]]
    prompts = ["<image>\nWhat is shown in this image?", "<image>\nDescribe the background."]
    ours = inputs.prompts(pics, prompts)
    ref = AutoProcessor.from_pretrained(folder, local_files_only=True)(
        images=pics, text=_processor_texts(prompts, True), return_tensors="np", padding=True, padding_side="left")
    for key in ("input_ids", "attention_mask", "image_sizes", "pixel_values"):
        assert np.array_equal(ours[key], ref[key]), key


def test_original_llava_config(plain_tokenizer, images, tmp_path):
    original = {"architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}
    spec = pr.ImageTokenSpec.from_config(original)
    # (width, height) pinpoints swapped to (height, width); LLaVA's -200 placeholder id.
    assert spec.image_grid_pinpoints == ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))
    assert (spec.image_size, spec.patch_size, spec.image_token_index) == (336, 14, -200)
    # A 336x336 image ties between the two 2-tile grids: LLaVA takes the first, read as (w, h) = 336x672.
    assert pr.anyres_feature_layout(336, 336, spec).grid_rows == 2
    folder = tmp_path / "orig"
    folder.mkdir()
    plain_tokenizer.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(original))
    inputs = pr.LlavaInputs.from_pretrained(str(folder))
    assert inputs.image_processor.kind == "llava_next"
    batch = inputs([images["scene_480x640"]], [[("user", "What is shown?"), ("assistant", "A mug.")]])
    assert (batch["input_ids"] == -200).sum() == pr.num_image_tokens(480, 640, spec)
    pad_cfg = dict(original, image_aspect_ratio="pad")
    ipc = pr.default_image_processor_config(pad_cfg)
    assert ipc.kind == "llava" and ipc.do_pad and pr.ImageTokenSpec.from_config(pad_cfg).image_grid_pinpoints is None
    with pytest.raises(ValueError, match="mm_vision_tower"):
        pr.ImageTokenSpec.from_config(dict(original, mm_vision_tower="/nowhere/clip"))
    with pytest.raises(ValueError, match="mm_patch_merge_type"):
        pr.ImageTokenSpec.from_config(dict(original, mm_patch_merge_type="flat"))


def test_counts_agree_with_our_model_config(tokenizer, images):
    """The model's own config (caig_jax.models.llava.LlavaConfig) drives the same counts and layout."""
    llava = pytest.importorskip("caig_jax.models.llava")
    config = llava.llava_next_vicuna_7b()
    for h, w in _size_grid()[:120]:
        assert pr.num_image_tokens(h, w, config) == config.num_image_features((h, w)), (h, w)
    inputs = pr.LlavaInputs(tokenizer, None, config)
    assert inputs.spec.image_token_index == config.image_token_id
    assert inputs.image_processor.max_num_patches() == config.max_patches
    batch = inputs.prompts([images["product_on_white"]], ["What is shown?"],
                           pad_patches_to=inputs.image_processor.max_num_patches())
    assert batch["pixel_values"].shape == (1, config.max_patches, 3, 336, 336)
    assert (batch["input_ids"] == config.image_token_id).sum() == config.num_image_features((500, 380))


# ----------------------------------------------------------------------------------------------------
# build_word_tokenizer (tiny presets: random weights, no pretrained tokenizer).
# ----------------------------------------------------------------------------------------------------

TITLES = [
    "Red ceramic coffee mug with handle, 350 ml, dishwasher safe",
    "Wooden desk lamp with warm LED light",
    "Stainless steel water bottle 750ml - keeps drinks cold 24 hours",
    "Blue glass flower vase for living room decor",
    "Black leather wallet for men, slim design",
]
INSTRUCTIONS = [
    "Write a short Stable Diffusion background prompt for this product.",
    "Judge whether the left picture or the right picture is more attractive based on the product caption.",
    "Rewrite the background prompt so it matches the product better.",
    "wooden desk surface, warm lighting, bokeh",
    "marble countertop, soft shadows, morning light",
]
WORD_TEXTS = TITLES + INSTRUCTIONS + [pr.LLAVA_V1.system, pr.VICUNA_V1.system]


@pytest.fixture(scope="module")
def word_tok_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("word_tok"))
    pr.build_word_tokenizer(WORD_TEXTS, folder, vocab_size=600)
    return folder


@pytest.fixture(scope="module")
def word_tok(word_tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(word_tok_dir, local_files_only=True)


def test_word_tokenizer_specials_and_layout(word_tok):
    tok = word_tok
    n = len(tok)
    assert n <= 600
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([3, 3 + 255]) == ["<0x00>", "<0xFF>"]  # Llama's byte-fallback block
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (image_id, tok.pad_token_id) == (n - 2, n - 1)
    assert tok.image_token == "<image>"  # what transformers' LlavaProcessor looks up
    assert pr.tokenizer_image_token_id(tok) == image_id and pr.pad_token_id(tok) == n - 1
    # BOS in front, no EOS; specials are never split, also next to words.
    ids = tok("<image>\nWhat is this?</s>")["input_ids"]
    assert ids[:2] == [1, image_id] and ids[-1] == 2 and ids.count(image_id) == 1
    assert tok("<image><image>", add_special_tokens=False)["input_ids"] == [image_id, image_id]
    assert tok.decode(ids, skip_special_tokens=True) == "\nWhat is this?"


def test_word_tokenizer_round_trip(word_tok):
    tok = word_tok
    known = WORD_TEXTS + ["USER: <image>\nWhat is shown? ASSISTANT: A red mug.</s>"]
    unseen = [
        "Zebra-striped yoga mat, 6 mm thick (non-slip) #1 seller!",   # unseen words and characters
        "Café crème glazed teapot — 1.2 L, 日本製 🎁",                  # accents, CJK, emoji -> bytes
        "two  spaces\tand a tab\nand a new line",
        "mugs lamps bottles",                                          # unseen inflections of known words
    ]
    for text in known + unseen:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids[1:]) == text, (text, tok.convert_ids_to_tokens(ids))
        if "<" not in text:
            assert tok.decode(ids, skip_special_tokens=True) == text
    # Known words are single tokens; unseen words and characters fall back to pieces and bytes, never <unk>.
    assert tok.tokenize("wooden desk lamp, warm light") == ["▁wooden", "▁desk", "▁lamp", ",", "▁warm", "▁light"]
    assert tok.tokenize("350 ml") == ["▁", "3", "5", "0", "▁ml"]  # digits one by one, as Llama splits them
    for text in unseen:
        assert tok.unk_token_id not in tok(text)["input_ids"], text
    assert tok.tokenize("日") == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]
    # With room in vocab_size, unseen words split into fragments of known words, not only characters.
    assert len(tok.tokenize("bottles")) < len("bottles")


def test_word_tokenizer_vocab_size_and_min_count(tmp_path):
    texts = ["red mug", "red lamp", "blue mug", "green vase"]
    from transformers import PreTrainedTokenizerFast

    full = pr.build_word_tokenizer(texts, str(tmp_path / "full"))
    assert isinstance(full, PreTrainedTokenizerFast)
    vocab = full.get_vocab()
    assert {"▁red", "▁mug", "▁lamp", "▁green", "▁vase"} <= set(vocab)
    assert "▁mu" not in vocab  # vocab_size=None: characters and words only, no fragments
    pruned = pr.build_word_tokenizer(texts, str(tmp_path / "pruned"), min_count=2)
    assert {"▁red", "▁mug"} <= set(pruned.get_vocab()) and "▁lamp" not in pruned.get_vocab()
    assert pruned.decode(pruned("green lamp")["input_ids"], skip_special_tokens=True) == "green lamp"
    # A vocabulary budget keeps the most frequent words (characters first: they are the fallback).
    chars = len(set("".join(texts).replace(" ", ""))) + 1  # + "▁"
    small = pr.build_word_tokenizer(texts, str(tmp_path / "small"), vocab_size=3 + 256 + 2 + chars + 2)
    assert len(small) == 3 + 256 + 2 + chars + 2
    assert {"▁red", "▁mug"} <= set(small.get_vocab()) and "▁vase" not in small.get_vocab()
    with pytest.raises(ValueError, match="vocab_size=200 leaves no room"):
        pr.build_word_tokenizer(texts, str(tmp_path / "tiny"), vocab_size=200)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        pr.build_word_tokenizer(["ok", 3], str(tmp_path / "bad"))


def test_word_tokenizer_is_deterministic(word_tok_dir, tmp_path):
    again = str(tmp_path / "again")
    pr.build_word_tokenizer(list(WORD_TEXTS), again, vocab_size=600)
    names = sorted(os.listdir(word_tok_dir))
    assert names == sorted(os.listdir(again)) and "tokenizer.json" in names
    for name in names:
        with open(os.path.join(word_tok_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    other = str(tmp_path / "other")
    pr.build_word_tokenizer(WORD_TEXTS + ["a new word: kettle"], other, vocab_size=600)
    with open(os.path.join(word_tok_dir, "tokenizer.json"), "rb") as a, \
            open(os.path.join(other, "tokenizer.json"), "rb") as b:
        assert a.read() != b.read()


def test_word_tokenizer_with_vicuna_conversation(word_tok):
    tok = word_tok
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = [{"role": "user", "content": "What is shown in this image?\n<image>"},
             {"role": "assistant", "content": "A red ceramic coffee mug with handle."},
             {"role": "user", "content": "Write a short Stable Diffusion background prompt for this product."},
             {"role": "assistant", "content": "wooden desk surface, warm lighting, bokeh"}]
    ex = pr.tokenize_conversation(tok, turns, [9], None, template=pr.VICUNA_V1)
    ids, loss = ex["input_ids"], ex["loss_mask"]
    text = pr.render_conversation(turns, add_generation_prompt=False, template=pr.VICUNA_V1)
    assert text.startswith(pr.VICUNA_V1.system + " USER: <image>\nWhat is shown")
    assert ids.tolist() == tok(text.replace("<image>", "<image>" * 9))["input_ids"]
    assert (ids == image_id).sum() == 9 and ids[0] == tok.bos_token_id
    runs = _runs(loss)
    assert len(runs) == 2
    for (s, e), answer in zip(runs, ["A red ceramic coffee mug with handle.</s>",
                                     "wooden desk surface, warm lighting, bokeh</s>"]):
        assert tok.decode(ids[s:e]) == answer  # offsets put exactly the reply and its </s> in the mask
        assert tok.decode(ids[:s]).endswith("ASSISTANT:")
    prompt = pr.build_prompt_inputs(tok, ["<image>\nWhat is shown?", "Describe the background."], [[4], []],
                                    template=pr.VICUNA_V1)
    assert prompt["input_ids"].shape[0] == 2 and (prompt["input_ids"][1] == tok.pad_token_id).any()
    assert tok.decode(prompt["input_ids"][1], skip_special_tokens=True).endswith("background. ASSISTANT:")


def test_word_tokenizer_llava_inputs_from_pretrained(word_tok_dir, images, tmp_path):
    """A tiny-preset checkpoint folder: our tokenizer + a LLaVA-1.5 config; ours and transformers' processor
    agree on it."""
    import shutil

    from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = str(tmp_path / "tiny_ckpt")
    shutil.copytree(word_tok_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    LlavaConfig(vision_config=CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64),
                image_token_index=image_id).save_pretrained(folder)
    inputs = pr.LlavaInputs.from_pretrained(folder)
    convs = [[("user", "What is shown in this image?"), ("assistant", "A blue glass flower vase.")],
             [("user", "Write a short Stable Diffusion background prompt for this product."),
              ("assistant", "marble countertop, soft shadows")]]
    pics = [images["product_on_white"], images["scene_480x640"]]
    batch = inputs(pics, convs)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert ((batch["input_ids"] == image_id).sum(axis=1) == 16).all()  # (56 / 14)^2
    for row, answer in zip(range(2), ["A blue glass flower vase.</s>", "marble countertop, soft shadows</s>"]):
        (s, e), = _runs(batch["loss_mask"][row])
        assert tokenizer.decode(batch["input_ids"][row, s:e]) == answer
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size=56),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    prompts = ["<image>\nWhat is shown in this image?", "<image>\nDescribe the background."]
    ours = inputs.prompts(pics, prompts)
    ref = processor(images=pics, text=_processor_texts(prompts, True), return_tensors="np", padding=True,
                    padding_side="left")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
