"""The MLLM's input side: image-token counting, the Vicuna-v1 conversation template, tokenisation with
image-token expansion and response loss masks, and `LlavaInputs`, which turns images + conversations
into the batch the model takes (laid out as transformers' `LlavaNextProcessor` / `LlavaProcessor` give
it to `LlavaNextForConditionalGeneration` / `LlavaForConditionalGeneration`).

numpy + PIL + a transformers tokenizer (loaded from the checkpoint folder, local files only); no torch.

Counting image tokens (what `<image>` expands to, = the number of image features the model scatters in):
  LLaVA-1.5: (image_size // patch_size)^2, plus 1 when vision_feature_select_strategy == 'full' (CLS kept).
  LLaVA-NeXT anyres: base tile (side^2) + unpadded tiled grid (h * w) + one `image_newline` per grid row (h),
    with side = image_size // patch_size, the grid from `select_best_resolution` over the pinpoints and the
    unpadding of transformers' `unpad_image`.

Tokenisation follows the transformers processor: the rendered text, with one `<image>` per image, is
tokenised as one string (BOS added) and each `<image>` id is then repeated to its feature count; this
gives the same ids as tokenising the text with `<image>` already repeated, because `<image>` is an added
special token that splits the text. When the tokenizer has no `<image>` token (original-LLaVA
checkpoints), the text is split at `<image>` and the chunks are tokenised separately as LLaVA's
`tokenizer_image_token` does (BOS only on the first chunk).

`loss_mask[t] = 1` marks the tokens of assistant responses (the reply text and its `</s>`), i.e. the
tokens whose log-probabilities SFT and DPO sum; the model predicts token t from position t - 1.

Public API (other modules call these):
  num_image_tokens(orig_height, orig_width, config) -> int
  anyres_feature_layout(orig_height, orig_width, config) -> AnyresFeatureLayout
  ImageTokenSpec.from_config(config)  (config: model config object/dict, checkpoint folder, or a spec)
  render_conversation(turns, *, add_generation_prompt, template=LLAVA_V1) -> str
  tokenize_conversation(tokenizer, turns, image_token_counts, max_len=None, *, image_token_index=None,
                        add_generation_prompt=False, padding_side='right', truncation=False, ...)
      -> {'input_ids', 'attention_mask', 'loss_mask'} int32[L]
  build_prompt_inputs(tokenizer, prompts, image_token_counts, *, image_token_index=None, max_len=None,
                      pad_to_multiple_of=None, ...) -> {'input_ids', 'attention_mask'} int32[B, T], left padded
  pad_batch(examples, *, pad_id, padding_side='right', max_len=None, pad_to_multiple_of=None)
  build_word_tokenizer(texts, out_dir, *, vocab_size=None, min_count=1) -> transformers.PreTrainedTokenizerFast
      a deterministic Llama-style tokenizer for tiny presets (random weights, nothing to download)
  LlavaInputs(tokenizer, image_processor, config) / LlavaInputs.from_pretrained(path)
      inputs(images, conversations, ...) -> batch dict; inputs.prompts(images, prompts, ...) -> generation batch
Image preprocessing itself is in `caig_jax.models.image_processing` (`ImageProcessor`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from caig_jax.errors import MissingPathError
from caig_jax.models import adapter
from caig_jax.models.image_processing import (
    LLAVA_NEXT_GRID_PINPOINTS,
    ImageProcessor,
    ImageProcessorConfig,
    load_image_processor_config,
)
from caig_jax.models.llava import LLAVA_IMAGE_TOKEN_INDEX, original_llava_config  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import transformers

IMAGE_TOKEN = "<image>"
STRATEGIES = ("default", "full")


# ----------------------------------------------------------------------------------------------------
# Image-token counting.
# ----------------------------------------------------------------------------------------------------

def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _parse_pinpoints(pins: Any, source: str) -> tuple[tuple[int, int], ...]:
    if isinstance(pins, str):
        try:
            pins = ast.literal_eval(pins)
        except (ValueError, SyntaxError):
            raise ValueError(f"{source}: image_grid_pinpoints {pins!r} is not a list of (height, width) pairs "
                             '(LLaVA-OneVision style "(1x1),...,(6x6)" ranges are not supported)') from None
    try:
        return tuple((int(h), int(w)) for h, w in pins)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: image_grid_pinpoints must be a list of (height, width) pairs, "
                         f"got {pins!r}") from None


@dataclasses.dataclass(frozen=True)
class ImageTokenSpec:
    """What decides how many tokens an image becomes.

    image_size / patch_size: the vision tower's input side and patch side (CLIP ViT-L/14-336: 336 / 14).
    image_grid_pinpoints: (height, width) grid resolutions for LLaVA-NeXT anyres; None for LLaVA-1.5.
    vision_feature_select_strategy: 'default' drops the CLS feature, 'full' keeps it.
    image_token_index: the id written at image positions in `input_ids`.
    """
    image_size: int = 336
    patch_size: int = 14
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    vision_feature_select_strategy: str = "default"
    image_token_index: int = 32000

    def __post_init__(self):
        if self.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.image_grid_pinpoints is not None:
            pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
            bad = [p for p in pins if p[0] % self.image_size or p[1] % self.image_size]
            if bad:
                raise ValueError(f"image_grid_pinpoints {bad} are not multiples of the tile size {self.image_size}; "
                                 "transformers cannot pack their features either")
            object.__setattr__(self, "image_grid_pinpoints", pins)

    @property
    def is_anyres(self) -> bool:
        return self.image_grid_pinpoints is not None

    @property
    def features_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, config: Any) -> "ImageTokenSpec":
        """From an `ImageTokenSpec`, a checkpoint folder, or a model config (dict or object).

        Understood configs: transformers `LlavaConfig` / `LlavaNextConfig` (objects or their `config.json`
        dicts: `model_type`, `vision_config.{image_size,patch_size}`, `image_grid_pinpoints`,
        `vision_feature_select_strategy`, `image_token_index`/`image_token_id`); original-LLaVA `config.json`
        (`mm_vision_tower`, `image_aspect_ratio`, `image_grid_pinpoints`, `mm_patch_merge_type`,
        `mm_vision_select_feature`; its (width, height) pinpoints are swapped to (height, width);
        image_token_index defaults to LLaVA's -200); and any object with the
        transformers attribute names (anyres when `model_type == 'llava_next'`, or when it has no model_type
        and `image_grid_pinpoints` is set).
        """
        if isinstance(config, cls):
            return config
        source = "config"
        if isinstance(config, (str, os.PathLike)):
            source = os.path.join(os.fspath(config), "config.json")
            if not os.path.exists(source):
                raise MissingPathError(f"{source} not found (needed to count image tokens)")
            with open(source) as f:
                config = json.load(f)
        if _get(config, "mm_vision_tower") is not None or _get(config, "mm_projector_type") is not None:
            # The one original-LLaVA parser (the model's): same defaults, same errors as loading the model.
            folder = os.path.dirname(source) if source != "config" else os.getcwd()
            return cls.from_config(original_llava_config(dict(config), folder))
        vision = _get(config, "vision_config")
        image_size = _get(vision, "image_size", _get(config, "image_size", 336))
        patch_size = _get(vision, "patch_size", _get(config, "patch_size", 14))
        model_type = _get(config, "model_type")
        pins = _get(config, "image_grid_pinpoints")
        anyres = _get(config, "anyres")
        if anyres is None:
            anyres = model_type == "llava_next" or (model_type is None and pins is not None)
        if anyres:
            pins = _parse_pinpoints(pins if pins is not None else LLAVA_NEXT_GRID_PINPOINTS, source)
        token = _get(config, "image_token_index", _get(config, "image_token_id", 32000))
        return cls(image_size=int(image_size), patch_size=int(patch_size),
                   image_grid_pinpoints=pins if anyres else None,
                   vision_feature_select_strategy=_get(config, "vision_feature_select_strategy", "default"),
                   image_token_index=int(token))


@dataclasses.dataclass(frozen=True)
class AnyresFeatureLayout:
    """How one anyres image's features are packed (transformers' `pack_image_features`).

    num_tiles: rows of `pixel_values` the image uses (base image first, then grid tiles row-major).
    grid_rows, grid_cols: tile grid; side: features per tile side; the tiled feature map is
    (grid_rows * side, grid_cols * side) and `unpad` = (top, bottom, left, right) is the part kept.
    num_tokens = side^2 (base) + kept_h * kept_w + kept_h (one image_newline per kept row).
    """
    num_tiles: int
    grid_rows: int
    grid_cols: int
    side: int
    unpad: tuple[int, int, int, int]
    num_tokens: int


def anyres_feature_layout(orig_height: int, orig_width: int, config: Any) -> AnyresFeatureLayout:
    """The feature layout of an image of original size (orig_height, orig_width) under an anyres config."""
    spec = ImageTokenSpec.from_config(config)
    if not spec.is_anyres:
        raise ValueError("anyres_feature_layout needs an anyres (LLaVA-NeXT) config with image_grid_pinpoints")
    if spec.vision_feature_select_strategy != "default":
        # transformers' LlavaNext reshapes every tile's features to side x side; a kept CLS makes that fail.
        raise ValueError("LLaVA-NeXT anyres packing needs vision_feature_select_strategy='default' "
                         "(with 'full' the CLS feature cannot be laid out on the tile grid)")
    side = spec.features_per_side
    (num_tiles, rows, cols, top, left, kept_h, kept_w), = adapter.anyres_layout(
        [(int(orig_height), int(orig_width))], spec.image_grid_pinpoints, tile_size=spec.image_size, grid_size=side)
    return AnyresFeatureLayout(
        num_tiles=int(num_tiles), grid_rows=int(rows), grid_cols=int(cols), side=side,
        unpad=(int(top), int(top + kept_h), int(left), int(left + kept_w)),
        num_tokens=side * side + int(kept_h) * (int(kept_w) + 1))


def num_image_tokens(orig_height: int, orig_width: int, config: Any) -> int:
    """How many tokens `<image>` expands to for an image of original size (orig_height, orig_width).

    `config`: anything `ImageTokenSpec.from_config` accepts. Equals what transformers' LlavaProcessor /
    LlavaNextProcessor (configured as the hub checkpoints are: num_additional_image_tokens=1) expand to and
    the number of features LlavaForConditionalGeneration / LlavaNextForConditionalGeneration produce.
    """
    spec = ImageTokenSpec.from_config(config)
    if spec.is_anyres:
        return anyres_feature_layout(orig_height, orig_width, spec).num_tokens
    side = spec.features_per_side
    return side * side + (1 if spec.vision_feature_select_strategy == "full" else 0)


# ----------------------------------------------------------------------------------------------------
# Conversation template.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """LLaVA's `SeparatorStyle.TWO` template: `system + sep`, then `ROLE: message` followed by `sep`
    after user messages and `sep2` after assistant messages; a generation prompt ends with `ASSISTANT:`."""
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


# LLaVA's conv_llava_v1 (also the llava-hf llava-v1.6-vicuna chat template's system prompt).
LLAVA_V1 = ConversationTemplate(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA's conv_vicuna_v1 (the `--version v1` training template): same layout, "user" wording.
VICUNA_V1 = ConversationTemplate(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.")
DEFAULT_TEMPLATE = LLAVA_V1

_USER = {"user", "human"}
_ASSISTANT = {"assistant", "gpt", "model"}


def _normalize_turns(turns: Any) -> tuple[str | None, list[tuple[bool, str]]]:
    """-> (system override or None, [(is_user, text)]). Turns are dicts with role/content (or LLaVA JSON
    from/value) or (role, text) pairs; roles user|human and assistant|gpt; an optional first system turn."""
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    system, out = None, []
    for i, turn in enumerate(turns):
        if isinstance(turn, Mapping):
            role = turn.get("role", turn.get("from"))
            text = turn.get("content", turn.get("value"))
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"turn {i} must be a dict with role/content (or from/value) or a (role, text) pair, "
                             f"got {turn!r}")
        role = str(role).lower()
        text = "" if text is None else str(text)
        if role == "system":
            if i != 0:
                raise ValueError(f"turn {i}: a system turn may only come first")
            system = text
            continue
        if role not in _USER | _ASSISTANT:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected user/human, assistant/gpt or system)")
        is_user = role in _USER
        if is_user != (len(out) % 2 == 0):
            raise ValueError(f"turn {i}: roles must alternate user, assistant, user, ... starting with the user; "
                             f"got {role!r}")
        out.append((is_user, text))
    if not out:
        raise ValueError("a conversation needs at least one user turn")
    return system, out


def _image_first(text: str, image_token: str) -> str:
    # LLaVA's `preprocess_multimodal`: a message's image goes first, followed by a newline.
    if text.count(image_token) != 1:
        return text
    return (image_token + "\n" + text.replace(image_token, "").strip()).strip()


def render_conversation_with_spans(turns: Any, *, add_generation_prompt: bool,
                                   template: ConversationTemplate = DEFAULT_TEMPLATE,
                                   image_token: str = IMAGE_TOKEN,
                                   image_first: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """`render_conversation` plus the character spans [start, end) of each assistant reply and its sep2."""
    system, msgs = _normalize_turns(turns)
    text = (template.system if system is None else system) + template.sep
    spans = []
    for is_user, content in msgs:
        role = template.roles[0] if is_user else template.roles[1]
        if image_first:
            content = _image_first(content, image_token)
        if not content:  # LLaVA renders an empty message as a bare `ROLE:`.
            text += role + ":"
            continue
        text += role + ": "
        start = len(text)
        text += content + (template.sep if is_user else template.sep2)
        if not is_user:
            spans.append((start, len(text)))
    if add_generation_prompt:
        if not msgs[-1][0]:
            raise ValueError("add_generation_prompt=True needs a conversation that ends with a user turn")
        text += template.roles[1] + ":"
    return text, spans


def render_conversation(turns: Any, *, add_generation_prompt: bool,
                        template: ConversationTemplate = DEFAULT_TEMPLATE,
                        image_token: str = IMAGE_TOKEN, image_first: bool = True) -> str:
    """Vicuna-v1 text of a conversation, e.g. (LLAVA_V1 system prompt abbreviated)
    `"A chat ... questions. USER: <image>\\nWhat is it? ASSISTANT: A mug.</s>USER: Colour? ASSISTANT:"`.

    turns: list of {'role': 'user'|'assistant', 'content': str} (or LLaVA JSON {'from': 'human'|'gpt',
      'value': str}, or (role, text) pairs; an optional first 'system' turn replaces the template's
      system prompt), or a single string (one user turn).
    add_generation_prompt: end with `ASSISTANT:` for the model to continue (last turn must be the user's).
    image_first: as LLaVA's training does, a message holding one `<image>` is rewritten to
      `<image>\\n{rest of the message, stripped}`.
    """
    return render_conversation_with_spans(turns, add_generation_prompt=add_generation_prompt,
                                          template=template, image_token=image_token,
                                          image_first=image_first)[0]


# ----------------------------------------------------------------------------------------------------
# Tokenisation.
# ----------------------------------------------------------------------------------------------------

def tokenizer_image_token_id(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> int | None:
    """The tokenizer's id for `image_token` when it is a single known token, else None."""
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    return None


def pad_token_id(tokenizer: Any) -> int:
    """pad, else unk (what LLaVA's Vicuna training sets pad to), else eos, else 0."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def _encode_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool):
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise TypeError(f"{type(tokenizer).__name__} cannot return offsets; a fast (tokenizers-backed) "
                        "tokenizer is needed to build loss masks") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _encode_text(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], image_token: str):
    """-> (ids, in_response flags, image marker flags) for the rendered text with one token per image."""
    image_id = tokenizer_image_token_id(tokenizer, image_token)
    if image_id is not None:
        ids, offsets = _encode_with_offsets(tokenizer, text, True)
        is_image = [i == image_id for i in ids]
    else:
        # No `<image>` token in the vocabulary: tokenise the chunks between images separately, BOS only on
        # the first, and put one marker between chunks (LLaVA's `tokenizer_image_token`).
        ids, offsets, is_image = [], [], []
        bos = tokenizer.bos_token_id
        pos = 0
        chunks = text.split(image_token)
        for c, chunk in enumerate(chunks):
            cids, coffs = _encode_with_offsets(tokenizer, chunk, True)
            if c > 0 and ids and bos is not None and ids[0] == bos and cids and cids[0] == bos:
                cids, coffs = cids[1:], coffs[1:]
            ids += cids
            offsets += [(s + pos, e + pos) if e > s else (s, e) for s, e in coffs]
            is_image += [False] * len(cids)
            pos += len(chunk)
            if c < len(chunks) - 1:
                ids.append(-1)
                offsets.append((pos, pos + len(image_token)))
                is_image.append(True)
                pos += len(image_token)
    in_response = [e > s and any(s < b and e > a for a, b in spans) for s, e in offsets]
    return ids, in_response, is_image


def _as_counts(image_token_counts: Any, num_images: int, where: str) -> list[int]:
    if image_token_counts is None:
        counts = []
    elif isinstance(image_token_counts, (int, np.integer)):
        counts = [int(image_token_counts)] * num_images
    else:
        counts = [int(c) for c in image_token_counts]
    if len(counts) != num_images:
        raise ValueError(f"{where}: the text has {num_images} {IMAGE_TOKEN} token(s) but "
                         f"{len(counts)} image token count(s) were given")
    return counts


def _pad_to(seq: Sequence[int], length: int, value: int, side: str) -> list[int]:
    pad = [value] * (length - len(seq))
    return list(seq) + pad if side == "right" else pad + list(seq)


def _check_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def tokenize_conversation(tokenizer: Any, turns: Any, image_token_counts: Any, max_len: int | None = None, *,
                          image_token_index: int | None = None, add_generation_prompt: bool = False,
                          padding_side: str = "right", truncation: bool = False,
                          template: ConversationTemplate = DEFAULT_TEMPLATE, image_token: str = IMAGE_TOKEN,
                          image_first: bool = True) -> dict[str, np.ndarray]:
    """One conversation -> {'input_ids', 'attention_mask', 'loss_mask'}, each int32[L].

    image_token_counts: tokens per `<image>` in order of appearance (a list), or one int for all of them
      (e.g. from `num_image_tokens`).
    max_len: pad to exactly this length (pad id: `pad_token_id(tokenizer)`, on `padding_side`); None means
      no padding. Longer sequences raise unless `truncation=True`, which keeps the first max_len tokens
      (and still raises when that would cut into an image's tokens).
    image_token_index: id written at image positions (the model config's `image_token_index`); default
      the tokenizer's own `<image>` id, as the transformers processors write.
    loss_mask marks assistant replies and their `</s>`; the BOS, system prompt, roles, user turns and
    image tokens are 0.
    """
    _check_side(padding_side)
    text, spans = render_conversation_with_spans(turns, add_generation_prompt=add_generation_prompt,
                                                 template=template, image_token=image_token,
                                                 image_first=image_first)
    ids, in_response, is_image = _encode_text(tokenizer, text, spans, image_token)
    counts = _as_counts(image_token_counts, sum(is_image), "tokenize_conversation")
    if image_token_index is None:
        image_token_index = tokenizer_image_token_id(tokenizer, image_token)
        if image_token_index is None and counts:
            raise ValueError(f"the tokenizer has no {image_token!r} token; pass image_token_index "
                             "(the model config's image_token_index)")
    out_ids, out_loss, out_img = [], [], []
    images = iter(counts)
    for tok, loss, img in zip(ids, in_response, is_image):
        n = next(images) if img else 1
        out_ids += [image_token_index if img else tok] * n
        out_loss += [0 if img else int(loss)] * n
        out_img += [img] * n
    attention = [1] * len(out_ids)
    if max_len is not None:
        if len(out_ids) > max_len:
            if not truncation:
                raise ValueError(f"conversation is {len(out_ids)} tokens (with {sum(counts)} image tokens), longer "
                                 f"than max_len={max_len}; raise max_len or pass truncation=True")
            if any(out_img[max_len:]):
                raise ValueError(f"truncating to max_len={max_len} would cut image tokens "
                                 f"(conversation is {len(out_ids)} tokens); raise max_len")
            out_ids, out_loss, attention = out_ids[:max_len], out_loss[:max_len], attention[:max_len]
        pad = pad_token_id(tokenizer)
        out_ids = _pad_to(out_ids, max_len, pad, padding_side)
        out_loss = _pad_to(out_loss, max_len, 0, padding_side)
        attention = _pad_to(attention, max_len, 0, padding_side)
    return {"input_ids": np.asarray(out_ids, np.int32), "attention_mask": np.asarray(attention, np.int32),
            "loss_mask": np.asarray(out_loss, np.int32)}


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], *, pad_id: int, padding_side: str = "right",
              max_len: int | None = None, pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Stack unpadded 1-D examples into int32[B, T]: input_ids padded with `pad_id`, other keys with 0.

    T = max_len if given (raises when an example is longer), else the longest example rounded up to
    `pad_to_multiple_of` (fewer distinct shapes -> fewer recompiles).
    """
    _check_side(padding_side)
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    longest = max(len(e["input_ids"]) for e in examples)
    if max_len is not None:
        if longest > max_len:
            raise ValueError(f"an example is {longest} tokens, longer than max_len={max_len}")
        length = max_len
    else:
        length = longest
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = {}
    for key in examples[0]:
        value = pad_id if key == "input_ids" else 0
        out[key] = np.asarray([_pad_to(list(e[key]), length, value, padding_side) for e in examples], np.int32)
    return out


def build_prompt_inputs(tokenizer: Any, prompts: Sequence[Any], image_token_counts: Sequence[Any], *,
                        image_token_index: int | None = None, max_len: int | None = None,
                        pad_to_multiple_of: int | None = None,
                        template: ConversationTemplate = DEFAULT_TEMPLATE,
                        image_token: str = IMAGE_TOKEN, image_first: bool = True) -> dict[str, np.ndarray]:
    """Generation prompts (each a string = one user turn, or a turn list ending with the user) ->
    {'input_ids', 'attention_mask'} int32[B, T], left padded, ending with `ASSISTANT:`.

    image_token_counts: per prompt, a list of counts (one per `<image>`) or one int.
    """
    if len(prompts) != len(image_token_counts):
        raise ValueError(f"{len(prompts)} prompts but {len(image_token_counts)} image_token_counts entries")
    examples = []
    for prompt, counts in zip(prompts, image_token_counts):
        ex = tokenize_conversation(tokenizer, prompt, counts, None, image_token_index=image_token_index,
                                   add_generation_prompt=True, template=template, image_token=image_token,
                                   image_first=image_first)
        examples.append({"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]})
    return pad_batch(examples, pad_id=pad_token_id(tokenizer), padding_side="left", max_len=max_len,
                     pad_to_multiple_of=pad_to_multiple_of)


# ----------------------------------------------------------------------------------------------------
# A word tokenizer for tiny presets (random weights, no pretrained tokenizer to download).
# ----------------------------------------------------------------------------------------------------

WORD_TOKENIZER_HEAD = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama / Vicuna
WORD_TOKENIZER_TAIL = (IMAGE_TOKEN, "<pad>")    # the last two ids, as llava-hf's <image> 32000, <pad> 32001
_BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
# Specials and byte pieces are in the Unigram lattice as literal strings; this score keeps a literal
# "<0x41>" in the text from being read as the byte 'A' (specials never reach the lattice: they are added tokens).
_UNREACHABLE_SCORE = -1e6


def _word_pre_tokenizer(prepend: bool):
    """Llama's `▁` word handling: spaces become `▁` glued to the next word (and one `▁` in front of the text),
    then every character that is not a letter or mark (digits, punctuation, newlines) is its own piece, so
    pieces are whole words, `▁word`, or single characters."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prepend else "never", split=True),
        pre_tokenizers.Split(Regex(r"[^\p{L}\p{M}▁]"), behavior="isolated"),
    ])


def build_word_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int | None = None,
                         min_count: int = 1) -> transformers.PreTrainedTokenizerFast:
    """A deterministic Llama-style tokenizer built from `texts`, saved to `out_dir` and returned (as loaded back
    from there with `AutoTokenizer.from_pretrained(out_dir)`, so callers use exactly what later runs load).

    For the tiny CPU presets, whose models are randomly initialised and cannot download a tokenizer.
    Layout (Llama / llava-hf order): `<unk>`=0, `<s>`=1 (BOS, added in front of every encoding), `</s>`=2 (EOS),
    256 byte pieces `<0x00>`..`<0xFF>`, then the pieces, then `<image>` and `<pad>` as the last two ids (special,
    never split; `tokenizer.image_token == '<image>'` as the transformers LLaVA processors expect).
    Pieces are built, not trained: every character seen in `texts`, every word (`▁word` after a space or at
    the start, `word` after a newline or punctuation; digits and punctuation are single characters, as Llama
    splits them) seen at least `min_count` times, and, if `vocab_size` leaves room, frequent word fragments
    (seen in at least two different words) so unknown words split into fragments rather than characters.
    A `tokenizers` Unigram model (SentencePiece's segmentation) with byte fallback picks the segmentation with
    the fewest pieces (ties: the more frequent pieces): a known word is always one token, an unknown word is
    fragments / characters, an unseen character is its UTF-8 bytes; so every text decodes back to itself
    (except that leading spaces of the whole text are dropped, as in Llama, and a literal `▁` decodes as a space).

    vocab_size: the total size (`len(tokenizer)`, specials and bytes included) not to exceed; when the texts
      give fewer pieces the tokenizer is smaller. None: all characters and words, no fragments.
    min_count: words and fragments seen fewer times are left out (characters are always kept).
    The same texts and arguments give byte-identical files.
    """

    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    reserved = len(WORD_TOKENIZER_HEAD) + len(_BYTE_PIECES) + len(WORD_TOKENIZER_TAIL)
    if vocab_size is not None and vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for pieces: {reserved} ids are taken by the "
                         f"special tokens {WORD_TOKENIZER_HEAD + WORD_TOKENIZER_TAIL} and 256 byte pieces")
    specials = WORD_TOKENIZER_HEAD + WORD_TOKENIZER_TAIL
    first_chunk, later_chunk = _word_pre_tokenizer(True), _word_pre_tokenizer(False)

    # Count pieces as the tokenizer will see them: special tokens split the text first, and only the text's
    # first chunk gets the leading `▁`.
    words: dict[str, int] = {}
    chars: dict[str, int] = {}
    num_texts = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"build_word_tokenizer: texts[{i}] is {type(text).__name__}, expected str")
        num_texts += 1
        chunks = [text]
        for special in specials:
            chunks = [part for chunk in chunks for part in chunk.split(special)]
        for c, chunk in enumerate(chunks):
            for piece, _ in (first_chunk if c == 0 else later_chunk).pre_tokenize_str(chunk):
                for ch in piece:
                    chars[ch] = chars.get(ch, 0) + 1
                if len(piece) > 1:
                    words[piece] = words.get(piece, 0) + 1
    if not chars:
        raise ValueError(f"build_word_tokenizer: the {num_texts} texts hold no characters to build pieces from")

    def ranked(counts: Mapping[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # frequent first; ties in code-point order

    taken = set(specials) | set(_BYTE_PIECES)
    pieces = [(ch, n) for ch, n in ranked(chars) if ch not in taken]
    pieces += [(w, n) for w, n in ranked(words) if n >= min_count and w not in taken]
    if vocab_size is not None:
        room = vocab_size - reserved - len(pieces)
        if room > 0:
            # Fragments (length 2 .. len-1) of every word seen, weighted by the words' counts.
            known = {p for p, _ in pieces} | taken
            frag_count: dict[str, int] = {}
            frag_words: dict[str, int] = {}
            for w, n in words.items():
                for frag in {w[a:b] for a in range(len(w)) for b in range(a + 2, len(w) + 1) if b - a < len(w)}:
                    if frag not in known and frag != "▁" * len(frag):
                        frag_count[frag] = frag_count.get(frag, 0) + n
                        frag_words[frag] = frag_words.get(frag, 0) + 1
            frags = [(f, n) for f, n in frag_count.items() if n >= min_count and frag_words[f] >= 2]
            pieces += sorted(frags, key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))[:room]
        # Too small for all characters and words: the rarest go (characters last: they are the fallback).
        num_chars = sum(1 for p, _ in pieces if len(p) == 1)
        budget = vocab_size - reserved
        if len(pieces) > budget:
            keep_words = max(0, budget - num_chars)
            pieces = pieces[:num_chars][:budget] + pieces[num_chars:num_chars + keep_words]

    # Scores: log-frequency minus a per-piece penalty larger than any log-frequency spread, so the Viterbi
    # segmentation first minimises the number of pieces, then prefers frequent ones.
    total = sum(n for _, n in pieces)
    penalty = math.log(total) + 1.0
    scored = [(p, round(math.log(n / total) - penalty, 6)) for p, n in pieces]
    vocab = ([(s, _UNREACHABLE_SCORE) for s in WORD_TOKENIZER_HEAD] + [(b, _UNREACHABLE_SCORE) for b in _BYTE_PIECES]
             + scored + [(s, _UNREACHABLE_SCORE) for s in WORD_TOKENIZER_TAIL])

    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = first_chunk
    # Llama's decoder: `▁` -> space, byte pieces -> UTF-8, drop the space the leading `▁` stands for.
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    bos = WORD_TOKENIZER_HEAD[1]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, 1)])
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        image_token=IMAGE_TOKEN, padding_side="right", clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


# ----------------------------------------------------------------------------------------------------
# The bundled processor.
# ----------------------------------------------------------------------------------------------------

def default_image_processor_config(config: Any, base: ImageProcessorConfig | None = None) -> ImageProcessorConfig:
    """The image processing a model config implies when the checkpoint has no image-processor config.

    Anyres configs -> 'llava_next' over the config's pinpoints; original-LLaVA `image_aspect_ratio: pad`
    -> 'llava' with pad-to-square (mean colour); otherwise CLIP resize + center crop. Sizes are the vision
    tower's input size; `base` (e.g. the vision tower's own CLIP preprocessor config) supplies the rest.
    """
    spec = ImageTokenSpec.from_config(config)
    base = base if base is not None else ImageProcessorConfig()
    side = spec.image_size
    common = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if spec.is_anyres:
        return dataclasses.replace(base, kind="llava_next", do_pad=True,
                                   image_grid_pinpoints=spec.image_grid_pinpoints, **common)
    if (isinstance(config, (Mapping, str, os.PathLike)) or hasattr(config, "image_aspect_ratio")):
        cfg_dict = config
        if isinstance(config, (str, os.PathLike)):
            with open(os.path.join(os.fspath(config), "config.json")) as f:
                cfg_dict = json.load(f)
        if _get(cfg_dict, "image_aspect_ratio") == "pad":
            return dataclasses.replace(base, kind="llava", do_pad=True, **common)
    return dataclasses.replace(base, kind="clip", do_pad=False, **common)


TOKENIZE_CACHE_SIZE = 1 << 16  # distinct conversations kept tokenised by each LlavaInputs


class LlavaInputs:
    """Tokenizer + image processor + model config -> the batch the model's public API takes.

    `inputs(images, conversations)` -> dict of numpy arrays:
      input_ids int32[B, T] (image tokens expanded, ids = spec.image_token_index), attention_mask int32[B, T],
      loss_mask int32[B, T] (assistant replies), pixel_values float32[B, P, 3, H, W] and image_sizes
      int32[B, 2] for LLaVA-NeXT, or pixel_values float32[B, 3, H, W] for LLaVA-1.5.
    `inputs.prompts(images, prompts)` -> the same for generation, left padded, ending with `ASSISTANT:`.
    """

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor | None, config: Any, *,
                 template: ConversationTemplate = DEFAULT_TEMPLATE, image_token: str = IMAGE_TOKEN,
                 image_first: bool = True):
        self.tokenizer = tokenizer
        self.spec = ImageTokenSpec.from_config(config)
        if image_processor is None:
            image_processor = ImageProcessor(default_image_processor_config(config))
        self.image_processor = image_processor
        self.template = template
        self.image_token = image_token
        self.image_first = image_first
        # Training streams repeat the same conversations (one per product, every epoch, both flips of a pair):
        # tokenising was a third of a reward batch's conversion (30 -> 20 ms with this cache), so each distinct
        # conversation is tokenised once.
        self._tokenize = functools.lru_cache(maxsize=TOKENIZE_CACHE_SIZE)(self._tokenize_uncached)
        ip = image_processor.config
        crop = (ip.crop_size["height"], ip.crop_size["width"])
        if ip.do_center_crop and crop != (self.spec.image_size, self.spec.image_size):
            raise ValueError(f"image processor crop_size {crop} differs from the vision tower input size "
                             f"{self.spec.image_size}")
        if self.spec.is_anyres != (ip.kind == "llava_next"):
            raise ValueError(f'model config is {"anyres" if self.spec.is_anyres else "single-image"} but the image '
                             f"processor kind is {ip.kind!r}")
        if self.spec.is_anyres and tuple(ip.image_grid_pinpoints) != self.spec.image_grid_pinpoints:
            raise ValueError(f"image processor pinpoints {ip.image_grid_pinpoints} differ from the model config "
                             f"pinpoints {self.spec.image_grid_pinpoints}")

    @classmethod
    def from_pretrained(cls, path: str, *, config: Any = None,
                        template: ConversationTemplate = DEFAULT_TEMPLATE) -> "LlavaInputs":
        """From a checkpoint folder: tokenizer (AutoTokenizer, local files only), model config
        (`config.json` unless given), image processor (`preprocessor_config.json` / `processor_config.json`,
        else the vision tower folder's, else implied by the model config)."""
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if config is None:
            config = path
        ip_cfg = load_image_processor_config(path)
        if ip_cfg is None:
            cfg = config
            if isinstance(config, (str, os.PathLike)):
                with open(os.path.join(os.fspath(config), "config.json")) as f:
                    cfg = json.load(f)
            tower = _get(cfg, "mm_vision_tower")
            base = load_image_processor_config(str(tower)) if tower and os.path.isdir(str(tower)) else None
            ip_cfg = default_image_processor_config(cfg, base)
        return cls(tokenizer, ImageProcessor(ip_cfg), config, template=template)

    def count_image_tokens(self, image_sizes: Sequence[Sequence[int]]) -> list[int]:
        """Tokens per image from original (height, width) sizes."""
        return [num_image_tokens(h, w, self.spec) for h, w in image_sizes]

    def _with_images(self, conversation: Any, num_images: int) -> list[dict[str, str]]:
        """Turn list with `<image>\n` put in front of the first user message when the text has none."""
        system, msgs = _normalize_turns(conversation)
        turns = [] if system is None else [{"role": "system", "content": system}]
        turns += [{"role": "user" if is_user else "assistant", "content": text} for is_user, text in msgs]
        if num_images and not any(self.image_token in t["content"] for t in turns):
            first_user = 0 if system is None else 1
            turns[first_user]["content"] = (self.image_token + "\n") * num_images + turns[first_user]["content"]
        return turns

    def __call__(self, images: Sequence[Any] | None, conversations: Sequence[Any], *,
                 add_generation_prompt: bool = False, padding_side: str = "right", max_len: int | None = None,
                 pad_to_multiple_of: int | None = None, truncation: bool = False,
                 pad_patches_to: int | None = None) -> dict[str, np.ndarray]:
        """images: None, or one entry per conversation (a PIL image / uint8 array, or a list of them);
        conversations: turn lists (see `render_conversation`) or strings (one user turn). A conversation
        without `<image>` gets `<image>\\n` in front of its first user message.
        pad_patches_to: fixed tile count for LLaVA-NeXT pixel_values (default: the batch maximum)."""
        conversations = list(conversations)
        if images is not None and len(images) != len(conversations):
            raise ValueError(f"{len(images)} image entries for {len(conversations)} conversations")
        per_example = [[] if images is None or images[i] is None else
                       (list(images[i]) if isinstance(images[i], (list, tuple)) else [images[i]])
                       for i in range(len(conversations))]
        flat = [im for ims in per_example for im in ims]
        batch: dict[str, np.ndarray] = {}
        counts: list[int] = []
        if flat:
            batch.update(self.image_processor(flat, pad_patches_to=pad_patches_to))
            if self.spec.is_anyres:
                counts = self.count_image_tokens(batch["image_sizes"].tolist())
            else:
                tile = tuple(batch["pixel_values"].shape[-2:])
                if tile != (self.spec.image_size, self.spec.image_size):
                    raise ValueError(f"pixel_values tiles are {tile}, the vision tower takes "
                                     f"{self.spec.image_size}x{self.spec.image_size}")
                counts = [num_image_tokens(*tile, self.spec)] * len(flat)
        examples, k = [], 0
        for conv, ims in zip(conversations, per_example):
            turns = tuple((t["role"], t["content"]) for t in self._with_images(conv, len(ims)))
            examples.append(self._tokenize(turns, tuple(counts[k:k + len(ims)]), add_generation_prompt,
                                           max_len if truncation else None))
            k += len(ims)
        batch.update(pad_batch(examples, pad_id=pad_token_id(self.tokenizer), padding_side=padding_side,
                               max_len=max_len, pad_to_multiple_of=pad_to_multiple_of))
        return batch

    def _tokenize_uncached(self, turns: tuple[tuple[str, str], ...], counts: tuple[int, ...],
                           add_generation_prompt: bool, truncate_to: int | None) -> dict[str, np.ndarray]:
        """One conversation ((role, content) pairs) -> unpadded int32[L] arrays (shared by the cache: read only)."""
        ex = tokenize_conversation(self.tokenizer, [{"role": r, "content": c} for r, c in turns], list(counts),
                                   truncate_to, image_token_index=self.spec.image_token_index,
                                   add_generation_prompt=add_generation_prompt, truncation=truncate_to is not None,
                                   template=self.template, image_token=self.image_token, image_first=self.image_first)
        # With truncation the example came back padded to max_len on the right; keep its real tokens.
        out = {key: v[ex["attention_mask"] == 1] for key, v in ex.items()}
        for v in out.values():
            v.flags.writeable = False
        return out

    def prompts(self, images: Sequence[Any] | None, prompts: Sequence[Any], *, max_len: int | None = None,
                pad_to_multiple_of: int | None = None, pad_patches_to: int | None = None) -> dict[str, np.ndarray]:
        """Generation batch: left padded, each prompt ending with `ASSISTANT:`."""
        return self(images, prompts, add_generation_prompt=True, padding_side="left", max_len=max_len,
                    pad_to_multiple_of=pad_to_multiple_of, pad_patches_to=pad_patches_to)
