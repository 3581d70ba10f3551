"""Reward model: heads at the last non-pad token vs a PyTorch reference, head loading from both layouts."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from caig_jax.models import reward
from caig_jax.models.llava import LlavaConfig, last_non_pad_index, layout_for

from .test_llava import _original_config, _original_key
from ._llava_fixtures import IMAGE_TOKEN, NEXT_SIZES, TOL, llava_next_torch, next_pixel_values, rel_err


def _pad(rows, side):
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def torch_rm(tmp_path_factory):
    """A tiny LLaVA-NeXT with CAIG's two heads, saved in the transformers 5.x layout with head keys on top."""
    model = llava_next_torch(seed=3)
    torch.manual_seed(4)
    d = model.config.text_config.hidden_size
    score, ctr = torch.nn.Linear(d, 2, bias=False), torch.nn.Linear(d, 2, bias=False)
    folder = str(tmp_path_factory.mktemp("rm_hf"))
    model.save_pretrained(folder)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights["score.weight"] = score.weight.detach().clone()
    weights["sku_ctr_linear_fc.weight"] = ctr.weight.detach().clone()
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return model, score, ctr, folder


def _reference(model, score, ctr, ids, mask, pixel_values, image_sizes):
    with torch.no_grad():
        out = model.model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixel_values),
            image_sizes=torch.tensor(image_sizes),
        )
        hidden = out.last_hidden_state
        # last non-pad token: the highest position whose mask is 1
        last = (torch.arange(ids.shape[1])[None, :] * torch.tensor(mask)).argmax(dim=1)
        h = hidden[torch.arange(ids.shape[0]), last]
        return score(h).numpy(), ctr(h).numpy()


@pytest.mark.parametrize("side", ["left", "right"])
def test_heads_match_pytorch_reference_at_last_non_pad_token(torch_rm, side):
    model, score, ctr, folder = torch_rm
    ours = reward.from_pretrained(folder)
    config: LlavaConfig = ours.config
    counts = [config.num_image_features(tuple(s)) for s in NEXT_SIZES]
    rng = np.random.default_rng(0)
    rows = [np.concatenate([[1], rng.integers(3, 150, 3), [IMAGE_TOKEN] * n, rng.integers(3, 150, extra)])
            for n, extra in zip(counts, [2, 7])]
    ids, mask = _pad(rows, side)
    pv = next_pixel_values(2, config.max_patches, seed=1)
    ref_cls, ref_ctr = _reference(model, score, ctr, ids, mask, pv, NEXT_SIZES)
    cls_logits, ctr_pred = ours(ids, pv, NEXT_SIZES, mask)
    assert cls_logits.shape == (2, 2) and ctr_pred.shape == (2, 2)
    assert rel_err(cls_logits, ref_cls) < TOL
    assert rel_err(ctr_pred, ref_ctr) < TOL
    # precomputed image layout (what the trainer feeds under jit) gives the same numbers
    cls2, _ = ours(ids, pv, attention_mask=mask, image_layout=layout_for(config, NEXT_SIZES))
    np.testing.assert_allclose(np.asarray(cls2), np.asarray(cls_logits), rtol=1e-6, atol=1e-6)


def test_last_non_pad_index_left_and_right_padding():
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_non_pad_index(right).tolist() == [2, 4]
    assert last_non_pad_index(left).tolist() == [4, 4]


def test_original_llava_layout_with_heads_loads_same_numbers(torch_rm, tmp_path):
    """CAIG's release: original-LLaVA keys + score.weight + sku_ctr_linear_fc.weight."""
    model, score, ctr, folder = torch_rm
    weights = load_file(os.path.join(folder, "model.safetensors"))
    renamed = {k if k in ("score.weight", "sku_ctr_linear_fc.weight") else _original_key(k): v for k, v in weights.items()}
    out = tmp_path / "rm_original"
    os.makedirs(out / "clip_tower")
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.vision_config.to_json_file(str(out / "clip_tower" / "config.json"))
    json.dump(_original_config("clip_tower", anyres=True), open(out / "config.json", "w"))
    a = reward.from_pretrained(folder)
    b = reward.from_pretrained(str(out))
    config = a.config
    counts = [config.num_image_features(tuple(s)) for s in NEXT_SIZES]
    ids, mask = _pad([np.concatenate([[1, 5], [config.image_token_id] * n, [7, 8]]) for n in counts], "right")
    ids_b = np.where(ids == config.image_token_id, b.config.image_token_id, ids)
    pv = next_pixel_values(2, config.max_patches, seed=2)
    for x, y in zip(a(ids, pv, NEXT_SIZES, mask), b(ids_b, pv, NEXT_SIZES, mask)):
        assert rel_err(y, x) < TOL


def test_missing_heads_is_a_clear_error_unless_asked_to_initialise(tmp_path):
    model = llava_next_torch(seed=5)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"score\.weight, sku_ctr_linear_fc\.weight missing"):
        reward.from_pretrained(str(tmp_path))
    rm = reward.from_pretrained(str(tmp_path), init_missing_heads=True)
    assert rm.cls.kernel.get_value().shape == (model.config.text_config.hidden_size, 2)


def test_reward_prompt_mentions_caption_and_attributes():
    text = reward.reward_prompt("Red ceramic mug", {"colour": "red", "material": "ceramic"})
    assert text.startswith("Judge whether the left picture or the right picture is more attractive")
    assert "Product caption: Red ceramic mug" in text and "colour: red; material: ceramic" in text
