"""revsd: reverse Stable Diffusion — predict the MiniLM embedding of the prompt behind an image."""

__version__ = "0.1.0"

EMBED_DIM = 384  # all-MiniLM-L6-v2 sentence embedding size
