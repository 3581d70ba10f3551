"""Evaluation sweep: reward-model checkpoints x evaluation sets -> one table (CSV, JSON, markdown).

Run (CPU, after `python -m caig_jax.main --config=configs/reward.py:tiny --workdir=runs/reward_tiny`):
    python -m caig_jax.main --config=configs/eval_sweep.py:tiny --workdir=runs/sweep_tiny

Override what is evaluated from the command line:
    --config.checkpoints='runs/reward_*,runs/reward_*/ablation_*'   training workdirs and/or globs (comma-separated)
    --config.steps=all                                              `latest` (default), `all`, or `400,800`
    --config.eval_sets='test=self:test,val=self:val,other=/data/tfds:test'
        NAME=DATA_DIR:SPLIT; DATA_DIR `self` = the checkpoint's own training data (its `data.dir`, or the
        marketplace built into its workdir)

Expect one log line per (checkpoint, step, eval set) with its accuracy and 95% CI, then the table printed
as markdown: pairs, accuracy + CI, the CTR head's ordering accuracy and correlations with the logged CTRs,
and on the synthetic world the oracle accuracy, the accuracy against the true CTR order and whether
`accuracy - 0.5 >= 0.8 * (oracle - 0.5)`. Files: `<workdir>/results.{csv,json,md}`, one finished row per
file in `<workdir>/rows/`, per-pair predictions per host in
`<workdir>/predictions/<row>/predictions.process{K}.npz`, a report with plots per row in
`<workdir>/reports/<row>/`. Re-running the same command skips finished rows (add checkpoints or sets and
only the new rows are evaluated) and rebuilds the table.

Presets (`:ARG`):
- `tiny`: CPU, any device count, the checkpoints of `runs/reward_*` (and their point_weight ablations) on
  their own held-out test and val splits.
- `pod`: a TPU pod slice evaluating 7B reward models (mesh fsdp=16 x tensor=4 = 64 chips, as the reward
  job's `7b` preset; checkpoints restore onto this mesh whatever mesh they were trained on). Launch on every
  host with launch/pod.py; the workdir and checkpoints must be on a filesystem every host sees.
"""

import ml_collections

PRESETS = ("tiny", "pod")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "eval_sweep"
    c.seed = 0  # evaluation is ordered (no shuffling); kept for the shared config layout
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 0  # on a CPU host: split it into this many XLA devices (see configs/reward.py); 0: one
    c.checkpoints = "runs/reward_*,runs/reward_*/ablation_*"  # training workdirs / globs, comma-separated
    # Which kind of training workdir: `reward` (the reward job) or `baseline` (VAM / CG4CTR of the baselines job).
    c.model_kind = "reward"
    c.steps = "latest"  # which checkpoint steps of each workdir: latest | all | comma-separated steps
    c.eval_sets = "test=self:test,val=self:val"  # NAME=DATA_DIR:SPLIT, comma-separated
    c.batch_size = 64  # global pairs per step (split over processes, padded to the mesh)
    c.write_predictions = True  # per-pair predictions, one .npz per host and row
    c.write_reports = True  # report.md + plots per row (process 0)
    if preset == "tiny":
        pass
    elif preset == "pod":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 4
        c.checkpoints = "/mnt/shared/runs/reward_7b*"
        c.eval_sets = "test=self:test"
        c.batch_size = 128
    else:
        raise ValueError(f"configs/eval_sweep.py: unknown preset {preset!r}; choose 'tiny' or 'pod'")
    c.lock()
    return c
