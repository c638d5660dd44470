"""The synthetic shapes data (data/shapes.py), its tokenizer vocabulary (data/vocab.py) and the
classifier that grades pictures against captions (data/classify.py)."""
from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from pocketdiffusion.config import SHAPES as SHAPES_CONFIG
from pocketdiffusion.config import SHAPES_VOCAB_SIZE
from pocketdiffusion.data.bpe import write_bpe
from pocketdiffusion.data.classify import (classify, grade, label_components, score, _hull_area)
from pocketdiffusion.data.shapes import (COLORS, GAP, HELDOUT_SEED, MARGIN, POSITION_CENTRES, RELATIONS,
                                         SHAPE_SDFS, SHAPES, SIZE_RANGES, JITTER, Obj, ObjSpec, Scene, Spec,
                                         caption, dataset, heldout_prompts, parse_caption, random_mask,
                                         render, render_batch, sample_captioned, sample_scene, to_uint8)
from pocketdiffusion.data.vocab import build_shapes_vocab, shapes_tokenizer, template_words
from pocketdiffusion.models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer


def full_spec(scene: Scene) -> Spec:
    """Everything the picture shows, as if the caption stated it all."""
    stated = Scene(scene.background, scene.objects, {"color", "shape", "background", "size", "position"})
    return stated.spec()


@pytest.fixture(scope="module")
def data():
    return dataset(500, seed=123)


@pytest.fixture(scope="module")
def vocab():
    return build_shapes_vocab()


# ---- generator ----------------------------------------------------------------------------------
def test_palette_is_well_separated():
    distances = [np.linalg.norm(np.subtract(COLORS[a], COLORS[b])) for a, b in itertools.combinations(COLORS, 2)]
    assert len(COLORS) >= 10 and min(distances) >= 100
    assert set(SHAPES) == set(SHAPE_SDFS) == {"circle", "square", "triangle", "star", "heart"}


def test_dataset_is_deterministic_from_the_seed(data):
    images, captions, scenes = data
    assert images.shape == (500, 128, 128, 3) and images.dtype == np.uint8
    again = dataset(40, seed=123)
    assert np.array_equal(again[0], images[:40]) and again[1] == captions[:40]  # a prefix of the longer draw
    other = dataset(40, seed=124)
    assert other[1] != captions[:40] and not np.array_equal(other[0], images[:40])


def test_scenes_keep_their_promises():
    """Colours differ from the background and each other; named sizes and positions are where
    the geometry is; two objects never overlap; every shape stays inside the picture."""
    scenes, _ = sample_captioned(np.random.default_rng(5), 3000, two_object_prob=0.4)
    assert {len(s.objects) for s in scenes} == {1, 2}
    for scene in scenes:
        colors = [o.color for o in scene.objects]
        assert scene.background not in colors and len(set(colors)) == len(colors)
        for o in scene.objects:
            low, high = SIZE_RANGES[o.size]
            assert low <= o.extent <= high
            assert all(o.extent / 2 + MARGIN - 1e-9 <= c <= 1 - o.extent / 2 - MARGIN + 1e-9 for c in (o.x, o.y))
        if len(scene.objects) == 1:
            o = scene.objects[0]
            cx, cy = POSITION_CENTRES[o.position]
            # Jitter, plus the clamp that keeps a large shape inside, is all that moves it.
            slack = JITTER + max(0.0, o.extent / 2 + MARGIN - 0.27) + 1e-9
            assert abs(o.x - cx) <= slack and abs(o.y - cy) <= slack
        else:
            a, b = scene.objects
            assert (a.position, b.position) == RELATIONS[scene.relation]
            assert "large" in (a.size, b.size) or a.size == b.size == "small"
            axis_a, axis_b = ((a.x, b.x) if a.position in ("left", "right") else (a.y, b.y))
            side = -1 if a.position in ("left", "top") else 1
            assert side * (axis_a - axis_b) >= (a.extent + b.extent) / 2 + GAP - 1e-9


