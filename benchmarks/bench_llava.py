"""LLaVA-1.5-style MLLM speed on this machine's CPU: caig_jax (jitted) vs transformers (PyTorch eager), float32.

Command (from the repository root):
    /work/venv/bin/python benchmarks/bench_llava.py [--preset mid|small] [--repeats 3] [--json out.json]

What it does: builds a random transformers `LlavaForConditionalGeneration` (default preset `mid`: CLIP tower of
4 layers, width 512, 336 px / patch 14 -> 576 image tokens; Llama decoder of 8 layers, hidden 1024, 16 heads,
intermediate 2816, vocabulary 32064 with `<image>` = 32000 as llava-hf), saves it with `save_pretrained` to a
temporary folder and loads ours from it with `caig_jax.models.llava.from_pretrained`, so both run the same weights.
The EOS row of the LM head is zeroed (its logit is 0, below the random maximum) so greedy decoding never stops
early and both sides generate exactly the requested tokens.

Measured (warm-up runs excluded; `--repeats` rounds in which ours and torch run in turn, so both see the same
background load; medians):
  * train step: forward + backward (masked next-token cross-entropy over the text tokens, gradients for every
    parameter, vision tower included) on 1 image + 512 text tokens (T = 1 + 576 + 511 = 1088 positions, B = 1);
    tokens/s counts all T positions. Ours: `jax.jit(jax.value_and_grad(loss))` over the model's parameters,
    calling the public `model(input_ids, pixel_values, attention_mask=...)`; theirs: torch autograd.
  * generation with a KV cache at batch 1 and 4 (prompt: BOS + 576 image tokens + 63 text tokens; greedy):
    `generate(..., max_new_tokens=1)` (prefill + first token) and `max_new_tokens=1 + N` (default N = 64, so the
    decode time stands out of the prefill's run-to-run noise on a busy machine); decode tokens/s = B * N / median
    over rounds of (t(1 + N) - t(1)); end-to-end tokens/s = B * (1 + N) / t(1 + N).
    Ours: `caig_jax.models.llava.generate` (one jitted prefill + while_loop program); theirs:
    `LlavaForConditionalGeneration.generate(do_sample=False)` (DynamicCache).
`--attention xla,chunked` (default): ours runs once per attention implementation (`caig_jax.models.attention`),
all in the same interleaved rounds as torch, one table row each.
Ratio = ours / torch in tokens/s (> 1: ours faster), wall clock. "CPU-s ratio" = torch / ours in process CPU
seconds (all threads): the work each side needed, which other processes' load moves much less than wall time.
Sanity columns: the two losses, the two gradient norms and the share of greedy tokens on which the two agree
(float32 rounding may flip a near-tie after many layers).

Threads: torch.set_num_threads(cores) and XLA's CPU client, whose intra-op pool is sized to the process's CPU
affinity (also asked for with `intra_op_parallelism_threads` in XLA_FLAGS), both use every core. The machine is
shared: the load average before and after is printed; compare numbers taken at similar load only.
Sizes: `mid` is the issue's example (8 layers, hidden 1024, 1 image + 512 text tokens), 183M parameters and about
1 TFLOP per train step: ~15 s per step on 2 idle cores (60-80 GFLOP/s float32), ~70 s measured at load average 10;
the whole script takes ~10 minutes on an idle machine, far longer on a busy one. `--preset small` (20M parameters)
takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

PRESETS = {
    # Mid-size: LLaVA-1.5 layout (336 px / 14 -> 576 image tokens) with a smaller tower and decoder.
    "mid": dict(vision_layers=4, vision_hidden=512, vision_intermediate=2048, vision_heads=8, image_size=336,
                patch_size=14, layers=8, hidden=1024, heads=16, kv_heads=16, intermediate=2816, vocab=32064,
                text_tokens=512, prompt_text_tokens=64),
    # Smoke-size: checks the script end to end in about a minute.
    "small": dict(vision_layers=2, vision_hidden=256, vision_intermediate=1024, vision_heads=4, image_size=224,
                  patch_size=14, layers=2, hidden=256, heads=4, kv_heads=4, intermediate=704, vocab=32064,
                  text_tokens=128, prompt_text_tokens=32),
}
IMAGE_TOKEN = 32000
# Run as a script from anywhere: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS, PAD = 2, 32001


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all its threads) of one call of fn (which must block until
    its result is ready). CPU seconds barely move when other processes compete for the cores; wall seconds do."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """Warm every fn up, then time them in turn, `repeats` rounds: the contenders see the same background load
    (the machine is shared) instead of one getting a quiet minute and the other a busy one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(measure(fn))
    return out


