"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image tokens -> BERT-base text encoder with cross-attention
-> [CLS] feature -> a 5-layer affine MLP head -> (r - mean) / std.

Reference read for facts: THUDM/ImageReward (ImageReward/ImageReward.py, models/BLIP/*, med_config.json).
We do not depend on the `image-reward` package (old pins, breaks on transformers >= 4.56, downloads a
tokenizer at construction). The weights are hosted in transformers' BLIP modules (`BlipVisionModel`,
`BlipTextModel` without pooler) plus our own head, through the documented key map `REFERENCE_KEY_MAP`.
Loading is strict: any reference key that the map does not place, or any parameter left unfilled, is an
error naming the keys (the reference itself loaded with strict=False, which hides misnamed keys).

Computation, as in the reference `score`/`inference_rank`:
- text: BERT uncased WordPiece + the two BLIP special tokens ([DEC] bos, [ENC]), padded/truncated to
  35 tokens; the first token stays [CLS].
- image: torchvision Resize(224, bicubic) of the shorter side, CenterCrop(224), RGB, ToTensor, OpenAI
  mean/std; all 197 image tokens are attended with an all-ones mask.
- text encoder in bidirectional ("multimodal") mode; feature = last_hidden_state[:, 0] cast to fp32.
- reward = (MLP(feature) - 0.16717362830052426) / 1.0333394966054072; the MLP has no activations.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from diffalign.rewards._common import (
    TextCachingScorer,
    load_torch_state_dict,
    resolve_checkpoint_file,
    resolve_device,
    resolve_dtype,
)
from diffalign.rewards._hf_clip import openai_clip_image_transform
from diffalign.rewards.base import register_scorer

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
BERT_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
HEAD_DIMS = (1024, 128, 64, 16, 1)

# Reference checkpoint layout (left) -> our module (right), applied in order, first match wins.
# `ImageRewardModel` = {vision: BlipVisionModel, text: BlipTextModel(add_pooling_layer=False), head}.
REFERENCE_KEY_MAP: list[tuple[str, str]] = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.embeddings.patch_embedding.\1"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (
        r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$",
        r"vision.encoder.layers.\1.self_attn.projection.\2",
    ),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"^blip\.visual_encoder\.norm\.(weight|bias)$", r"vision.post_layernorm.\1"),
    # BLIP's "med" BERT and transformers' BlipText use the same names below the prefix.
    (r"^blip\.text_encoder\.((embeddings|encoder)\..+)$", r"text.\1"),
    (r"^mlp\.layers\.(\d+)\.(weight|bias)$", r"head.\1.\2"),
]
# Present in the reference checkpoint, not used to compute the reward: dropped on purpose.
REFERENCE_DROPPED = [
    r"^blip\.text_encoder\.embeddings\.position_ids$",  # a buffer (persistent there, non-persistent in HF)
    r"^blip\.(vision_proj|text_proj)\.(weight|bias)$",  # ITC projections, unused by the reward
]


def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a reference-layout ImageReward state dict to `ImageRewardModel` keys. A key that is neither
    mapped nor in the dropped list raises KeyError naming it."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if any(re.match(p, key) for p in REFERENCE_DROPPED):
            continue
        for pattern, repl in REFERENCE_KEY_MAP:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"ImageReward checkpoint has {len(unknown)} unexpected key(s): {unknown[:20]}")
    return out


def make_head(in_features: int) -> nn.Sequential:
    """The reference head's layout (Dropouts at indices 1, 3, 5 keep its state-dict indices 0,2,4,6,7)."""
    d = HEAD_DIMS
    return nn.Sequential(
        nn.Linear(in_features, d[0]),
        nn.Dropout(0.2),
        nn.Linear(d[0], d[1]),
        nn.Dropout(0.2),
        nn.Linear(d[1], d[2]),
        nn.Dropout(0.1),
        nn.Linear(d[2], d[3]),
        nn.Linear(d[3], d[4]),
    )


def blip_configs(tiny: bool = False, vocab_size: int = 30524):
    """(BlipVisionConfig, BlipTextConfig) for ViT-L/16 + BERT-base with cross-attention to width 1024
    (the values of the reference med_config.json / create_vit('large')), or toy sizes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    if tiny:
        v = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32)
        t = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        t["max_position_embeddings"] = 40
    else:
        v = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224)
        t = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        t["max_position_embeddings"] = 512
    vision = BlipVisionConfig(**v, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(
        **t,
        vocab_size=vocab_size,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        encoder_hidden_size=vision.hidden_size,
        is_decoder=True,  # needed to BUILD the cross-attention; forward runs bidirectional (is_decoder=False)
        pad_token_id=0,
        bos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = make_head(text_config.hidden_size)

    def features(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        feat = self.features(pixel_values, input_ids, attention_mask)
        reward = self.head(feat.to(self.head[0].weight.dtype)).float().squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD

    def load_reference_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        mapped = convert_reference_state_dict(state_dict)
        missing = sorted(set(self.state_dict()) - set(mapped))
        if missing:
            raise KeyError(f"ImageReward checkpoint is missing {len(missing)} key(s): {missing[:20]}")
        self.load_state_dict(mapped, strict=True)  # also checks shapes


def add_blip_special_tokens(tokenizer):
    """BLIP's init_tokenizer: [DEC] as bos (id 30522 on bert-base-uncased), [ENC] as an extra special token."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tiny_bert_tokenizer():
    """A real (WordPiece) BertTokenizer over a toy vocabulary: specials, a few words, letters, ##letters."""
    import string

    from transformers import BertTokenizer

    words = ["a", "the", "of", "cat", "dog", "photo", "painting", "red", "blue", "with", "on", "and"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [c for c in string.ascii_lowercase + string.digits + ".,!?'-" if c not in vocab]
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    return add_blip_special_tokens(BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}))


class ImageRewardScorer(TextCachingScorer):
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device=None, dtype=None, batch_size: int = 32):
        super().__init__(batch_size=batch_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        model.head.float()  # the reference casts the [CLS] feature to fp32 before the head
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = openai_clip_image_transform(model.vision.config.image_size)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        # BERT runs per (image, prompt) through cross-attention, so only tokenisation can be shared.
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        return torch.stack([tok["input_ids"], tok["attention_mask"]], dim=1)  # [M, 2, 35]

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        tokens = self._cached_text(prompts).to(self.device)
        pixels = self.image_transform(images).to(device=self.device, dtype=self.dtype)
        return self.model(pixels, tokens[:, 0], tokens[:, 1])


def _spread_init(model: nn.Module) -> None:
    # transformers' init (std 0.02) makes a toy model's reward almost constant across images; widen it
    # so tiny-model tests and benchmarks see image- and prompt-dependent scores.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith(("class_embedding", "position_embedding")):
                p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5)


@register_scorer("imagereward")
def build_imagereward(
    checkpoint=None,
    tokenizer: str | None = BERT_TOKENIZER,
    device=None,
    dtype=None,
    batch_size: int = 32,
    tiny: bool = False,
    seed: int = 0,
) -> ImageRewardScorer:
    """ImageReward. `checkpoint`: None (hub `THUDM/ImageReward` ImageReward.pt), a reference-layout .pt
    file, or a folder holding ImageReward.pt. `tokenizer`: hub id or local folder of a BERT uncased
    tokenizer (BLIP's two special tokens are added here). `tiny=True`: toy sizes and toy WordPiece vocab
    (random weights, or loaded from a tiny reference-layout `checkpoint`)."""
    if tiny:
        tok = tiny_bert_tokenizer()
    else:
        from transformers import BertTokenizer

        tok = add_blip_special_tokens(BertTokenizer.from_pretrained(tokenizer))
    vision_config, text_config = blip_configs(tiny=tiny, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = ImageRewardModel(vision_config, text_config)
    if tiny and checkpoint is None:
        _spread_init(model)
    else:
        path = resolve_checkpoint_file(checkpoint, IMAGEREWARD_REPO, IMAGEREWARD_FILE, "ImageReward")
        model.load_reference_state_dict(load_torch_state_dict(path))
    return ImageRewardScorer(model.eval(), tok, device=device, dtype=dtype, batch_size=batch_size)
