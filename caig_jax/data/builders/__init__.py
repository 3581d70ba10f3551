"""TFDS builders (array_record output, read TF-free with `tfds.data_source` / `as_data_source()` / grain).

- `ctr_logs`: CTR logs (CreativeRanking or CAIG JSON layout) -> CAIG reward pairs.
- `llava_conversations`: LLaVA conversation JSON -> knowledge pre-training examples.
- `products`: CAIG's product list (tiny.json layout) -> RGBA cut-outs with captions.

Each module has `build(data_dir, ...) -> (dataset folder, build report)`. Import the modules themselves
(`from caig_jax.data.builders import ctr_logs`): this package runs no code, so its modules can import each
other's helpers (`_common`) without an import cycle.
"""
