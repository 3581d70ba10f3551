"""Market job: simulate the synthetic marketplace and build its TFDS datasets.

Run (CPU, tiny: the marketplace itself about 35 s on 2 shared cores, 10-20 s of it painting the 32,880
prompts of the world report's oracle-prompt search; then the datasets):
    python -m caig_jax.main --config=configs/market.py:tiny --workdir=/tmp/market

Expect a short report: products and creatives per split, the pair counts and drop reasons of CAIG's
rule (impressions > 1000, 1.05 <= CTR ratio <= 1.20), and the oracle accuracy (how often the logged
label agrees with the true CTR order; no reward model can beat it: 0.71-0.77 on `tiny`'s test pairs). The
workdir then holds `market/` (products, CreativeRanking-layout logs, LLaVA conversations, contact_sheet.png,
oracle.json, world_report.{json,md}: see caig_jax/data/README.md), `tfds/` (array_record datasets
`ctr_logs/market`, `llava_conversations/market`, `products/market`) and `market_report.{json,md}`. Re-running on the same workdir reuses what is done; an
interrupted run resumes and produces the same data.

Presets (`:ARG`): `tiny` (400 products, 64 px ads, 64 px pair halves), `reward` (the same world with 1200
products, simulated in 2 processes: what the reward job's tiny preset builds and trains on) and
`full` (3000 products, 512 px ads and pairs, the paper's resolution; a few CPU-minutes per
1000 products, set `--config.market.num_workers=N` to use N processes).

Load the reward pairs for training:
    from caig_jax.data import loader
    source = loader.reward_pair_source(f"{workdir}/tfds", "train")
    batches = loader.reward_batches(source, batch_size=32, seed=0, image_size=32)
"""

import ml_collections

PRESETS = ("tiny", "reward", "full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "market"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # unused: the job needs no devices

    # The simulated world (fields of caig_jax.data.market.MarketConfig).
    c.market = ml_collections.ConfigDict()
    c.market.num_products = 400
    c.market.min_creatives = 8
    c.market.max_creatives = 10
    c.market.image_size = 64
    c.market.product_size = 128
    c.market.on_brief = 0.4
    c.market.impressions_median = 3000.0
    c.market.impressions_sigma = 0.5
    c.market.low_impression_fraction = 0.05
    c.market.item_offset_sd = 0.25
    c.market.max_days = 3
    c.market.split_fractions = ml_collections.ConfigDict({"train": 0.7, "val": 0.1, "test": 0.2})
    c.market.contact_sheet_products = 10
    c.market.num_workers = 0

    # CAIG's pair rule and the pair images (the ctr_logs builder).
    c.pairs = ml_collections.ConfigDict()
    c.pairs.min_impressions = 1000
    c.pairs.min_ratio = 1.05
    c.pairs.max_ratio = 1.20
    c.pairs.image_size = 64  # each half of a pair image (512 in the paper)
    c.pairs.image_format = "png"
    c.pairs.seed = 0  # left/right order

    # A second, wider pair set for training small models (ctr_logs/market_wide): the same logs and rule but
    # no upper ratio bound, so it also holds the clearly-ordered pairs. CAIG trains on the 1.05-1.20 pairs
    # (`pairs` above); a tiny model trained for minutes learns the click model much better from these
    # (see caig_jax/data/README.md). Evaluation always uses `ctr_logs/market` (CAIG's rule).
    c.train_pairs = ml_collections.ConfigDict()
    c.train_pairs.enabled = True
    c.train_pairs.min_ratio = 1.05
    c.train_pairs.max_ratio = 1e9
    c.train_pairs.splits = ("train",)

    c.build = ml_collections.ConfigDict()
    c.build.on_bad = "raise"  # or "skip": skip and count bad rows/images
    c.build.overwrite = False  # rebuild when a dataset or the market exists with other options
    c.build.datasets = ("ctr_logs", "llava_conversations", "products")

    if preset == "tiny":
        pass
    elif preset == "reward":
        c.market.num_products = 1200
        c.market.num_workers = 2
    elif preset == "full":
        c.train_pairs.enabled = False
        c.market.num_products = 3000
        c.market.min_creatives = 6
        c.market.max_creatives = 12
        c.market.image_size = 512
        c.market.product_size = 512
        c.market.split_fractions = ml_collections.ConfigDict({"train": 0.8, "val": 0.05, "test": 0.15})
        c.pairs.image_size = 512
        c.pairs.image_format = "jpeg"  # 512x1024 pairs: JPEG keeps the dataset small
    else:
        raise ValueError(f"configs/market.py: unknown preset {preset!r}; choose 'tiny', 'reward' or 'full'")
    c.lock()
    return c