def test_captions_state_only_true_facts_and_parse_back():
    rng = np.random.default_rng(9)
    scenes, captions = sample_captioned(rng, 3000, two_object_prob=0.3)
    templates = {"on": 0, "with": 0, "comma": 0}
    for scene, text in zip(scenes, captions):
        spec = parse_caption(text)
        assert spec == scene.spec() and spec.stated == scene.stated, text
        truth = full_spec(scene)
        for asked, real in zip(spec.objects, truth.objects):
            assert (asked.shape, asked.color) == (real.shape, real.color)
            assert asked.size in (None, real.size) and asked.position in (None, real.position)
        assert spec.background in (None, scene.background)
        assert parse_caption(f"  {text.upper()}  ") == spec
        if scene.background in text:
            templates["with" if " background with " in text else "comma" if "," in text else "on"] += 1
    assert min(templates.values()) > 400, templates
    assert " an orange" in " ".join(captions)  # the article follows the word
    assert not any(" a orange" in c or c.startswith("a orange") for c in captions)


def test_caption_without_rng_is_the_first_template():
    scene = Scene("blue", [Obj("star", "red", "small", "left", 0.27, 0.5, 0.27)],
                  {"color", "shape", "size", "position", "background"})
    assert caption(scene) == "a small red star on the left on a blue background"
    pair = Scene("white", [Obj("circle", "green", "small", "left", 0.27, 0.5, 0.27),
                           Obj("square", "yellow", "small", "right", 0.73, 0.5, 0.27)], {"color", "shape"})
    assert caption(pair) == "a green circle to the left of a yellow square"
    assert parse_caption("a green circle to the left of a yellow square") == Spec(
        (ObjSpec("circle", "green"), ObjSpec("square", "yellow")), None, "to the left of")


@pytest.mark.parametrize("text", ["", "a dog on a blue background", "a red star a blue circle",
                                  "a red star to the left of", "a red star on the left above a blue heart"])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption(text)


def test_bad_arguments_are_reported():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        sample_scene(np.random.RandomState(0))
    with pytest.raises(ValueError, match="two_object_prob"):
        sample_scene(np.random.default_rng(0), two_object_prob=1.5)
    with pytest.raises(ValueError, match="size must be an int"):
        render(sample_scene(np.random.default_rng(0)), size=8)
    with pytest.raises(TypeError, match="list of Scene"):
        render_batch([])
    with pytest.raises(TypeError, match="must be a str"):
        parse_caption(None)
    with pytest.raises(ValueError, match="object shape 'hexagon' is unknown"):
        render(Scene("blue", [Obj("hexagon", "red", "small", "left", 0.3, 0.5, 0.27)]))
    with pytest.raises(ValueError, match="background 'teal'"):
        render_batch([Scene("teal", [Obj("star", "red", "small", "left", 0.3, 0.5, 0.27)])])
    with pytest.raises(ValueError, match="placed by a relation"):
        caption(Scene("blue", [Obj("star", "red", "small", "left", 0.3, 0.5, 0.27)] * 2))


def test_torch_batch_renderer_equals_numpy_renderer():
    scenes, _ = sample_captioned(np.random.default_rng(3), 120, two_object_prob=0.5)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    batch = render_batch(scenes, size=96)
    assert batch.shape == (120, 3, 96, 96) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    reference = np.stack([render(s, size=96) for s in scenes])  # (B, H, W, 3) uint8
    error = np.abs((batch.permute(0, 2, 3, 1).numpy().astype(np.float64) + 1) / 2 - reference / 255).max()
    assert error <= 1 / 255 + 1e-6, error  # measured: 1/255 at a few rounding ties (float32 vs 64)
    differing = np.abs(to_uint8(batch).astype(int) - reference).max(axis=-1) > 0
    assert differing.mean() < 1e-3


