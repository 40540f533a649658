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
# # 02 — targets: MiniLM prompt embeddings, vocabulary, label matrix
# Reads: `working/01_filter/<exp>/filtered.parquet`.
# Writes: `working/02_targets/<exp>/` `targets.npy` (float32 (n, 384), L2-normalised all-MiniLM-L6-v2,
# row-aligned with the filtered table), `ids.npy`, `vocab.json` (the m most frequent adjectives, nouns and
# verbs of the *training* prompts), `labels.npz` (CSR uint8 (n, m)), `config.json`.
# Embeddings are computed once and reused while the filtered table is unchanged (`force = True` recomputes).

# %% tags=["parameters"]
exp = "demo"
model = ""
vocab_size = 1000
vocab_min_count = 2
vocab_pos = "ADJ,NOUN,VERB"
batch_size = 0
device = ""
force = False

# %%
from revsd import targets

cfg = targets.TargetsConfig.from_namespace(globals())
cfg

# %%
ts = targets.run(cfg)
print(f"{len(ts)} prompts, embeddings {ts.emb.shape} {ts.emb.dtype}, vocabulary of {len(ts.words)} words")
print({split: len(ts.rows(split)) for split in targets.SPLITS})

# %% [markdown]
# ## Vocabulary: top words (counts = training prompts containing the word) and label density

# %%
import numpy as np
import pandas as pd

top = pd.DataFrame({"word": ts.words, "train_prompts": ts.counts})
per_prompt = np.asarray(ts.labels.sum(axis=1)).ravel()
print(f"label density {ts.labels.nnz / max(1, np.prod(ts.labels.shape)):.4f}; "
      f"words per prompt: mean {per_prompt.mean():.2f}, prompts with none {(per_prompt == 0).mean():.1%}")
top.head(30)

# %% [markdown]
# ## Embeddings: nearest prompts and a similarity heat-map

# %%
sims = ts.emb @ ts.emb.T
np.fill_diagonal(sims, -1)
prompts = ts.table["prompt"].tolist()
rows = np.random.default_rng(0).choice(len(ts), size=min(5, len(ts)), replace=False)
pd.DataFrame([{"prompt": prompts[i], "nearest": prompts[j], "cosine": round(float(sims[i, j]), 3)}
              for i, j in zip(rows, sims[rows].argmax(axis=1))])

# %%
import matplotlib.pyplot as plt

k = min(40, len(ts))
order = np.argsort(ts.table["group"].astype(str).to_numpy()[:k], kind="stable")
fig, ax = plt.subplots(figsize=(6, 5))
im = ax.imshow(ts.emb[order] @ ts.emb[order].T, vmin=-0.2, vmax=1, cmap="viridis")
ax.set_title(f"cosine similarity of the first {k} prompts (sorted by group)")
fig.colorbar(im, ax=ax)
plt.show()
