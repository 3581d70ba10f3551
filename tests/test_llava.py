"""LLaVA-NeXT / LLaVA-1.5 against transformers (float32, tolerance `_llava_fixtures.TOL`), checkpoint layouts,
errors, mesh and jit behaviour, and the golden PartitionSpecs of the 7B config.

Regenerate the golden file after an intended sharding change with:
    CAIG_UPDATE_GOLDEN=1 python -m pytest tests/test_llava.py -k golden
and review the diff of tests/golden/llava_7b_partition_specs.json.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from caig_jax import parallel
from caig_jax.convert.common import CheckpointMismatchError
from caig_jax.models import llava
from caig_jax.models.clip import CLIP_VIT_L_14_336
from caig_jax.models.llava import read_llava_config
from tests._llava_fixtures import (
    IMAGE_TOKEN,
    NEXT_SIZES,
    PINPOINTS,
    TEXT,
    TOL,
    VISION,
    llava_next_torch,
    llava_torch,
    next_pixel_values,
    prompt_batch,
    rel_err,
    torch_logits,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "llava_7b_partition_specs.json")


@pytest.fixture(scope="module")
def next_case(tmp_path_factory):
    """(torch model, 5.x save_pretrained folder, our model, inputs dict, reference logits)."""
    ref_model = llava_next_torch()
    folder = tmp_path_factory.mktemp("llava_next")
    ref_model.save_pretrained(folder)
    ours = llava.from_pretrained(str(folder))
    counts = [ours.config.num_image_features(s) for s in NEXT_SIZES]
    assert counts[0] != counts[1]  # rows with different image-token counts
    ids, mask = prompt_batch(counts, extra_lengths=[3, 1])
    inputs = dict(
        input_ids=ids, pixel_values=next_pixel_values(2, ours.config.max_patches), image_sizes=NEXT_SIZES,
        attention_mask=mask,
    )
    ref = torch_logits(ref_model, ids, mask, inputs["pixel_values"], NEXT_SIZES)
    return ref_model, str(folder), ours, inputs, ref


def _call(model, inputs):
    ids, pixels, sizes, mask = (inputs[k] for k in ("input_ids", "pixel_values", "image_sizes", "attention_mask"))
    return np.asarray(model(ids, pixels, sizes, mask))


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_llava_next_logits_and_hidden_states_match_transformers(next_case, scan):
    ref_model, folder, _, inputs, ref = next_case
    ours = llava.set_scan(llava.from_pretrained(folder), scan)
    mask = inputs["attention_mask"]
    logits = _call(ours, inputs)
    assert logits.shape == (2, mask.shape[1], TEXT["vocab_size"]) and logits.dtype == np.float32
    assert rel_err(logits, ref, mask) < TOL
    with torch.no_grad():
        ref_hidden = ref_model.model(
            input_ids=torch.tensor(inputs["input_ids"]),
            pixel_values=torch.tensor(inputs["pixel_values"]),
            image_sizes=torch.tensor(inputs["image_sizes"]),
            attention_mask=torch.tensor(mask),
        ).last_hidden_state.numpy()
    hidden = ours.hidden_states(**inputs)
    assert hidden.shape == (2, mask.shape[1], TEXT["hidden_size"]) and hidden.dtype == jnp.float32
    assert rel_err(hidden, ref_hidden, mask) < TOL


def test_token_logprobs_and_sequence_logprob(next_case):
    _, _, ours, inputs, ref = next_case
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ref_lp = torch.log_softmax(torch.tensor(ref[:, :-1]), -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0].numpy()
    lp = np.asarray(ours.token_logprobs(**inputs))
    assert lp.shape == ids.shape and (lp[:, 0] == 0).all()
    valid = mask[:, 1:] * mask[:, :-1]
    assert np.abs(lp[:, 1:] - ref_lp)[valid.astype(bool)].max() < 1e-4
    response = np.zeros_like(mask)
    response[:, -2:] = 1  # the last two tokens play the response
    total = np.asarray(llava.sequence_logprob(ours, **inputs, response_mask=response))
    np.testing.assert_allclose(total, ref_lp[:, -2:].sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "strategy,layer,tied",
    [("default", -2, False), ("full", [-3, -1], True)],
    ids=["default_layer-2", "full_layers-3-1_tied"],
)
def test_llava_15_logits_match_transformers(tmp_path, strategy, layer, tied):
    ref_model = llava_torch(vision_feature_select_strategy=strategy, vision_feature_layer=layer, tie_word_embeddings=tied)
    ref_model.save_pretrained(tmp_path)
    ours = llava.from_pretrained(str(tmp_path))
    assert not ours.config.anyres and ours.image_newline is None
    assert (ours.language_model.lm_head is None) == tied
    per_image = 4 + (strategy == "full")
    ids, mask = prompt_batch([per_image, per_image], extra_lengths=[4, 1], seed=1)
    pixels = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
    ref = torch_logits(ref_model, ids, mask, pixels)
    assert rel_err(ours(ids, pixels, None, mask), ref, mask) < TOL


def test_llava_15_two_images_in_one_prompt_follow_masked_scatter_order(tmp_path):
    ref_model = llava_torch()
    ref_model.save_pretrained(tmp_path)
    ours = llava.from_pretrained(str(tmp_path))
    ids, mask = prompt_batch([8], extra_lengths=[3], seed=2)  # one row, two images' worth of tokens
    pixels = np.random.default_rng(2).standard_normal((2, 3, 28, 28)).astype(np.float32)
    ref = torch_logits(ref_model, ids, mask, pixels)
    assert rel_err(ours(ids, pixels, None, mask), ref, mask) < TOL


def test_anyres_packing_matches_transformers_at_the_7b_geometry():
    """Our gather index against transformers' own `pack_image_features` (336 px tiles, 24x24 grid, the 1.6
    pinpoints) on features that encode (tile, position), for sizes of every aspect ratio."""
    import types

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    from caig_jax.models import adapter

    config = llava.llava_next_vicuna_7b()
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=336, patch_size=14), image_grid_pinpoints=pinpoints
        )
    )
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(16, 2200, (24, 2)), [[336, 336], [100, 2000], [2000, 100], [567, 1133]]])
    tokens, max_patches = 576, config.max_patches
    layout = llava.layout_for(config, sizes)
    index = np.asarray(
        adapter.anyres_gather_index(
            layout, grid_size=24, max_patches=max_patches, max_features=config.max_image_features
        )
    )
    counts = np.asarray(adapter.anyres_num_features(layout, 24))
    table = np.concatenate([np.arange(max_patches * tokens, dtype=np.float32), [-1.0]])
    for i, size in enumerate(sizes):
        n = image_size_to_num_patches(size.tolist(), pinpoints, 336)
        assert layout[i, 0] == n
        feats = [torch.arange(n * tokens, dtype=torch.float32).reshape(n, tokens, 1)]
        packed, lens = LlavaNextModel.pack_image_features(
            fake, feats, torch.tensor(size[None]), "default", image_newline=torch.tensor([-1.0])
        )
        assert int(lens[0]) == counts[i] == config.num_image_features(size)
        np.testing.assert_array_equal(table[index[i, : counts[i]]], packed[0][:, 0].numpy())


# ------------------------------------------------------------------------------------------------ layouts


def _rewrite(src_folder, dst, rename, *, config=None, drop=(), extra=None):
    """Writes `src_folder`'s tensors under new names (rename: key -> key or None to drop) into `dst`."""
    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src_folder, "model.safetensors"))
    out = {}
    for key, value in state.items():
        new = rename(key)
        if new is not None and key not in drop:
            out[new] = value.contiguous()
    out.update(extra or {})
    save_file(out, os.path.join(dst, "model.safetensors"))
    if config is None:
        shutil.copy(os.path.join(src_folder, "config.json"), os.path.join(dst, "config.json"))
    else:
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return str(dst)


