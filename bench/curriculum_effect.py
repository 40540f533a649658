"""Plain vs curriculum (equal thirds, thresholds): effnet_lite0 frozen, sample, without/with vocabulary head, seeds 0-2.

    REVSD_WORKING=/tmp/curriculum_effect .venv/bin/python bench/curriculum_effect.py

Uses the 03 notebook's training defaults (concat head, all vocabulary words); difficulty comes from the matching
plain 03 run (04 reuses its per-sample cosines). Prints per-run and mean±std val/test cosine; writes
bench/results/curriculum_effect.md.
"""
from pathlib import Path

import pandas as pd
import torch

from revsd import curriculum, difficulty, filtering, paths, targets, train
from revsd.artifacts import write_text

torch.set_num_threads(1)
exp, rows = "curriculum_effect", []
if not paths.filtered_table(exp).exists():
    filtering.run(filtering.FilterConfig(exp=exp, val_size=0.2, test_size=0.2))
    targets.run(targets.TargetsConfig(exp=exp, vocab_size=256))
for vocab_head in (False, True):
    for seed in (0, 1, 2):
        base = dict(exp=exp, backbone="effnet_lite0", mode="frozen", head_config="concat", vocab_head=vocab_head,
                    vocab_size=0, epochs=20, lr=1e-3, seed=seed)
        plain = train.run(train.TrainConfig(**base))
        d = difficulty.run(difficulty.DifficultyConfig(**base))
        runs = [plain] + [curriculum.run(curriculum.CurriculumConfig(**base, difficulty_run=d.name, heuristic=h))
                          for h in ("equal", "thresholds")]
        rows += [{"vocab_head": vocab_head, "seed": seed, **train.load_metrics(r)} for r in runs]
df = pd.DataFrame(rows)
per_run = df[["vocab_head", "seed", "variant", "steps", "val_cosine", "test_cosine", "const_mean_test"]]
summary = df.groupby(["vocab_head", "variant"], sort=False)[["val_cosine", "test_cosine"]].agg(["mean", "std"]).round(4)
print(per_run.to_string(index=False))
print(summary.to_string())
write_text(Path(__file__).parent / "results" / "curriculum_effect.md",
           "# Curriculum effect on the embedded sample (effnet_lite0, frozen)\n\n"
           f"`{__doc__.strip().splitlines()[2].strip()}`\n\n```\n{summary.to_string()}\n```\n\n"
           f"```\n{per_run.to_string(index=False)}\n```\n")
