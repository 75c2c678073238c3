"""CLIP-S text: cleaned as OpenAI CLIP / open_clip clean it; CLIPScore on prompts over 77 tokens: the end
token is kept, so the score depends on the prompt (torchmetrics' slicing would not)."""

import pytest
import torch
from _reward_images import make_image

from diffalign.rewards import create_scorer
from diffalign.rewards._hf_clip import clean_clip_text

MESSY = [
    ("fish &amp; chips &lt;3", "fish & chips <3"),
    ("  Fish\t&amp;amp;  chips\n<3 ", "fish & chips <3"),  # double-escaped entity, tabs, newlines, case
    ("a cafÃ© at night", "a café at night"),  # mojibake (UTF-8 read as Latin-1), fixed by ftfy
    ("a photo of a &quot;red&quot; car", 'a photo of a "red" car'),
]


@pytest.fixture(scope="module")
def clip_s():
    return create_scorer("clip-s", tiny=True, device="cpu")


@pytest.mark.parametrize("messy, clean", MESSY)
def test_messy_and_clean_captions_score_identically(clip_s, messy, clean):
    imgs = [make_image(64, 64, seed=1), make_image(40, 72, seed=2)]
    torch.testing.assert_close(clip_s.score(imgs, messy), clip_s.score(imgs, clean), atol=0, rtol=0)
    assert not torch.equal(clip_s.score(imgs, clean), clip_s.score(imgs, "a red circle"))  # text matters


@pytest.mark.parametrize("text", [m for m, _ in MESSY] + ["A Painting, of a DOG!", "x  y\u00a0z", "naïve café"])
def test_tokens_match_open_clips_tokenizer(clip_s, text):
    """Reference: open_clip's SimpleTokenizer (its default 'lower' cleaning, as OpenAI clip.tokenize) on
    the raw text gives the same BPE ids as diffalign's tokenizer on the cleaned text."""
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer().encode("A photo depicts " + text)
    ours = clip_s.tokenizer(clean_clip_text("A photo depicts " + text))["input_ids"]
    assert ours[0] == clip_s.tokenizer.bos_token_id and ours[-1] == clip_s.tokenizer.eos_token_id
    assert ours[1:-1] == ref


def test_clipscore_keeps_transformers_tokenisation_by_default():
    # its reference (torchmetrics) tokenises with transformers' CLIP tokenizer, which does not clean
    assert create_scorer("clipscore", tiny=True, device="cpu").clean_text is False
    assert create_scorer("clipscore", tiny=True, device="cpu", clean_text=True).clean_text is True


# ---------------------------------------------------------------------------------------- > 77 tokens

HEAD_A = "a red fox in the snow, "
HEAD_B = "a blue whale in the sea, "
TAIL = "with " + ", ".join(f"detail number {i}" for i in range(40)) + ", highly detailed"


def test_long_prompt_score_depends_on_its_content():
    s = create_scorer("clipscore", tiny=True, device="cpu")
    a, b = HEAD_A + TAIL, HEAD_B + TAIL
    n = len(s.tokenizer(a)["input_ids"])
    assert n > 77 and len(s.tokenizer(b)["input_ids"]) > 77
    imgs = [make_image(64, 64, seed=3)]
    assert abs(float(s.score(imgs, a)) - float(s.score(imgs, b))) > 1e-3
    ids = s.tokenizer([a], truncation=True, max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == s.tokenizer.eos_token_id  # the end token is kept

    # why: torchmetrics slices the untruncated ids to 77, dropping the end token; with this config's end-token
    # id, CLIP then pools the start token, which (causal attention) sees nothing of the prompt
    full = s.tokenizer([a, b], padding=True, return_tensors="pt")["input_ids"][:, :77]
    assert not (full == s.tokenizer.eos_token_id).any()
    with torch.no_grad():
        feats = s.model.get_text_features(input_ids=full).pooler_output
    torch.testing.assert_close(feats[0], feats[1])