def _hub_key(key):  # transformers 5.x save -> llava-hf hub layout: the tower keeps its `vision_model.` level
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key


@pytest.mark.parametrize("layout", ["hub", "in_memory", "sharded"])
def test_transformers_layouts_load_to_the_same_logits(next_case, tmp_path, layout):
    ref_model, folder, _, inputs, ref = next_case
    if layout == "hub":
        path = _rewrite(folder, tmp_path, _hub_key)
        keys = load_file(os.path.join(path, "model.safetensors"))
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
        assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    elif layout == "in_memory":
        save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, str(tmp_path / "model.safetensors"))
        shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
        path = str(tmp_path)
    else:
        ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
        assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
        path = str(tmp_path)
    assert rel_err(_call(llava.from_pretrained(path), inputs), ref, inputs["attention_mask"]) < TOL


def _original_key(key):
    """transformers 5.x save_pretrained key -> the original LLaVA repository's key."""
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model.") :]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + key[len("vision_tower.") :]
    if key.startswith("multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + key.split(".")[-1]
    if key.startswith("multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + key.split(".")[-1]
    if key == "image_newline":
        return "model.image_newline"
    raise AssertionError(f"unmapped key {key}")


def _original_config(tower, *, anyres):
    d = {k: v for k, v in TEXT.items()}
    d.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        mm_vision_tower=tower,
        mm_hidden_size=VISION["hidden_size"],
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="anyres" if anyres else "pad",
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        tie_word_embeddings=False,
    )
    if anyres:
        d["image_grid_pinpoints"] = [[w, h] for h, w in PINPOINTS]  # LLaVA lists (width, height)
    return d


@pytest.mark.parametrize("anyres", [True, False], ids=["next", "v1.5"])
def test_original_llava_layout_loads_to_the_same_logits(next_case, tmp_path, anyres):
    if anyres:
        ref_model, folder, _, inputs, ref = next_case
    else:
        ref_model = llava_torch()
        folder = str(tmp_path / "hf")
        ref_model.save_pretrained(folder)
        ids, mask = prompt_batch([4, 4], extra_lengths=[2, 5], seed=3)
        inputs = dict(
            input_ids=ids, attention_mask=mask, image_sizes=None,
            pixel_values=np.random.default_rng(3).standard_normal((2, 3, 28, 28)).astype(np.float32),
        )
        ref = torch_logits(ref_model, ids, mask, inputs["pixel_values"])
    path = _rewrite(folder, tmp_path / "orig", _original_key, config=_original_config("clip_tower", anyres=anyres))
    # mm_vision_tower names a local folder (relative to the checkpoint) holding the tower's CLIP config.
    os.makedirs(os.path.join(path, "clip_tower"))
    ref_model.config.vision_config.to_json_file(os.path.join(path, "clip_tower", "config.json"))
    ours = llava.from_pretrained(path)
    assert ours.config.image_token_id == llava.LLAVA_IMAGE_TOKEN_INDEX
    assert ours.config.image_grid_pinpoints == (tuple(map(tuple, PINPOINTS)) if anyres else ())
    # LLaVA's own placeholder id -200 marks the image positions.
    ids = np.where(inputs["input_ids"] == IMAGE_TOKEN, llava.LLAVA_IMAGE_TOKEN_INDEX, inputs["input_ids"])
    got = ours(ids, inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    assert rel_err(got, ref, inputs["attention_mask"]) < TOL


def test_original_llava_builtin_tower_name(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(_original_config("openai/clip-vit-large-patch14-336", anyres=True) | {"mm_hidden_size": 1024}, f)
    config, layout = read_llava_config(str(tmp_path))
    assert layout == "original_llava" and config.vision_config == CLIP_VIT_L_14_336 and config.anyres
    with open(tmp_path / "config.json", "w") as f:
        json.dump(_original_config("no/such-tower", anyres=True), f)
    with pytest.raises(ValueError, match="no/such-tower"):
        read_llava_config(str(tmp_path))


def test_checkpoint_mismatches_are_listed(next_case, tmp_path):
    _, folder, _, _, _ = next_case
    state = load_file(os.path.join(folder, "model.safetensors"))
    wrong = state["language_model.model.layers.1.mlp.up_proj.weight"]
    path = _rewrite(
        folder,
        tmp_path,
        lambda k: k,
        drop=("language_model.model.layers.0.self_attn.k_proj.weight",),
        extra={
            "language_model.model.layers.7.self_attn.q_proj.weight": torch.zeros(2, 2),
            "language_model.model.layers.1.mlp.up_proj.weight": torch.zeros(wrong.shape[0] + 1, wrong.shape[1]),
        },
    )
    with pytest.raises(CheckpointMismatchError) as err:
        llava.from_pretrained(path)
    message = str(err.value)
    assert "language_model/layers/0/self_attn/k_proj/kernel" in message
    assert "language_model.model.layers.0.self_attn.k_proj.weight" in message
    assert "language_model.model.layers.7.self_attn.q_proj.weight" in message
    # Shape mismatches are checked once the key sets agree.
    path = _rewrite(
        folder,
        tmp_path / "shape",
        lambda k: k,
        extra={"language_model.model.layers.1.mlp.up_proj.weight": torch.zeros(wrong.shape[0] + 1, wrong.shape[1])},
    )
    # Named in the file's (PyTorch [out, in]) layout: the file's shape and ours transposed into it.
    rows, cols = wrong.shape
    expected = rf"up_proj\.weight -> \S+: file shape \({rows + 1}, {cols}\), model expects \({rows}, {cols}\) in the"
    with pytest.raises(CheckpointMismatchError, match=expected):
        llava.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ mesh / jit


def test_forward_on_fsdp_tensor_mesh_matches(next_case):
    _, folder, ours, inputs, _ = next_case
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = llava.from_pretrained(folder, mesh=mesh)
    kernel = sharded.language_model.layers[0].mlp.gate_proj.kernel.get_value()
    assert kernel.sharding.spec == parallel.P("fsdp", "tensor")
    assert rel_err(_call(sharded, inputs), _call(ours, inputs), inputs["attention_mask"]) < TOL


def test_forward_under_jit_with_traced_image_sizes(next_case):
    _, _, ours, inputs, ref = next_case
    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, ids, pixels, sizes, mask):
        return nnx.merge(graphdef, state)(ids, pixels, sizes, mask)

    got = forward(state, inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    assert rel_err(got, ref, inputs["attention_mask"]) < TOL
    # Pipelines on pods precompute the layout on the host and pass it in.
    layout = llava.layout_for(ours.config, inputs["image_sizes"])

    @jax.jit
    def forward_with_layout(state, ids, pixels, layout, mask):
        return nnx.merge(graphdef, state)(ids, pixels, None, mask, image_layout=layout)

    got = forward_with_layout(state, inputs["input_ids"], inputs["pixel_values"], layout, inputs["attention_mask"])
    assert rel_err(got, ref, inputs["attention_mask"]) < TOL


def test_bad_inputs_fail_with_a_clear_message(next_case):
    _, _, ours, inputs, _ = next_case
    ids = inputs["input_ids"].copy()
    ids[0, np.nonzero(ids[0] == IMAGE_TOKEN)[0][0]] = 5  # one image token short in row 0
    with pytest.raises(ValueError, match=r"row 0: \d+ tokens vs \d+ features"):
        ours(ids, inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="image_sizes"):
        ours(inputs["input_ids"], inputs["pixel_values"], None, inputs["attention_mask"])
    with pytest.raises(ValueError, match="tiles"):
        ours(inputs["input_ids"], inputs["pixel_values"][:, :2], inputs["image_sizes"], inputs["attention_mask"])


# ------------------------------------------------------------------------------------------------ golden


def _spec_json(spec):
    return [list(e) if isinstance(e, tuple) else e for e in spec]


@pytest.mark.slow  # nnx.eval_shape of 7B parameters: ~10 s of tracing here
def test_golden_partition_specs_of_llava_next_7b(devices):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    abstract = nnx.eval_shape(lambda: llava.LlavaModel(llava.llava_next_vicuna_7b(), rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    specs = {k: _spec_json(v) for k, v in sorted(parallel.partition_specs(state, mesh).items())}
    num_params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))
    current = {"mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "num_params": num_params, "specs": specs}
    if os.environ.get("CAIG_UPDATE_GOLDEN") == "1":
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden["num_params"] == num_params
    changed = sorted(k for k in set(golden["specs"]) | set(specs) if golden["specs"].get(k) != specs.get(k))
    assert not changed, f"PartitionSpecs changed for {len(changed)} params, e.g. {changed[:5]}"
    # Spot checks that the table means what the design says.
    assert specs["language_model/layers/0/self_attn/q_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["language_model/layers/0/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["language_model/embed_tokens/embedding"] == ["tensor", "fsdp"]
    assert specs["vision_tower/encoder/layers/0/mlp/fc1/kernel"] == ["fsdp", "tensor"]
