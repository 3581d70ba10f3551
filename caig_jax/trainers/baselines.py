"""The paper's reward-model baselines as the engine trains, predicts and loads them.

    model = build_model(config, mesh, vocab_size)      # VAM or CG4CTR (`config.model.kind`), born sharded
    loss_fn = make_loss_fn(config)                     # list-wise loss on `data.creative_lists.ListBatches`
    out = predict_batch(model, batch, mesh)            # pairs: cls_logits = [score_left, score_right]
    model, config = load_trained(workdir, mesh)        # a training workdir's latest (or given) step
    judge = build_zero_shot(config, workdir, data_dir, mesh)   # the zero-shot MLLM: "left" vs "right" log-probs

`config` is a baselines run's config (`configs/baselines.py`). A pair is judged by scoring its two creatives
one at a time: `cls_logits = [score_left, score_right]` (so `objectives.reward.prefers_left` decides, ties go
left, and the margin is the score difference) and `ctr_pred` their CTR predictions (VAM: point head / 100;
CG4CTR: sigmoid of the score), which is what `caig_jax.eval.pairwise.evaluate` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from caig_jax import parallel
from caig_jax.checkpoint import restore_params
from caig_jax.data.creative_lists import CreativeLists, TextEncoder, split_pair_batches
from caig_jax.data.loader import reward_pair_source
from caig_jax.data.reward_inputs import build_inputs
from caig_jax.models.cg4ctr import CG4CTR, CG4CTRConfig
from caig_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from caig_jax.models.llava import LlavaModel
from caig_jax.models.llava import from_pretrained as llava_from_pretrained
from caig_jax.models.processing import build_word_tokenizer
from caig_jax.models.reward import MODEL_KEYS
from caig_jax.models.vam import VAM, VAMConfig
from caig_jax.objectives.baselines import cg4ctr_loss, vam_loss

TRAINED_KINDS = ("vam", "cg4ctr")
KINDS = TRAINED_KINDS + ("zero_shot",)
TEXT_KEYS = ("title_ids", "title_mask", "caption_ids", "caption_mask")
VAM_POINT_SCALE = 100.0  # VAM's point head predicts 100 x the smoothed CTR


# ================================================================================================
# Models.
# ================================================================================================
def vam_config(config: ml_collections.ConfigDict) -> VAMConfig:
    v = config.model.vam
    return VAMConfig(widths=tuple(v.widths), blocks=tuple(v.blocks), stem_kernel=v.stem_kernel,
                     stem_stride=v.stem_stride, stem_pool=v.stem_pool, norm_groups=v.norm_groups)


def cg4ctr_config(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int) -> CG4CTRConfig:
    c = config.model.cg4ctr
    return CG4CTRConfig(
        vision=CLIPVisionConfig(hidden_size=c.vision_hidden_size, intermediate_size=4 * c.vision_hidden_size,
                                num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
                                image_size=config.data.image_size, patch_size=c.patch_size, hidden_act="gelu"),
        text=CLIPTextConfig(vocab_size=vocab_size, hidden_size=c.text_hidden_size,
                            intermediate_size=4 * c.text_hidden_size, num_hidden_layers=c.text_layers,
                            num_attention_heads=c.text_heads, max_position_embeddings=c.max_text_len,
                            hidden_act="gelu", bos_token_id=1, eos_token_id=2, pad_token_id=pad_id),
        fusion_layers=c.fusion_layers, fusion_heads=c.fusion_heads, head_hidden=c.head_hidden,
    )


def build_model(config: ml_collections.ConfigDict, mesh, tokenizer=None) -> VAM | CG4CTR:
    """A randomly initialised VAM or CG4CTR (`config.model.kind`; CG4CTR needs the run's `tokenizer`), its
    parameters born sharded on `mesh` by their logical axes."""
    dtype, rngs = jnp.dtype(config.model.dtype), lambda: nnx.Rngs(config.seed)
    if config.model.kind == "vam":
        vam = vam_config(config)
        return parallel.sharded_init(lambda: VAM(vam, rngs=rngs(), dtype=dtype), mesh)
    if config.model.kind == "cg4ctr":
        cg = cg4ctr_config(config, len(tokenizer), tokenizer.pad_token_id)
        return parallel.sharded_init(lambda: CG4CTR(cg, rngs=rngs(), dtype=dtype), mesh)
    raise ValueError(f"config.model.kind={config.model.kind!r}: trained baselines are {TRAINED_KINDS}")


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, lists: CreativeLists | None = None):
    """CG4CTR's word tokenizer, kept in `<workdir>/tokenizer`: built from the training lists' texts on the first
    run (never from val or test), loaded afterwards. None for VAM (images only)."""
    if config.model.kind != "cg4ctr":
        return None
    folder = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if lists is None:
        raise FileNotFoundError(f"{folder} holds no tokenizer: {workdir} is not a trained CG4CTR workdir")
    return build_word_tokenizer(list(lists.titles) + list(lists.captions), folder)


def text_encoder(tokenizer, max_len: int) -> TextEncoder:
    """texts -> (ids, mask) int32[N, max_len], right padded, truncated at max_len."""

    def encode(texts):
        out = tokenizer([str(t) for t in texts], padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    return encode


# ================================================================================================
# Loss and prediction.
# ================================================================================================
def _creative_scores(model, images, text, repeat: int = 1):
    """(score float32[N], CTR prediction float32[N]) of single creatives `images uint8[N, S, S, 3]`; `text`: the
    products' TEXT_KEYS int32[N / repeat, T] (CG4CTR), each product's text encoded once for its `repeat`
    consecutive creatives."""
    if isinstance(model, VAM):
        score, point = model(images)
        return score, point / VAM_POINT_SCALE
    context, mask = model.encode_text(*(text[k] for k in TEXT_KEYS))
    score = model.score(images, jnp.repeat(context, repeat, axis=0), jnp.repeat(mask, repeat, axis=0))
    return score, jax.nn.sigmoid(score)


def make_loss_fn(config: ml_collections.ConfigDict):
    """The engine's `loss_fn(model, batch, rng)` on `ListBatches` batches: L lists of K creatives."""
    loss = config.loss

    def loss_fn(model, batch, rng):
        del rng
        lists, k = batch["mask"].shape
        images = batch["image"].reshape(lists * k, *batch["image"].shape[2:])
        counts = (batch["clicks"], batch["impressions"], batch["mask"])
        if isinstance(model, VAM):
            score, point = model(images)
            return vam_loss(score.reshape(lists, k), point.reshape(lists, k), *counts,
                            prior_clicks=loss.prior_clicks, prior_non_clicks=loss.prior_non_clicks,
                            label_temperature=loss.label_temperature, point_weight=loss.point_weight,
                            point_scale=VAM_POINT_SCALE)
        score, _ = _creative_scores(model, images, {key: batch[key] for key in TEXT_KEYS}, k)
        return cg4ctr_loss(score.reshape(lists, k), *counts, list_weight=loss.list_weight,
                           point_weight=loss.point_weight)

    return loss_fn


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    # [left_0, right_0, left_1, right_1, ...]: each pair's two creatives share their product's text encoding
    images = jnp.stack([batch["left_image"], batch["right_image"]], axis=1)
    images = images.reshape(-1, *images.shape[2:])
    score, ctr = _creative_scores(model, images, {k: batch[k] for k in TEXT_KEYS if k in batch}, 2)
    return score.reshape(-1, 2), ctr.reshape(-1, 2)


def predict_batch(model, batch: dict, mesh) -> dict[str, np.ndarray]:
    """`{'cls_logits': [score_left, score_right], 'ctr_pred': CTR predictions}` float32[b, 2] for this
    process's rows of a `data.creative_lists.split_pair_batches` batch (b divisible by its batch shards)."""
    keys = ("left_image", "right_image") + (TEXT_KEYS if isinstance(model, CG4CTR) else ())
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        cls_logits, ctr_pred = _predict(graphdef, state, parallel.global_batch(mesh, {k: batch[k] for k in keys}))
    return {"cls_logits": parallel.local_rows(cls_logits), "ctr_pred": parallel.local_rows(ctr_pred)}


def pair_batches(config: ml_collections.ConfigDict, data_dir: str, split: str, batch_size: int,
                 dataset_config: str | None = None):
    """One ordered pass over a split's pairs as `predict_batch` takes them (`config`: a run's config with
    `workdir` set, as `load_trained` returns it)."""
    tokenizer = tokenizer_for(config, config.workdir)
    encode = None if tokenizer is None else text_encoder(tokenizer, config.model.cg4ctr.max_text_len)
    return split_pair_batches(reward_pair_source(data_dir, split, dataset_config), config.data.image_size,
                              batch_size, encode_text=encode)


def load_trained(workdir: str, mesh, step: int | None = None):
    """(model with the trained parameters of `step` (default: latest), run config with `workdir` set) of a
    VAM / CG4CTR training workdir, on `mesh` (any mesh)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a baseline training workdir (no config.json)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.workdir = workdir
    model = build_model(config, mesh, tokenizer_for(config, workdir))
    model, _ = restore_params(workdir, model, mesh, step=step)
    return model, config


# ================================================================================================
# Zero-shot MLLM.
# ================================================================================================
@dataclasses.dataclass
class ZeroShotJudge:
    """An MLLM asked the reward model's question; `left_id` / `right_id`: the first token of each answer."""

    llava: LlavaModel
    left_id: int
    right_id: int


def answer_token(tokenizer, word: str) -> int:
    """The first token of `word` as the assistant would start its answer (after `ASSISTANT:` and a space)."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    ids = [i for i in ids if i != tokenizer.convert_tokens_to_ids("▁")] or ids
    return int(ids[0])


def build_zero_shot(config: ml_collections.ConfigDict, workdir: str, data_dir: str, mesh) -> ZeroShotJudge:
    """The zero-shot judge: `model.pretrained` (a LLaVA(-NeXT) folder, e.g. an SFT model exported by the sft
    job) or, without one, the tiny LLaVA-NeXT of the reward preset untrained (random weights, seed `seed`),
    with the reward model's inputs (`data.reward_inputs.build_inputs`: the same tokenizer and prompt)."""
    inputs, llava_config = build_inputs(config, workdir, data_dir)
    dtype = jnp.dtype(config.model.dtype)
    if config.model.pretrained:
        llava = llava_from_pretrained(config.model.pretrained, dtype=dtype, mesh=mesh)
    else:
        llava = parallel.sharded_init(lambda: LlavaModel(llava_config, rngs=nnx.Rngs(config.seed), dtype=dtype),
                                      mesh)
    left, right = answer_token(inputs.tokenizer, "left"), answer_token(inputs.tokenizer, "right")
    if left == right:
        raise ValueError(f"the tokenizer starts 'left' and 'right' with the same token {left}: no zero-shot decision")
    return ZeroShotJudge(llava, left, right)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _zero_shot(graphdef, state, batch, left_id, right_id):
    llava = nnx.merge(graphdef, state)
    h = llava.last_hidden_state(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                                image_layout=batch["image_layout"])  # [B, D] at the last prompt token
    logprobs = jax.nn.log_softmax(llava.language_model.logits(h), axis=-1)
    pair = jnp.stack([logprobs[:, left_id], logprobs[:, right_id]], axis=-1)
    return pair, jax.nn.softmax(pair, axis=-1)


def zero_shot_predict_batch(judge: ZeroShotJudge, batch: dict, mesh) -> dict[str, np.ndarray]:
    """`cls_logits` = [log p("left"), log p("right")] of the next token after the RM prompt; `ctr_pred` the two
    renormalised to sum to 1 (no CTR head: it only breaks Copeland ties)."""
    graphdef, state = nnx.split(judge.llava)
    with jax.set_mesh(mesh):
        pair, prob = _zero_shot(graphdef, state, parallel.global_batch(mesh, {k: batch[k] for k in MODEL_KEYS}),
                                judge.left_id, judge.right_id)
    return {"cls_logits": parallel.local_rows(pair), "ctr_pred": parallel.local_rows(prob)}

