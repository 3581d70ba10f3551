"""Tiny reward-model training step on this CPU: caig_jax on 1, 2, 4, 8 CPU XLA devices vs transformers (PyTorch).

Command (from the repository root; about 2 minutes on 2 cores):
    /work/venv/bin/python benchmarks/bench_reward_step.py [--devices 1,2,4,8] [--steps 40] [--json out.json]

What it does: builds a random transformers `LlavaNextForConditionalGeneration` with the shapes of
`configs/reward.py:tiny` (CLIP 2 layers x 64 on 32-px tiles, patch 8; Llama 2 layers x 64, 4 heads, 2 KV heads,
RoPE base 30; a 1000-word vocabulary like the marketplace's) plus CAIG's two bias-free heads, saves it with
`save_pretrained` and loads ours from that folder (`caig_jax.models.reward.from_pretrained`), so both train the
same weights on the same batch: 32 left|right pair images of 32x64 (3 tiles each) and conversations of 157 tokens
(52 of them image tokens) right-padded to 176, the reward job's shapes.

Timed: one full training step, forward, CE + 0.5 * MSE on the heads at the last non-pad token, backward, AdamW
(clipped at global norm 1): median seconds over `--steps` steps after 3 warm-up steps, and examples/s.
  * ours: the reward job's own step and loop (the engine's `Trainer.train`, the jitted donated step,
    metrics fetched every step as in training), fed the fixed batch; the step time is the interval between the
    loop's requests for batches. Each device count runs in its own process (`caig_jax.parallel.set_cpu_devices`
    must run before JAX starts) with the batch sharded over a `data` mesh of that many CPU devices.
  * torch: eager, `torch.set_num_threads(cores)`, `model.model(...)` + the heads, `torch.optim.AdamW`.
`--attention xla,chunked` (default): each device count runs once per attention implementation.
`--xla-flags 'A;B'`: also once per XLA_FLAGS string (`;`-separated, empty = none; e.g.
`--xla-flags ';--xla_cpu_use_xnnpack=true'`), and `--rounds N` repeats the whole set of runs N times interleaved, so
variants compare within one run on a shared machine. "CPU s / step" is the child process's user + system time over
the timed steps divided by their number (what the load average moves least).
Sanity columns: ours' loss after the last step (variants of ours must agree), and the first step's loss on both
sides (same weights and batch, so they agree to float32 rounding).
The machine may be shared: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VOCAB, IMAGE_TOKEN, PAD = 1000, 999, 0
BATCH, MAX_LEN, REAL_LEN, PAIR_SIZE = 32, 176, 157, 32
WARMUP = 3


def tiny_shapes() -> dict:
    from configs import reward as reward_config

    t = reward_config.get_config("tiny").model.tiny
    return dict(vision_config=dict(model_type="clip_vision_model", hidden_size=t.vision_hidden_size,
                                   intermediate_size=2 * t.vision_hidden_size, num_hidden_layers=t.vision_layers,
                                   num_attention_heads=t.vision_heads, image_size=PAIR_SIZE,
                                   patch_size=t.vision_patch_size),
                text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=t.hidden_size,
                                 intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                 num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                                 rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                                 rms_norm_eps=1e-5, max_position_embeddings=1024))


def build(folder: str):
    """Random torch reward model saved to `folder` (transformers layout + head keys); the batch as `batch.npz`."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from caig_jax.models.llava import read_llava_config
    from caig_jax.models.processing import num_image_tokens

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(
        **tiny_shapes(), image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[PAIR_SIZE, 2 * PAIR_SIZE]],
        pad_token_id=PAD))
    # The shapes above restate `caig_jax.models.reward.tiny_llava_config` in transformers' terms: fail loudly if
    # the preset has moved on and this benchmark no longer times the job's model.
    from caig_jax.models.llava import LlavaConfig
    from caig_jax.models.reward import tiny_llava_config
    from configs import reward as reward_config

    job = reward_config.get_config("tiny")
    job_config = tiny_llava_config(job.model.tiny, job.data.image_size, VOCAB, IMAGE_TOKEN, PAD)
    if LlavaConfig.from_hf(model.config) != job_config:
        raise RuntimeError(f"the benchmark's model {LlavaConfig.from_hf(model.config)} is not the reward job's tiny "
                           f"model {job_config}: update tiny_shapes()")
    d = model.config.text_config.hidden_size
    heads = torch.nn.Linear(d, 2, bias=False), torch.nn.Linear(d, 2, bias=False)
    model.save_pretrained(folder)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights["score.weight"] = heads[0].weight.detach().clone()
    weights["sku_ctr_linear_fc.weight"] = heads[1].weight.detach().clone()
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    rng = np.random.default_rng(0)
    n_image = num_image_tokens(PAIR_SIZE, 2 * PAIR_SIZE, read_llava_config(folder)[0])
    ids = np.full((BATCH, MAX_LEN), PAD, np.int64)
    mask = np.zeros((BATCH, MAX_LEN), np.int64)
    for b in range(BATCH):
        n = REAL_LEN - int(rng.integers(0, 3))  # the marketplace's conversations: 155-157 tokens
        text = rng.integers(3, IMAGE_TOKEN, n - n_image - 1)
        ids[b, :n] = np.concatenate([[1], text[:32], [IMAGE_TOKEN] * n_image, text[32:]])
        mask[b, :n] = 1
    batch = dict(input_ids=ids, attention_mask=mask,
                 pixel_values=rng.standard_normal((BATCH, 3, 3, PAIR_SIZE, PAIR_SIZE)).astype(np.float32),
                 image_sizes=np.tile([[PAIR_SIZE, 2 * PAIR_SIZE]], (BATCH, 1)).astype(np.int64),
                 label=rng.integers(0, 2, BATCH).astype(np.int32),
                 ctr=rng.uniform(0.01, 0.1, (BATCH, 2)).astype(np.float32))
    np.savez(os.path.join(folder, "batch.npz"), **batch)
    return model, heads, batch


