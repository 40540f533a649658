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
# # 04 — difficulty of each training image (preliminary run)
# A 03_train run in the normal regime (no curriculum) of `epochs` epochs scores every training image by its
# mean cosine between predicted and target embedding over the epochs (high = easy). The training parameters
# are 03_train's, with its defaults; a finished 03_train run with exactly these settings is reused instead of
# retraining.
#
# Reads: `working/01_filter/<exp>/filtered.parquet`, `working/02_targets/<exp>/…` (and a matching finished
# `working/03_train/<exp>/<run>/`, if any).
# Writes: `working/04_difficulty/<exp>/<run>/difficulty.csv` (image_id, difficulty, cos_epoch_1..E),
# `difficulty.json`, and the files of the preliminary 03_train run when it is trained here.

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
reuse = True
n_examples = 4

# %%
from revsd import difficulty

cfg = difficulty.DifficultyConfig.from_namespace(globals())
cfg

# %%
run_dir = difficulty.run(cfg)
scores = difficulty.load(cfg.exp, run_dir.name)
scores["difficulty"].describe()

# %% [markdown]
# Distribution of the difficulty scores (mean training cosine over the epochs).

# %%
ax = scores["difficulty"].plot.hist(bins=30, title=f"difficulty ({len(scores)} training images)")
ax.set_xlabel("mean training cosine over the epochs (high = easy)");

# %% [markdown]
# The easiest (top row) and hardest (bottom row) training images with their prompts.

# %%
examples = difficulty.extremes(cfg.exp, scores, n_examples)
difficulty.plot_extremes(examples);
examples[["kind", "difficulty", "prompt"]]
