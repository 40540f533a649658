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
# # 06 — blend the runs, domain-adaptive kernel learning (DAKL), submission and report
# Reads: every finished run `working/{03_train,05_curriculum}/<exp>/*/` (`DONE`, `metrics.json`, `summary.csv`,
# `preds_{train,oof,test}.npz`) and `working/02_targets/<exp>/`.
# Writes: `working/06_dakl_ensemble/<exp>/` (`final.npz`, `ensemble.json`, `dakl_grid.parquet`,
# `test_cosines.parquet`, `report.md`, plots), `working/report.md`, `submissions/submission.csv`.
#
# Blend weights are fitted on the OOF (validation) rows. DAKL (`dakl_fit`): `oof` (default) cross-fits on the OOF
# rows — each fold predicted from the others, γ, r, α tuned on those predictions, then all OOF rows → test;
# `train` is the paper's way (training rows' in-sample predictions labelled, OOF rows as the target domain).
# A run lacking ids the others hold stops the stage unless `allow_partial = True`. The report ends with the
# paper's Tables 1–3, the paper's numbers beside ours.

# %% tags=["parameters"]
exp = "demo"
runs = "best"
dakl_fit = "oof"
dakl_folds = 3
dakl_kmeans = "faiss"
dakl_gammas = "0.01,0.3,1,3,10,30"
dakl_rs = "64,256,1024,2000,10000"
dakl_alphas = "0.1,1,10"
dakl_search = "staged"
dakl_keep = 2
allow_partial = False
final = "auto"
chunk = 2048
device = ""
seed = 0
smoke = False

# %%
from revsd import blend

cfg = blend.EnsembleConfig.from_namespace(globals())
cfg

# %%
result = blend.run(cfg)

# %% [markdown]
# Every run of this experiment (mean cosine; `val / OOF` on validation rows, `test` on the held-out split):

# %%
from IPython.display import Image, display
from revsd import paths, report

print(report.headline(cfg.exp))
report.results_table(blend.discover_runs(cfg.exp), result)

# %% [markdown]
# The paper's Table 1 layout, the paper's numbers beside ours (blank: not run; n/a: not transcribed):

# %%
report.paper_table1(blend.discover_runs(cfg.exp), result)

# %% [markdown]
# Blend weights (fitted on OOF) and the best DAKL grid points:

# %%
import pandas as pd

out = paths.stage_dir("06_dakl_ensemble", cfg.exp)
display(pd.DataFrame({"run": result["runs"], "weight": result["weights"]}))
pd.read_parquet(out / "dakl_grid.parquet").sort_values("oof_cosine", ascending=False).head(10)

# %%
display(Image(str(out / "learning_curves.png")))
display(Image(str(out / "test_cosine_hist.png")))
print("submission:", result["submission"])
print("report:", result["report"])
