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
  phi: list[float]               soft preference in [0, 1] (diffalign.data.phi), higher is better
  rank: list[int]                0 = best, derived from phi (ties share the lower rank)
"""

PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
DOUBLE_CAPTION_REQUIRED = ("caption_0", "caption_1", "jpg_0", "jpg_1", "label_0")
RANKED_REQUIRED = ("prompt", "images", "phi")
RANKED_COLUMNS = ("prompt", "images", "generators", "seeds", "scores", "phi", "rank")

# DataConfig.format values whose rows are pairs (jpg_0, jpg_1 + label_0); the others are ranked lists.
PAIR_FORMATS = ("pickapic", "double_caption")

# All columns of yuvalkirstain/pickapic_v2 (HF dataset card), in card order.
PICKAPIC_V2_COLUMNS = (
    "are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid",
    "image_0_url", "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0",
    "model_1", "ranking_id", "user_id", "num_example_per_prompt", "__index_level_0__",
)  # fmt: skip
DOUBLE_CAPTION_COLUMNS = (*PICKAPIC_V2_COLUMNS, "caption_0", "caption_1")

# A ranked row needs prompt + images and at least one of these (phi wins, then scores, then rank).
RANKED_PREFERENCE_SOURCES = ("phi", "scores", "rank")

# User jsonl: one object per line, either a pair or a ranked list. Image paths are relative to the file.
JSONL_PROMPT = "prompt"
JSONL_PAIR_KEYS = ("prompt", "chosen", "rejected")
JSONL_RANKED_KEYS = ("prompt", "images")  # plus one of "phi" / "scores" / "rank"
JSONL_IMAGE_KEYS = ("prompt", "image")  # a plain image + prompt set: items of one candidate (SFT, SePPO)

# HPDv2 train.json: a list of {prompt, file_path: [..], human_preference: [0/1 ..]} (1 = preferred).
HPDV2_KEYS = ("prompt", "file_path", "human_preference")
