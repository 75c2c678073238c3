"""Column layouts of the preference datasets diffalign reads and writes. One place for each name.

Pick-a-Pic v2 (pairs, one caption): caption, jpg_0, jpg_1 (encoded image bytes), label_0, label_1
  (1 = preferred, 0.5 = tie), plus optional ids and model_0/model_1.
Pick-Double-Caption (DCPO): the Pick-a-Pic columns plus caption_0 and caption_1 (one caption per image).
Ranked / Syn-Pic (k images per prompt), one row per prompt:
  prompt: str
  images: list[bytes]            encoded PNG/JPEG, k entries
  generators: list[str]          which model made each image
  seeds: list[int]               the seed of each image (provenance and resumability)
  scores: struct{scorer: list[float]}   raw score of each image under each reward model
  phi: list[float]               soft preference in [0, 1] (methods.md sec. 6), higher is better
  rank: list[int]                0 = best, derived from phi (ties share the lower rank)
"""

PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
DOUBLE_CAPTION_REQUIRED = ("caption_0", "caption_1", "jpg_0", "jpg_1", "label_0")
RANKED_REQUIRED = ("prompt", "images", "phi")
RANKED_COLUMNS = ("prompt", "images", "generators", "seeds", "scores", "phi", "rank")
