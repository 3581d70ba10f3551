"""TFDS builder `llava_conversations`: LLaVA conversation JSON for knowledge pre-training (SFT).

    from caig_jax.data.builders import llava_conversations
    dataset_dir, report = llava_conversations.build(data_dir, files={"train": ["a.json"]}, image_root=ROOT)

Input: LLaVA's JSON, a list of `{"id", "image"?, "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`; `image` is relative to `image_root`. Checked:
turns alternate human/gpt starting with human, values are strings, an entry with an image has exactly one
`<image>` token (in a human turn) and one without has none. Each example:

    id, source (file), image uint8[H, W, 3] (PNG; RGBA composited over white; 1x1 black when has_image is
    False), has_image, conversations: {"from": [str], "value": [str]} (TFDS Sequence of dicts).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from caig_jax.data import ctr_logs as logs_lib
from caig_jax.data.builders import _common
from caig_jax.data.ctr_logs import BadData, DataError

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(eq=False)
class LlavaConversationsConfig(tfds.core.BuilderConfig):
    files: tuple = ()  # ((split, (path, ...)), ...)
    image_root: str = ""  # default: each JSON file's folder
    on_bad: str = "raise"


def check_conversation(entry: Any, where: str) -> str | None:
    """None if `entry` is a valid LLaVA conversation, else what is wrong."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    if "id" not in entry or "conversations" not in entry:
        return "needs 'id' and 'conversations'"
    turns = entry["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        return "'conversations' must be a list of at least 2 turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} must be {{'from': ..., 'value': str}}"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (turns alternate human/gpt)"
    tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    in_gpt = sum(t["value"].count(IMAGE_TOKEN) for t in turns[1::2])
    if entry.get("image"):
        if tokens != 1 or in_gpt:
            return f"an entry with an image needs exactly one {IMAGE_TOKEN} token in a human turn, found {tokens}"
    elif tokens:
        return f"an entry without 'image' must not contain {IMAGE_TOKEN}"
    return None


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
    """LLaVA conversation JSON -> (image, conversation) examples."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "source": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "has_image": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "conversations": tfds.features.Sequence({"from": tfds.features.Text(), "value": tfds.features.Text()}),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not cfg.files:
            raise DataError("llava_conversations: files=((split, (path, ...)), ...) is empty")
        self._bad = BadData(cfg.on_bad)
        self._counts = {}
        self._inputs = _common.InputFiles()  # the JSON files and images read, fingerprinted as they are read
        return {split: self._generate_examples(split, tuple(paths)) for split, paths in cfg.files}

    def _generate_examples(self, split, paths):
        cfg = self.builder_config
        seen_ids: dict[str, str] = {}
        written = 0
        # Many conversations share an image (LLaVA files are usually grouped by image): decode and encode it
        # once while it is recent. Bounded, so a large dataset does not hold every image in memory.
        encoded: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        for path in paths:
            if not os.path.exists(path):
                raise DataError(f"conversation file {path!r} does not exist")
            self._inputs.add(path)
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
            root = cfg.image_root or os.path.dirname(path)
            for i, entry in enumerate(data):
                where = f"{path}: entry #{i}" + (f" (id {entry.get('id')!r})" if isinstance(entry, dict) else "")
                problem = check_conversation(entry, where)
                if problem:
                    self._bad("malformed_conversation", f"{where}: {problem}")
                    continue
                eid = str(entry["id"])
                if eid in seen_ids:
                    self._bad("duplicate_id", f"{where}: id {eid!r} already used at {seen_ids[eid]}")
                    continue
                has_image = bool(entry.get("image"))
                image_path = os.path.join(root, entry["image"]) if has_image else ""
                if has_image:
                    self._inputs.add(image_path)
                if image_path not in encoded:
                    if has_image and not os.path.isfile(image_path):
                        self._bad("missing_image", f"{where}: image {image_path!r} does not exist")
                        continue
                    try:
                        image = logs_lib.load_rgb(image_path) if has_image else np.zeros((1, 1, 3), np.uint8)
                    except DataError as e:
                        self._bad("unreadable_image", f"{where}: {e}")
                        continue
                    encoded[image_path] = _common.encode_image(image)
                    if len(encoded) > 256:
                        encoded.popitem(last=False)
                encoded.move_to_end(image_path)
                seen_ids[eid] = where
                written += 1
                yield f"{split}/{eid}", {
                    "id": eid,
                    "source": os.path.basename(path),
                    "image": encoded[image_path],
                    "has_image": has_image,
                    "conversations": {
                        "from": [t["from"] for t in entry["conversations"]],
                        "value": [t["value"] for t in entry["conversations"]],
                    },
                }
        self._counts[split] = written
        self.info.metadata["report"] = {"bad_data": self._bad.as_dict(), "examples": dict(self._counts)}
        self.info.metadata["options"] = _common.config_options(cfg)
        self.info.metadata["inputs"] = self._inputs.as_dict()


def build(data_dir: str, *, files: dict[str, Any], image_root: str = "", name: str = "default",
          on_bad: str = "raise", overwrite: bool = False, overwrite_hint: str = "overwrite=True") -> tuple[str, dict]:
    """Builds (or reuses) `llava_conversations/<name>`; `files` maps split -> JSON path or list of paths."""
    norm = tuple(sorted((s, tuple([p] if isinstance(p, str) else p)) for s, p in files.items()))
    config = LlavaConversationsConfig(name=name, files=norm, image_root=image_root, on_bad=on_bad)
    builder = _common.prepare(LlavaConversations, config, data_dir, overwrite=overwrite, overwrite_hint=overwrite_hint)
    path = str(builder.data_path)
    return path, dict(_common.load_builder(path, "llava_conversations").info.metadata.get("report", {}))