def time_torch(model, heads, batch, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model.train()
    params = list(model.model.parameters()) + [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    t = {k: torch.tensor(v) for k, v in batch.items()}
    last = (torch.arange(MAX_LEN)[None] * t["attention_mask"]).argmax(dim=1)

    def step():
        hidden = model.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                             pixel_values=t["pixel_values"], image_sizes=t["image_sizes"]).last_hidden_state
        h = hidden[torch.arange(BATCH), last]
        loss = (torch.nn.functional.cross_entropy(heads[0](h), t["label"].long())
                + 0.5 * torch.nn.functional.mse_loss(heads[1](h), t["ctr"]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    first_loss = step()
    for _ in range(WARMUP - 1):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "first_loss": first_loss}


class _FixedBatches:
    """The trainer's data iterator protocol, always the same batch; records when each batch is asked for (wall
    and this process's CPU seconds)."""

    def __init__(self, batch):
        self.batch, self.times, self.cpu = batch, [], []

    def __next__(self):
        self.times.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.append(usage.ru_utime + usage.ru_stime)
        return self.batch

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def time_ours(folder: str, devices: int, steps: int, attention: str) -> dict:
    """Runs in a child process: `devices` CPU devices, the reward trainer on the fixed batch."""
    import logging

    from caig_jax import parallel

    parallel.set_cpu_devices(devices)
    import jax

    from caig_jax.models import attention as attention_lib
    from caig_jax.models import reward as reward_model
    from caig_jax.models.llava import layout_for
    from caig_jax.trainers import reward as reward_job
    from caig_jax.trainers.trainer import Trainer
    from configs import reward as reward_config

    logging.getLogger().setLevel(logging.WARNING)
    config = reward_config.get_config("tiny")
    config.unlock()
    config.train.steps = WARMUP + steps
    config.train.log_every = config.train.checkpoint_every = 10**6
    mesh = parallel.make_mesh({"data": -1})
    model = reward_model.from_pretrained(folder, mesh=mesh)  # caig_jax.models.reward
    attention_lib.configure(model, attention, mesh)
    raw = dict(np.load(os.path.join(folder, "batch.npz")))
    batch = {"input_ids": raw["input_ids"].astype(np.int32), "attention_mask": raw["attention_mask"].astype(np.int32),
             "pixel_values": raw["pixel_values"], "image_layout": layout_for(model.config, raw["image_sizes"]),
             "label": raw["label"], "ctr": raw["ctr"]}
    loss_fn = reward_job.make_loss_fn(0.5)
    with jax.set_mesh(mesh):
        first_loss = float(loss_fn(model, parallel.global_batch(mesh, batch), None)[0])
    data = _FixedBatches(batch)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, loss_fn)
        last = trainer.train(data).metrics
        trainer.close()
    intervals = np.diff(data.times)[WARMUP:]
    cpu_s = (data.cpu[-1] - data.cpu[WARMUP]) / (len(data.cpu) - 1 - WARMUP)
    return {"step_s": float(np.median(intervals)), "cpu_s": cpu_s, "first_loss": first_loss,
            "last_loss": float(last["loss"]),
            "devices": jax.device_count(), "attention": attention_lib.resolve(attention, mesh.devices.flat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="CPU device counts for ours, comma-separated")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", default="")
    parser.add_argument("--attention", default="xla,chunked", help="our attention implementations, comma-separated")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS variants for ours, ';'-separated ('' = none)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all of ours' runs this many times, interleaved")
    parser.add_argument("--no-torch", action="store_true", help="ours only (variants against each other)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(time_ours(args.folder, args.child, args.steps, args.attention)))
        return

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model, heads, batch = build(folder)
        runs = [(int(n), impl, flags) for n in args.devices.split(",") for impl in args.attention.split(",")
                for flags in args.xla_flags.split(";")]
        results: dict = {}
        for _ in range(args.rounds):
            for n, impl, flags in runs:
                env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
                if flags:
                    env["XLA_FLAGS"] = flags
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), "--folder",
                                      folder, "--steps", str(args.steps), "--attention", impl], capture_output=True,
                                     text=True, cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode != 0 or line is None:
                    raise RuntimeError(f"ours with {n} CPU devices, XLA_FLAGS={flags!r} failed:\n{out.stderr[-3000:]}")
                results.setdefault((n, impl, flags), []).append(json.loads(line[7:]))
        for (n, impl, flags), rounds in results.items():
            name = f"caig_jax, {n} CPU device{'s' if n > 1 else ''}, {rounds[0]['attention']}"
            rows.append({"framework": name + (f", `{flags}`" if flags else ""), **rounds[0],
                         "step_s": statistics.median(r["step_s"] for r in rounds),
                         "cpu_s": statistics.median(r["cpu_s"] for r in rounds),
                         "rounds_step_s": [r["step_s"] for r in rounds]})
        if not args.no_torch:
            rows.append({"framework": "transformers (PyTorch eager)", "cpu_s": float("nan"),
                         **time_torch(model, heads, batch, args.steps)})
    base_s = rows[-1]["step_s"] if not args.no_torch else rows[0]["step_s"]
    base = "torch" if not args.no_torch else "first row"
    print(f"\nTiny reward training step, batch {BATCH} x {MAX_LEN} positions, {os.cpu_count()} cores, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, medians of {args.rounds} round(s)\n")
    print(f"| framework | s / step | CPU s / step | examples / s | {base} s / this s | first loss | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['framework']} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {BATCH / r['step_s']:.0f} | "
              f"{base_s / r['step_s']:.2f}x | {r['first_loss']:.7f} | {r.get('last_loss', float('nan')):.7f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
