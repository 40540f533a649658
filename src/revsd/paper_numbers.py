"""The paper's reported numbers, one data table, for the report's "paper" column beside ours.

Source: Croitoru, Hondru, Ionescu, Sebe, Shah, "Reverse Stable Diffusion: What prompt was used to generate this
image?", arXiv 2308.01472 (Tables 1-3), code https://github.com/CroitoruAlin/Reverse-Stable-Diffusion.

``None`` means "not transcribed": the paper's tables could not be read from the sources available when this
file was written (the stored arXiv/ar5iv pages give the abstract only; the authors' repository carries no
tables), so every cell below is None and renders as "n/a". Fill a cell only from the paper itself, never from
a summary, and note the table and row in the comment.
"""

from __future__ import annotations

SOURCE = "arXiv 2308.01472, Tables 1-3"

# backbone registry name -> the paper's name, in Table 1's order
BACKBONES = {"clip_vit_h14": "CLIP ViT-H/14", "vit_b16": "ViT-B/16", "swin_l": "Swin-L", "unet_enc": "U-Net encoder"}

# Table 1 rows per backbone (key -> label), then the joint rows
TABLE1_ROWS = {"vanilla": "vanilla (λ = 0)", "vocab": "+ vocabulary head",
               "vocab_curriculum": "+ vocabulary head + curriculum"}
JOINT_ROWS = {"weighted": "joint (weighted average)", "dakl": "joint + DAKL"}

# Table 1: mean test cosine, (backbone, row) -> number; ("joint", "weighted" | "dakl") for the ensembles
TABLE1: dict[tuple[str, str], float | None] = {
    **{(b, row): None for b in BACKBONES for row in TABLE1_ROWS},
    ("joint", "weighted"): None,
    ("joint", "dakl"): None,
}

# Table 2: Swin-L, head configuration -> mean test cosine (0: the baseline without a vocabulary head)
TABLE2: dict[int, float | None] = {0: None, 1: None, 2: None, 3: None}

# Table 3: the human study, row -> votes per answer; rows "annotator 1" … "annotator N", "all agree", "average"
TABLE3_ANSWERS = ("ours", "original", "undecided")
TABLE3: dict[str, dict[str, float | None]] = {
    row: {a: None for a in TABLE3_ANSWERS} for row in ("all agree", "average")
}


def cell(value: float | None, digits: int = 4) -> str:
    """A paper cell as text: the number, or "n/a" when it was not transcribed."""
    return "n/a" if value is None else f"{value:.{digits}f}"
