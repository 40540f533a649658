# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 — filter prompts, drop near duplicates, split into train/val/test and folds
# Reads: `input/<source>/` (DiffusionDB on-disk format or Kaggle layout; default: the embedded sample); `source` is a
# folder under input/ or an absolute path, e.g. one written by `revsd data fetch` or `revsd data import`.
# Writes: `working/01_filter/<exp>/filtered.parquet` (image_id, image_path, prompt, group, split, fold + metadata),
# `filter_report.csv` (rows after each rule), `bad_images.csv`, `skipped_inputs.csv` (image files no table row
# lists), `config.json`. Rule 3 and the grouping are explained in docs/filtering.md.

# %% tags=["parameters"]
exp = "demo"
source = "sample"
fmt = "auto"
limit = 0
near_dup_chars = 50
embed_dedup_threshold = 0.0
group_column = "artist"
val_size = 0.0410958904109589  # 30/730 of the rows, as in the paper (30k of 730k)
test_size = 0.0410958904109589  # 30/730 of the rows
n_folds = 5
seed = 0
check_images = True

# %%
from revsd import filtering

cfg = filtering.FilterConfig.from_namespace(globals())
cfg

# %%
df = filtering.run(cfg)

# %% [markdown]
# Rows after each rule:

# %%
import pandas as pd
from revsd import paths

out = paths.stage_dir("01_filter", cfg.exp)
pd.read_csv(out / "filter_report.csv")

# %% [markdown]
# Rows and prompt groups per split and fold (a group never straddles two of them):

# %%
df.groupby(["split", "fold"])["group"].agg(rows="size", groups="nunique")

# %%
pd.read_csv(out / "bad_images.csv")

# %%
pd.read_csv(out / "skipped_inputs.csv")

# %%
df.sample(min(8, len(df)), random_state=0)[["image_id", "prompt", "group", "split", "fold"]]
