"""Export of our LLaVA-NeXT (LoRA merged) as a transformers folder: transformers loads it and gives the same logits
(`_llava_fixtures.TOL`, float32) and the same greedy tokens; our `from_pretrained` reads it back exactly; the LoRA
merge computes what the adapted model did."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from caig_jax import parallel
from caig_jax.convert import export
from caig_jax.models import llava
from caig_jax.models.clip import CLIPVisionConfig
from caig_jax.models.image_processing import ImageProcessor, ImageProcessorConfig, load_image_processor_config
from caig_jax.models.llama import LlamaConfig
from caig_jax.models.lora import apply_lora, lora_layers, merge_lora
from caig_jax.models.processing import LlavaInputs, build_word_tokenizer
from tests._llava_fixtures import TOL, rel_err

SIDE = 28
TEXTS = ["USER: <image>\nWrite a background prompt for the red mug. ASSISTANT: wooden kitchen counter, warm "
         "lighting</s>",
         "USER: <image>\nDescribe the product. ASSISTANT: A teal water bottle made of steel.</s>"]


def _tiny_config(tokenizer) -> llava.LlavaConfig:
    return llava.LlavaConfig(
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rms_norm_eps=1e-5, rope_theta=30.0, bos_token_id=1, eos_token_id=2),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=SIDE, patch_size=14),
        anyres=True, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=((SIDE, SIDE), (SIDE, 2 * SIDE)), eos_token_ids=(2,), pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(our model with merged random LoRA, its unmerged logits, inputs, export folder, processor config)."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = build_word_tokenizer(TEXTS, str(root / "tok"))
    config = _tiny_config(tokenizer)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = parallel.sharded_init(lambda: llava.LlavaModel(config, rngs=nnx.Rngs(3)), mesh)
    apply_lora(model.language_model, rank=4, alpha=8.0, target=r"layers/\d+/(self_attn|mlp)/", seed=1)
    for i, (_, layer) in enumerate(lora_layers(model)):  # a trained adapter: B is no longer zero
        b = layer.lora_b.get_value()
        layer.lora_b.set_value(jax.device_put(0.05 * jax.random.normal(jax.random.key(i), b.shape), b.sharding))
    processor = ImageProcessorConfig(kind="llava_next", size={"shortest_edge": SIDE},
                                     crop_size={"height": SIDE, "width": SIDE},
                                     image_grid_pinpoints=config.image_grid_pinpoints)
    inputs = LlavaInputs(tokenizer, ImageProcessor(processor), config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)]
    prompts = ["Write a background prompt for the red mug.", "Describe the product."]
    batch = inputs.prompts(images, prompts)
    unmerged = np.asarray(model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                batch["attention_mask"]))
    assert len(merge_lora(model)) == 2 * 7 and not lora_layers(model)
    folder = str(root / "pm")
    export.save_pretrained(model, folder, tokenizer=tokenizer, image_processor=processor)
    return model, unmerged, batch, folder, processor


def test_lora_merge_equals_the_adapted_forward(case):
    model, unmerged, batch, _, _ = case
    merged = np.asarray(model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"]))
    assert rel_err(merged, unmerged) < TOL


def test_transformers_loads_the_export_with_the_same_logits_and_greedy_tokens(case):
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    model, unmerged, batch, folder, _ = case
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    kw = {k: torch.tensor(batch[k]) for k in ("input_ids", "pixel_values", "image_sizes", "attention_mask")}
    with torch.no_grad():
        logits = ref(**kw).logits.numpy()
    mask = batch["attention_mask"].astype(bool)
    assert rel_err(unmerged, logits, mask) < TOL
    new = 8
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=new, do_sample=False, eos_token_id=2,
                           pad_token_id=model.config.pad_token_id)
    theirs = out[:, batch["input_ids"].shape[1]:].numpy()
    theirs = np.pad(theirs, ((0, 0), (0, new - theirs.shape[1])), constant_values=model.config.pad_token_id)
    ours = np.asarray(llava.generate(model, batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                     batch["attention_mask"], max_new_tokens=new))
    np.testing.assert_array_equal(ours, theirs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = AutoTokenizer.from_pretrained(os.path.join(folder, "..", "tok"))
    assert tokenizer.encode(TEXTS[0]) == original.encode(TEXTS[0])


def test_our_loader_reads_the_export_back_exactly(case):
    model, _, batch, folder, processor = case
    config, _ = llava.read_llava_config(folder)
    assert config == model.config
    back = llava.from_pretrained(folder)
    ours, theirs = ({"/".join(map(str, p)): np.asarray(v.get_value())
                     for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))} for m in (model, back))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert load_image_processor_config(folder) == processor
    assert LlavaInputs.from_pretrained(folder).spec.image_grid_pinpoints == config.image_grid_pinpoints


def test_unmerged_model_is_refused_and_bf16_shards_round_trip(case, tmp_path):
    model, _, _, _, _ = case
    nested = llava.LlavaModel(model.config, rngs=nnx.Rngs(0))
    apply_lora(nested.language_model, rank=2, alpha=4.0, target="q_proj")
    with pytest.raises(ValueError, match="merge_lora"):
        export.save_pretrained(nested, str(tmp_path / "refused"))
    folder = str(tmp_path / "bf16")
    export.save_pretrained(model, folder, dtype="bfloat16", max_shard_bytes=20_000)
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    back = llava.from_pretrained(folder)
    q = back.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    expected = np.asarray(model.language_model.layers[0].self_attn.q_proj.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(q), expected.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_lora_dropout_only_in_train_mode():
    from caig_jax.models.lora import lora_train_mode
    from caig_jax.models.mlp import MLP

    model = MLP(8, 16, 4, 2, rngs=nnx.Rngs(0))
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5)
    for i, (_, layer) in enumerate(lora_layers(model)):
        layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.get_value().shape))
    x = jax.random.normal(jax.random.key(9), (3, 8))
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_forward(state, rng):
        copy = nnx.merge(graphdef, state)
        lora_train_mode(copy, rng)
        return copy(x)

    eval_out = np.asarray(model(x))
    np.testing.assert_array_equal(eval_out, np.asarray(model(x)))  # evaluation never drops
    a, b = (np.asarray(train_forward(state, jax.random.key(k))) for k in (1, 2))
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)  # a fresh mask per rng, in the traced copy only
    np.testing.assert_array_equal(np.asarray(train_forward(state, jax.random.key(1))), a)
    np.testing.assert_array_equal(np.asarray(model(x)), eval_out)
    merge_lora(model)
    assert rel_err(np.asarray(model(x)), eval_out) < TOL
