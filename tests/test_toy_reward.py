import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import create_scorer
from diffalign.toy import world
from diffalign.toy.reward import accuracy_on_ground_truth, toy_reward_details


def test_accuracy_on_rendered_ground_truth():
    # Measured: 99.07% at 16x16 (5400 renders; misses are the smallest circles read as squares), 100% at 32x32.
    at16 = accuracy_on_ground_truth(num=1800, size=16)
    assert at16["accuracy"] >= 0.985 and at16["colour_accuracy"] == 1.0
    assert at16["min_cleanliness"] == 1.0
    assert accuracy_on_ground_truth(num=900, size=32)["accuracy"] == 1.0


def _wrong(prompt, which):
    ((c, s),) = world.parse_prompt(prompt)
    if which == "colour":
        return f"a {world.COLOURS[(world.COLOURS.index(c) + 1) % 6]} {s}"
    return f"a {c} {world.SHAPES[(world.SHAPES.index(s) + 1) % 3]}"


@pytest.mark.parametrize("which", ["colour", "shape"])
def test_wrong_renders_score_lower_and_are_incorrect(which):
    prompts = [world.all_prompts()[i % 18] for i in range(360)]
    seeds = list(range(360))
    right = toy_reward_details(world.render_batch(prompts, seeds, 32), prompts)
    wrong_imgs = world.render_batch([_wrong(p, which) for p in prompts], seeds, 32)
    wrong = toy_reward_details(wrong_imgs, prompts)
    assert (wrong["score"] < right["score"]).all()
    assert not wrong["correct"].any()
    assert not wrong[f"{which}_correct"].any()
    other = "shape" if which == "colour" else "colour"
    assert wrong[f"{other}_correct"].all()


def test_speckle_lowers_cleanliness_and_score():
    prompts = world.all_prompts()
    imgs = world.render_batch(prompts, range(18), 16)
    clean = toy_reward_details(imgs, prompts)
    speckled = imgs.copy()
    rng = np.random.default_rng(0)
    for img in speckled:
        bg = np.argwhere(img.max(-1) == 0)
        pick = bg[rng.choice(len(bg), 12, replace=False)]
        img[pick[:, 0], pick[:, 1]] = 90  # grey speckle at 0.35, under the 0.4 foreground threshold
    dirty = toy_reward_details(speckled, prompts)
    assert (clean["cleanliness"] == 1.0).all()
    assert (dirty["cleanliness"] < 0.6).all()
    assert (dirty["score"] < clean["score"] - 0.3).all()
    assert (dirty["correct"] == clean["correct"]).all()  # speckle does not change what the object is


def test_empty_and_unsupported_inputs():
    d = toy_reward_details(np.zeros((2, 16, 16, 3), np.uint8), "a red circle")
    assert (d["score"] == 0).all() and not d["correct"].any() and (d["cleanliness"] == 1).all()
    with pytest.raises(NotImplementedError):
        toy_reward_details(np.zeros((1, 16, 16, 3), np.uint8), ["a red circle and a blue square"])
    with pytest.raises(ValueError):
        toy_reward_details(np.zeros((1, 16, 16, 3), np.uint8), ["a dog"])


def test_toy_scorers_are_registered_by_lazy_name():
    import diffalign.rewards
    from diffalign.toy.reward import FIELD_SCORERS, ToyFieldScorer, ToyScorer

    names = {n for n in diffalign.rewards.LAZY_SCORERS if n.startswith("toy")}
    assert names == {"toy", *(f"toy_{f}" for f in FIELD_SCORERS)}
    assert names <= set(diffalign.rewards.available_scorers())
    assert type(create_scorer("toy")) is ToyScorer
    s = create_scorer("toy_correct", batch_size=7, device="cpu")
    assert type(s) is ToyFieldScorer and s.name == "toy_correct" and s.binary and s.batch_size == 7
    with pytest.raises(ValueError, match="registered twice"):
        diffalign.rewards.register_scorer("toy")(ToyScorer)


def test_registered_scorer_accepts_pil_and_tensors():
    scorer = create_scorer("toy")
    prompts = world.all_prompts()
    arr = world.render_batch(prompts, range(18), 16)
    pil = [Image.fromarray(a) for a in arr]
    tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    s1, s2 = scorer.score(pil, prompts), scorer.score(tensor, prompts)
    assert s1.shape == (18,) and torch.allclose(s1, s2)
    assert ((s1 > 0) & (s1 <= 3)).all() and scorer.higher_is_better
    # images of different sizes in one call are scored as if scored apart
    big = [Image.fromarray(a) for a in world.render_batch(prompts, range(18), 32)]
    mixed = scorer.score(pil[:9] + big[9:], prompts)
    assert torch.equal(mixed[:9], s1[:9]) and torch.allclose(mixed[9:], scorer.score(big[9:], prompts[9:]))


def test_speed():
    prompts = [world.all_prompts()[i % 18] for i in range(2000)]
    imgs = world.render_batch(prompts, range(2000), 16)
    toy_reward_details(imgs[:10], prompts[:10])
    t = time.perf_counter()
    toy_reward_details(imgs, prompts)
    ms = (time.perf_counter() - t) / 2000 * 1e3
    assert ms < 0.5, f"{ms:.3f} ms/image"  # measured ~0.03 ms/image on 2 shared cores