def test_rendered_shapes_cover_the_expected_area():
    """The SDF outlines: a circle of extent e covers pi/4 e^2, a square e^2, the anti-aliasing
    keeps the area to within a fraction of a pixel row."""
    for shape, fill in (("circle", np.pi / 4), ("square", 1.0), ("triangle", np.sqrt(3) / 4)):
        scene = Scene("black", [Obj(shape, "white", "large", "center", 0.5, 0.5, 0.5)])
        covered = render(scene, size=256)[..., 0].astype(np.float64).sum() / 255 - 20 / 255 * 256 ** 2
        expected = fill * (0.5 * 256) ** 2 * (245 - 20) / 255
        assert abs(covered - expected) / expected < 0.01, shape


def test_heldout_prompts_are_fixed_and_state_the_background():
    prompts = heldout_prompts()
    assert len(prompts) == 200 and prompts == heldout_prompts(200, HELDOUT_SEED)
    assert all(spec.background is not None and parse_caption(text) == spec for text, spec in prompts)
    assert any(spec.relation for _, spec in prompts) and any(spec.objects[0].position for _, spec in prompts)
    assert prompts != heldout_prompts(200, seed=0)


def test_random_masks():
    rng = np.random.default_rng(0)
    coverages, kinds = [], set()
    for _ in range(200):
        mask = random_mask(rng, 64)
        assert mask.shape == (64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        coverages.append((mask > 0).mean())
        rows, cols = np.nonzero(mask)
        box_fill = len(rows) / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        kinds.add("rectangle" if box_fill == 1.0 else "ellipse")
    assert 0.15 <= min(coverages) and max(coverages) <= 0.60 and max(coverages) - min(coverages) > 0.3
    assert kinds == {"rectangle", "ellipse"}
    assert random_mask(np.random.default_rng(1), (48, 80)).shape == (48, 80)
    assert np.array_equal(random_mask(np.random.default_rng(2), 32), random_mask(np.random.default_rng(2), 32))


# ---- vocabulary -------------------------------------------------------------------------------
def test_every_template_word_is_one_token(vocab):
    tokens, merges = vocab
    assert len(tokens) == SHAPES_VOCAB_SIZE == SHAPES_CONFIG.text_encoders[0].vocab_size
    assert sorted(tokens.values()) == list(range(SHAPES_VOCAB_SIZE))
    assert tokens[EOS_TOKEN] == SHAPES_VOCAB_SIZE - 1 == SHAPES_CONFIG.text_encoders[0].eos_token_id
    assert tokens[BOS_TOKEN] == SHAPES_VOCAB_SIZE - 2
    tokenizer = CLIPTokenizer(tokens, merges)
    words = template_words()
    assert {"circle", "heart", "triangle", "orange", "background", "above", ","} <= set(words)
    for word in words:
        ids = tokenizer.encode(word)
        assert len(ids) == 1 and ids[0] < SHAPES_VOCAB_SIZE - 2, word


def test_tokenizer_round_trip_from_files(tmp_path, vocab):
    folder = write_bpe(*vocab, tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_folder(tmp_path)
    assert tokenizer.vocab_size == SHAPES_VOCAB_SIZE and tokenizer.eos_id == SHAPES_VOCAB_SIZE - 1
    _, captions = sample_captioned(np.random.default_rng(4), 300, two_object_prob=0.5)
    rows = tokenizer(captions)
    for text, row in zip(captions, rows):
        words = text.replace(",", " ,").split()
        assert row[0] == tokenizer.bos_id and row[len(words) + 1] == tokenizer.eos_id  # one id a word
        assert tokenizer.decode(row) == " ".join(words)
    assert shapes_tokenizer().encode(captions[0]) == tokenizer.encode(captions[0])
    assert (folder / "vocab.json").is_file()


def test_transformers_reads_the_vocabulary_the_same_way(tmp_path, vocab):
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    write_bpe(*vocab, tmp_path)
    hf = HFCLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = CLIPTokenizer(*vocab)
    for text in ["a small red star on a blue background", "a green circle to the left of a yellow square",
                 "an orange heart in the center, white background", "a violet hexagon"]:
        assert hf(text)["input_ids"] == [ours.bos_id] + ours.encode(text) + [ours.eos_id], text


# ---- classifier -------------------------------------------------------------------------------
def degrade(images: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian noise (std 8/255) then a 3x3 box blur, as a generative model's softness."""
    noisy = images.astype(np.float64) + np.random.default_rng(seed).normal(0, 8, images.shape)
    padded = np.pad(noisy, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    blurred = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("degraded,bar", [(False, 0.99), (True, 0.97)])
def test_classifier_reads_generator_pictures(data, degraded, bar):
    images, _, scenes = data
    images = degrade(images, seed=1) if degraded else images
    specs = [full_spec(s) for s in scenes]
    accuracy = score(specs, images)
    assert set(accuracy) == {"color", "shape", "background", "size", "position", "relation", "all"}
    assert min(accuracy.values()) >= bar, accuracy  # measured: 1.0 everywhere, clean and degraded
    counts = [len(classify(im).objects) == len(s.objects) for im, s in zip(images[:100], scenes[:100])]
    assert np.mean(counts) >= bar


def test_grading_catches_wrong_pictures(data):
    images, _, scenes = data
    index = next(i for i, s in enumerate(scenes) if s.relation == "to the left of")
    spec = full_spec(scenes[index])
    assert all(grade(spec, images[index]).values())
    mirrored = grade(spec, np.ascontiguousarray(images[index][:, ::-1]))
    assert mirrored["relation"] is False and mirrored["color"] is False
    single = next(i for i, s in enumerate(scenes) if len(s.objects) == 1 and s.objects[0].position == "left")
    spec = full_spec(scenes[single])
    wrong = Spec((ObjSpec("heart" if spec.objects[0].shape != "heart" else "star",
                          "pink" if spec.objects[0].color != "pink" else "red", spec.objects[0].size, "right"),),
                 "white" if spec.background != "white" else "black")
    assert grade(wrong, images[single]) == {"background": False, "color": False, "shape": False,
                                            "size": True, "position": False}
    blank = np.full((64, 64, 3), COLORS["blue"], dtype=np.uint8)
    assert grade(Spec((ObjSpec("star", "red"),), "blue"), blank) == {"background": True, "color": False,
                                                                   "shape": False}
    with pytest.raises(ValueError, match="one image per spec"):
        score([spec], [])


def test_classifier_rejects_bad_images():
    with pytest.raises(TypeError, match="uint8 array"):
        classify(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="uint8 array"):
        classify(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least 16x16"):
        classify(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="shapes.Spec"):
        grade("a red star", np.zeros((32, 32, 3), dtype=np.uint8))


def _bfs_components(mask: np.ndarray) -> set[frozenset]:
    seen, found = np.zeros_like(mask), set()
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        component, queue = set(), deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            component.add((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.add(frozenset(component))
    return found


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.55, 0.7):
        mask = rng.random((40, 50)) < density
        labels, count = label_components(mask)
        ours = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, count + 1)}
        assert ours == _bfs_components(mask) and (labels > 0).sum() == mask.sum()
    spiral = np.zeros((30, 30), dtype=bool)  # one long winding component
    spiral[::4, :] = True
    spiral[:, 0] = True
    spiral[:, -1] = True
    assert label_components(spiral)[1] == 1


def test_hull_area():
    square = np.ones((5, 7), dtype=bool)
    assert _hull_area(square) == 35.0
    staircase = np.tri(10, dtype=bool)  # row r holds pixels 0..r: 55 pixels
    # hull corners (0,0) (1,0) (10,9) (10,10) (0,10): shoelace area 119 / 2
    assert _hull_area(staircase) == 59.5 and staircase.sum() == 55