def med(samples, k: int = 0) -> float:
    return statistics.median(x[k] for x in samples)


# ------------------------------------------------------------------------------------------------ model + data


def build_torch_model(p: dict, folder: str):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
                           num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
                           image_size=p["image_size"], patch_size=p["patch_size"], projection_dim=p["vision_hidden"]),
        text_config=dict(hidden_size=p["hidden"], intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], vocab_size=p["vocab"],
                         max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=PAD),
        image_token_index=IMAGE_TOKEN, image_seq_length=(p["image_size"] // p["patch_size"]) ** 2,
        pad_token_id=PAD, eos_token_id=EOS, attn_implementation="sdpa")
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # EOS logit pinned to 0: never the greedy argmax, so both frameworks generate the full length.
        model.get_output_embeddings().weight[EOS].zero_()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(folder)
    return model


def make_batch(p: dict, batch: int, text_tokens: int, seed: int):
    """(input_ids int64[B, T], pixel_values float32[B, 3, S, S]): BOS, the image tokens, random text ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_image = (p["image_size"] // p["patch_size"]) ** 2
    text = rng.integers(3, 32000, (batch, text_tokens - 1))
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, n_image), IMAGE_TOKEN), text], axis=1)
    pixels = rng.standard_normal((batch, 3, p["image_size"], p["image_size"])).astype(np.float32)
    return ids.astype(np.int64), pixels


# ------------------------------------------------------------------------------------------------ train step


def ours_train_step(model, ids, pixels):
    """-> (callable returning (loss, grad norm) and blocking, name of what it runs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    targets = jnp.asarray(ids[:, 1:], jnp.int32)
    weights = jnp.asarray(ids[:, 1:] != IMAGE_TOKEN, jnp.float32)
    ids_j, pix_j = jnp.asarray(ids, jnp.int32), jnp.asarray(pixels)
    mask = jnp.ones(ids.shape, jnp.int32)

    def loss_fn(params, rest, ids, pixels, mask, targets, weights):
        m = nnx.merge(graphdef, params, rest)
        logits = m(ids, pixels, None, mask)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    step = jax.jit(jax.value_and_grad(loss_fn))
    out = {}

    def run():
        loss, grads = step(params, rest, ids_j, pix_j, mask, targets, weights)
        jax.block_until_ready((loss, grads))
        out["loss"], out["grads"] = loss, grads

    def summary():
        leaves = jax.tree.leaves(out["grads"])
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves)))
        return float(out["loss"]), norm

    return run, summary


def torch_train_step(model, ids, pixels):
    import torch
    import torch.nn.functional as F

    ids_t, pix_t = torch.tensor(ids), torch.tensor(pixels)
    mask = torch.ones_like(ids_t)
    labels = ids_t[:, 1:].clone()
    labels[labels == IMAGE_TOKEN] = -100
    out = {}

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids_t, pixel_values=pix_t, attention_mask=mask).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        out["loss"] = loss.item()

    def summary():
        sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        return out["loss"], sq ** 0.5

    return run, summary


# ------------------------------------------------------------------------------------------------ generation


