"""CLIP vision and text towers against transformers (float32, tolerance `_llava_fixtures.TOL`)."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from caig_jax import parallel
from caig_jax.convert.clip import load_clip_text_model, load_clip_vision_model
from caig_jax.convert.common import CheckpointMismatchError
from tests._llava_fixtures import TOL, VISION, rel_err

TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=97,
    eos_token_id=99,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    folder = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    torch.manual_seed(1)
    model = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    folder = tmp_path_factory.mktemp("clip_text")
    model.save_pretrained(folder)
    return model, str(folder)


def _pixels(n=3):
    return np.random.default_rng(0).standard_normal((n, 3, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_vision_hidden_states_match_transformers(vision, scan):
    ref_model, folder = vision
    ours = load_clip_vision_model(folder)
    ours.encoder.scan_layers = scan
    pixels = _pixels()
    with torch.no_grad():
        ref = ref_model(torch.tensor(pixels), output_hidden_states=True)
    out = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours_h, ref_h.numpy()) < TOL
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) < TOL
    # LLaVA's read: the second-to-last layer, computed without running the last layer.
    assert rel_err(nnx.jit(lambda m, x: m.features(x, -2))(ours, pixels), ref.hidden_states[-2].numpy()) < TOL
    both = nnx.jit(lambda m, x: m.features(x, (-3, -1)))(ours, pixels)
    assert rel_err(both, np.concatenate([ref.hidden_states[-3].numpy(), ref.hidden_states[-1].numpy()], -1)) < TOL


def test_vision_on_mesh_and_legacy_layout(vision, tmp_path):
    ref_model, folder = vision
    # The hub / transformers 4.x layout has a `vision_model.` level.
    state = {f"vision_model.{k}": v.contiguous() for k, v in ref_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    ours = load_clip_vision_model(str(tmp_path), mesh=mesh)
    q = ours.encoder.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == parallel.P("fsdp", "tensor")
    pixels = _pixels()
    with torch.no_grad():
        ref = ref_model(torch.tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()
    assert rel_err(nnx.jit(lambda m, x: m.features(x, -2))(ours, pixels), ref) < TOL


def _text_inputs():
    ids = np.array([[97, 5, 6, 7, 99, 0, 0, 0], [97, 8, 9, 10, 11, 12, 13, 99]], np.int64)
    mask = (np.arange(8)[None] < np.array([[5], [8]])).astype(np.int64)
    return ids, mask


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_text_last_hidden_state_matches_transformers(text, with_mask, scan):
    ref_model, folder = text
    ours = load_clip_text_model(folder)
    ours.encoder.scan_layers = scan
    ids, mask = _text_inputs()
    kw = {"attention_mask": torch.tensor(mask)} if with_mask else {}
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), **kw)
    # Eager without a mask, jitted with one: both ways are supported.
    out = nnx.jit(lambda m, i, a: m(i, a))(ours, ids, mask) if with_mask else ours(ids)
    assert out.last_hidden_state.dtype == np.float32
    assert rel_err(out[0], ref.last_hidden_state.numpy()) < TOL
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) < TOL


def test_text_sd_layout_and_missing_key_error(text, tmp_path):
    ref_model, folder = text
    # SD-1.5 text_encoder folders on the hub carry the `text_model.` level (plus a position_ids buffer).
    state = {f"text_model.{k}": v.contiguous() for k, v in ref_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
    ours = load_clip_text_model(str(tmp_path))
    ids, _ = _text_inputs()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_err(nnx.jit(lambda m, i: m(i).last_hidden_state)(ours, ids), ref) < TOL

    del state["text_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_clip_text_model(str(tmp_path))
