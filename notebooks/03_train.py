# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 03 — train a backbone (embedding head + vocabulary head)
# Reads: `working/01_filter/<exp>/filtered.parquet`, `working/02_targets/<exp>/` (targets, vocabulary, labels),
# cached features in `working/features/<backbone>/` (frozen mode).
# Writes: `working/03_train/<exp>/<run>/`: config.json, summary.csv, model.safetensors + model.json,
# preds_{train,oof,test}.npz, sample_cosines.csv, metrics.json, DONE.

# %% tags=["parameters"]
exp = "demo"
backbone = "effnet_lite0"
mode = "frozen"
head_config = "concat"
vocab_head = True
lam = 1.0
vocab_size = 0
epochs = 20
lr = 0.001
fold = -1
seed = 0
run = ""
pretrained = True
tiny = False
smoke = False

# %%
from revsd import train

cfg = train.TrainConfig.from_namespace(globals())
cfg

# %%
run_dir = train.run(cfg)
run_dir

# %% [markdown]
# Per-epoch summary and learning curve.

# %%
import matplotlib.pyplot as plt

summary = train.load_summary(run_dir)
metrics = train.load_metrics(run_dir)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(summary["epoch"], summary["train_cos"], label="train cosine")
ax.plot(summary["epoch"], summary["val_cos"], label="validation cosine")
ax.axhline(metrics["const_mean_val"], ls="--", c="gray", label="constant mean (val)")
ax.set_xlabel("epoch")
ax.set_ylabel("mean cosine")
ax.set_title(run_dir.name)
ax.legend()
summary

# %% [markdown]
# Held-out cosine next to the constant-mean-embedding baseline (normalised mean of the training targets).

# %%
import pandas as pd

pd.DataFrame({"model": [metrics["val_cosine"], metrics["test_cosine"]],
              "constant mean": [metrics["const_mean_val"], metrics["const_mean_test"]]},
             index=["validation (OOF)", "test"]).round(4)