def ours_generate(model, ids, pixels, new_tokens: int, impl: str):
    import jax
    import numpy as np

    from caig_jax.models import llava
    from caig_jax.models.attention import set_attention

    out = {}

    def run():
        set_attention(model, impl)  # generate jits per graphdef, which names the implementation
        toks = llava.generate(model, ids, pixels, None, np.ones_like(ids), max_new_tokens=new_tokens,
                              temperature=0.0)
        out["tokens"] = np.asarray(jax.block_until_ready(toks))

    return run, out


def torch_generate(model, ids, pixels, new_tokens: int):
    import torch

    ids_t, pix_t = torch.tensor(ids), torch.tensor(pixels)
    out = {}

    def run():
        with torch.no_grad():
            seq = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=pix_t,
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        out["tokens"] = seq[:, ids_t.shape[1]:].numpy()

    return run, out


# ------------------------------------------------------------------------------------------------ report


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def print_table(rows: list[dict], header: str) -> None:
    cols = ["measurement", "ours s", "torch s", "ours tok/s", "torch tok/s", "ours/torch", "CPU-s ratio", "check"]
    table = [[r["name"], f"{r['ours_s']:.3f}", f"{r['torch_s']:.3f}", fmt_rate(r["ours_tps"]),
              fmt_rate(r["torch_tps"]), f"{r['ratio']:.2f}x", f"{r['cpu_ratio']:.2f}x", r.get("check", "")]
             for r in rows]
    left = (0, len(cols) - 1)
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    print("\n" + header)
    print(line)
    print("-" * len(line))
    for t in table:
        print("  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(t, widths))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode tokens after the first one")
    parser.add_argument("--batch-sizes", default="1,4", help="generation batch sizes")
    parser.add_argument("--threads", type=int, default=cores(), help="torch and XLA CPU threads (default: all cores)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--attention", default="xla,chunked",
                        help="our attention implementations to time, each against torch in the same rounds")
    args = parser.parse_args(argv)
    impls = args.attention.split(",")

    # Before jax is imported: XLA reads its flags once. (Its CPU client sizes the intra-op pool from the CPU
    # affinity; the flag states the same number explicitly.)
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
    os.environ["XLA_FLAGS"] = flags.strip()
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    load_before = load_avg()
    n_image = (p["image_size"] // p["patch_size"]) ** 2
    info = {
        "preset": args.preset, "config": p, "threads": args.threads, "cores": cores(),
        "cpu": platform.processor() or platform.machine(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ["XLA_FLAGS"], "torch_attention": "sdpa", "repeats": args.repeats,
        "load_avg_before": load_before,
    }
    print(f"preset {args.preset}: {json.dumps(p)}")
    print(f"threads: torch {torch.get_num_threads()}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, devices {jax.devices()}")
    print(f"load average (1, 5, 15 min) before: {load_before}")

    from caig_jax.models import llava
    from caig_jax.models.attention import set_attention

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        tmodel = build_torch_model(p, folder)
        model = llava.from_pretrained(folder, dtype=jnp.float32, mesh=None)
        n_params = sum(x.numel() for x in tmodel.parameters())
        info["params"] = n_params
        print(f"built + saved + loaded {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s")

        if not args.skip_train:
            ids, pixels = make_batch(p, 1, p["text_tokens"], seed=0)
            T = ids.shape[1]
            ours = {}
            for impl in impls:  # the implementation is part of the graphdef that ours_train_step splits off
                ours[impl] = ours_train_step(set_attention(model, impl), ids, pixels)
                t0 = time.perf_counter()
                ours[impl][0]()
                print(f"ours ({impl}): train step compiled + first run in {time.perf_counter() - t0:.1f}s")
            torch_run, torch_sum = torch_train_step(tmodel, ids, pixels)
            res = interleaved({**{impl: run for impl, (run, _) in ours.items()}, "torch": torch_run}, args.repeats)
            t_loss, t_norm = torch_sum()
            tm = med(res["torch"])
            for impl, (_, ours_sum) in ours.items():
                o_loss, o_norm = ours_sum()
                om = med(res[impl])
                rows.append(dict(
                    name=f"train fwd+bwd B=1 T={T} ({n_image} img + {p['text_tokens']} text) [{impl}]", ours_s=om,
                    torch_s=tm, ours_tps=T / om, torch_tps=T / tm, ratio=tm / om,
                    cpu_ratio=med(res["torch"], 1) / med(res[impl], 1),
                    check=f"loss {o_loss:.4f}/{t_loss:.4f}, |grad| rel diff {abs(o_norm - t_norm) / t_norm:.1e}",
                    samples={"ours": res[impl], "torch": res["torch"]}, loss=(o_loss, t_loss),
                    grad_norm=(o_norm, t_norm)))
            tmodel.zero_grad(set_to_none=True)
            print(f"train (wall s, cpu s): {res}")
            del ours

        if not args.skip_generate:
            n = args.new_tokens
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                ids, pixels = make_batch(p, b, p["prompt_text_tokens"], seed=1)
                L = ids.shape[1]
                fns, outs = {}, {}
                for impl in impls:
                    fns[f"{impl}_1"], _ = ours_generate(model, ids, pixels, 1, impl)
                    fns[f"{impl}_n"], outs[impl] = ours_generate(model, ids, pixels, 1 + n, impl)
                fns["torch_1"], _ = torch_generate(tmodel, ids, pixels, 1)
                fns["torch_n"], t_out = torch_generate(tmodel, ids, pixels, 1 + n)
                res = interleaved(fns, args.repeats)
                print(f"generate B={b} (wall s, cpu s): {res}")
                # Decode time of each round = its (1 + n)-token run minus its 1-token run (same prompt, same round).
                dec = {who: [(a[0] - c[0], a[1] - c[1]) for a, c in zip(res[f"{who}_n"], res[f"{who}_1"])]
                       for who in (*impls, "torch")}
                ttok = t_out["tokens"]
                for impl in impls:
                    otok = outs[impl]["tokens"]
                    # With the EOS logit pinned to 0 neither side may stop early; say so loudly if one did.
                    full = (otok.shape == ttok.shape == (b, 1 + n) and not (otok == EOS).any()
                            and not (ttok == EOS).any())
                    agree = float((otok == ttok).mean()) if otok.shape == ttok.shape else float("nan")
                    check = f"greedy tokens equal {100 * agree:.0f}%" + ("" if full else " (EOS / SHORT OUTPUT!)")
                    prefill_note = "tok/s: prompt tokens"
                    for name, o, t, tokens, note in (
                            (f"prefill+1st token B={b} L={L}", res[f"{impl}_1"], res["torch_1"], b * L, prefill_note),
                            (f"decode B={b} ({n} new tokens)", dec[impl], dec["torch"], b * n, check),
                            (f"generate end-to-end B={b} ({1 + n} new)", res[f"{impl}_n"], res["torch_n"],
                             b * (1 + n), "")):
                        om, tm = med(o), med(t)
                        rows.append(dict(name=f"{name} [{impl}]", ours_s=om, torch_s=tm, ours_tps=tokens / om,
                                         torch_tps=tokens / tm, ratio=tm / om, cpu_ratio=med(t, 1) / med(o, 1),
                                         check=note, samples={"ours": o, "torch": t}))
    load_after = load_avg()
    info["load_avg_after"] = load_after
    header = (f"LLaVA-1.5-style {info['params'] / 1e6:.0f}M params, float32, {platform.machine()} CPU, "
              f"{args.threads} threads; median of {args.repeats} interleaved rounds (warm-up excluded); "
              "ours/torch = tokens/s ratio (wall clock); CPU-s ratio = torch/ours process CPU seconds")
    print_table(rows, header)
    print(f"load average (1, 5, 15 min) before: {load_before}; after: {load_after} (other processes share the cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
