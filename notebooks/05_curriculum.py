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
# # 05 — curriculum learning: easy, medium, hard chunks introduced easiest first
# The model is trained from scratch with 03_train's engine for the same number of steps as the plain run;
# the training images are split into easy / medium / hard chunks by their 04 difficulty (three equal chunks,
# or two cosine thresholds leaving `easy_share` easy and `hard_share` hard), and the chunks enter the pool
# cumulatively at the fractions `stage_starts` of the total steps. No sample is seen before its stage.
# The training parameters are 03_train's, with its defaults: keep them equal to the run to compare with.
#
# Reads: `working/02_targets/<exp>/…`, `working/04_difficulty/<exp>/<difficulty_run>/difficulty.csv`,
# the matching plain run in `working/03_train/<exp>/` for the comparison.
# Writes: `working/05_curriculum/<exp>/<run>/` (the files of a 03_train run, plus `chunks.csv`, `schedule.csv`,
# `curriculum.json`).

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
difficulty_run = ""
heuristic = "equal"
easy_share = 0.6
hard_share = 0.1
stage_starts = "0,0.33,0.66"
plain_run = ""

# %%
from revsd import curriculum

cfg = curriculum.CurriculumConfig.from_namespace(globals())
cfg

# %%
run_dir = curriculum.run(cfg)

# %% [markdown]
# Chunk sizes and the schedule (the step at which each chunk enters the pool).

# %%
curriculum.chunk_summary(run_dir)

# %%
schedule = curriculum.load_schedule(run_dir)
schedule

# %% [markdown]
# Learning curve and held-out cosine, plain run (same settings, 03_train) vs this curriculum run.

# %%
comparison = curriculum.compare_with_plain(run_dir, plain_run)
curriculum.plot_curves(comparison, schedule);
comparison.metrics
