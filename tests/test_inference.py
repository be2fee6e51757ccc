"""`vlp.load`, `vlp predict`, `vlp embed` on tiny runs of every registered method (one optimizer step each,
shared by the module): embeddings, scores against the evaluation code's own scoring of the same pairs,
rankings, predictions against `vlp eval`'s accuracy, the VQA result file, and the README example."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlp
from vlp.cli.main import main
from vlp.data.datasets import RetrievalSet
from vlp.data.records import VE_LABELS
from vlp.data.world_tasks import vqa_answer_vocab
from vlp.methods import METHODS
from vlp.models.regions import grid_cell_boxes
from vlp.finetune import task_dataset
from vlp.predict import RECORD_IDS, prediction_data
from vlp.tasks.registry import TASKS
from vlp.tasks.retrieval import compute_retrieval_scores

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
STEP = [
    "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "train.warmup_steps=0",
    "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "data.train_images=40",
    "--set", "data.budget=40", "--set", "data.num_workers=0", "--set", "eval.num_images=4", "--set", "eval.k_rerank=2",
    "--set", "model.vision.depth=1", "--set", "model.vision.image_size=32", "--set", "model.text.depth=1",
    "--set", "model.vision.width=64", "--set", "model.text.width=64", "--set", "model.embed_dim=32",
]
ONE_FUSION_LAYER = ["--set", "model.fusion.depth=1"]
CONFIGS = {  # method -> (shipped config, extra overrides): a registered method without an entry fails below
    "albef": ("albef_tiny", ONE_FUSION_LAYER),
    "clip": ("demo_clip", []),
    "cmal": ("cmal_tiny", ONE_FUSION_LAYER),
    "uniter": ("uniter_tiny", ONE_FUSION_LAYER),
    "vlmixer": ("vlmixer_tiny", ONE_FUSION_LAYER),
    "simla": ("simla_tiny", ["--set", "method.image_vocab_size=8", "--set", "method.tokenizer_images=8",
                             "--set", "method.queue_size=8"]),
}
FINETUNE = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "task.train_size=8", "--set", "task.eval_size=6",
            "--set", "task.eval_splits=[test]"]
TEXTS = ["a red circle", "a blue star and a green square", "two yellow triangles"]


def test_every_registered_method_has_a_tiny_run_here():
    assert set(CONFIGS) == set(METHODS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """method -> run directory, pre-trained on first use (one step)."""
    root = tmp_path_factory.mktemp("inference")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            config, extra = CONFIGS[name]
            with pytest.MonkeyPatch.context() as patch:  # the run's figures (matplotlib, ~2 s each) are not used here
                patch.setattr("vlp.pretrain.plot_loss_curve", lambda *args, **kwargs: None)
                patch.setattr("vlp.pretrain.write_retrieval_figure", lambda *args, **kwargs: None)
                assert main(["pretrain", "--config", config, "--out", str(root / name), *STEP, *extra]) == 0
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="module")
def finetuned(runs, tmp_path_factory):
    """task -> a fine-tuning run of the ALBEF checkpoint (two steps, world data)."""
    root = tmp_path_factory.mktemp("finetuned")
    made: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in made:
            assert main(["finetune", task, "--checkpoint", str(runs("albef")), "--out", str(root / task), *FINETUNE]) == 0
            made[task] = root / task
        return made[task]

    return get


def _images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 48, 3), dtype=np.uint8)) for i in range(count)]


def _reference_scores(model, images: list[Image.Image], texts: list[str], by: str) -> torch.Tensor:
    """(I, T) scores of the pairs by the evaluation code: ITC similarities of `compute_retrieval_scores`,
    ALBEF's ITC -> ITM re-ranking with every text re-ranked, or the "itm_all" scorer of the method."""
    method, max_len = model.method, model.cfg.data.max_text_len
    pixels = torch.stack([model.preprocess(im) for im in images])
    ids, mask = model.tokenizer.encode(texts, max_len, max_words=max_len)
    if "itm_all" in method.retrieval_protocols and by == "itm" and not model.has_itc:
        with torch.no_grad():
            return method.itm_pair_scores(*[r.repeat_interleave(len(texts), 0) for r in method.itm_pair_inputs(pixels, None, None)],
                                          ids.repeat(len(images), 1), mask.repeat(len(images), 1)).view(len(images), -1)
    rset = RetrievalSet(images=pixels, captions=texts, input_ids=ids, attention_mask=mask,
                        txt2img=torch.zeros(len(texts), dtype=torch.long), img2txt=[list(range(len(texts)))] + [[]] * (len(images) - 1))
    scores = compute_retrieval_scores(method.itc_model, rset, batch_size=4, k_rerank=len(texts) if by == "itm" else 0)
    return scores.sim_itc if by == "itc" else scores.score_i2t


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_scores_like_the_evaluation(name, runs):
    model = vlp.load(runs(name))
    assert model.cfg.method.name == name and model.device == torch.device("cpu") and not model.method.training
    images = _images()
    assert model.preprocess(images[1]).shape == (3, 32, 32)
    scores = model.score_matrix(images, TEXTS)
    assert scores.shape == (3, 3)
    torch.testing.assert_close(scores, _reference_scores(model, images, TEXTS, model.scoring), atol=1e-5, rtol=0)
    assert model.score(images[2], TEXTS[1]) == pytest.approx(float(scores[2, 1]), abs=1e-5)
    ranked = model.rank_texts(images[0], TEXTS)
    assert [i for i, _ in ranked] == sorted(range(3), key=lambda i: -float(scores[0, i]))
    assert [s for _, s in ranked] == pytest.approx([float(scores[0, i]) for i, _ in ranked], abs=1e-5)
    assert [s for _, s in model.rank_images(TEXTS[0], images)] == pytest.approx(sorted(scores[:, 0].tolist(), reverse=True),
                                                                                abs=1e-5)
    if model.has_itc:
        assert model.scoring == "itc"
        image_emb, text_emb = model.embed_image(images), model.embed_text(TEXTS)
        assert image_emb.shape == (3, model.cfg.model.embed_dim) == text_emb.shape
        torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(3))
        assert torch.equal(model.embed_text(TEXTS), text_emb)  # deterministic (eval mode)
        torch.testing.assert_close(model.embed_text(TEXTS[2]), text_emb[2:], atol=1e-6, rtol=0)  # batch-independent
    else:
        assert model.scoring == "itm"
        for call in (lambda: model.embed_image(images), lambda: model.embed_text(TEXTS), lambda: model.score(images[0], "x", by="itc")):
            with pytest.raises(ValueError, match=f"method '{name}' has no joint embedding space.*use score / rank_texts"):
                call()


def test_albef_scores_by_its_itm_head_on_request(runs):
    model = vlp.load(runs("albef"))
    images = _images(2)
    itm = model.score_matrix(images, TEXTS, by="itm")
    torch.testing.assert_close(itm, _reference_scores(model, images, TEXTS, "itm"), atol=1e-5, rtol=0)
    assert not torch.allclose(itm, model.score_matrix(images, TEXTS))  # a logit, not the cosine
    with pytest.raises(ValueError, match="by must be 'itc' or 'itm'"):
        model.score(images[0], TEXTS[0], by="cosine")
    with pytest.raises(ValueError, match="no ITM head"):
        vlp.load(runs("clip")).score(images[0], TEXTS[0], by="itm")


def test_region_methods_read_a_user_image_as_grid_cells(runs):
    """A boxless image = `method.grid_regions`² cells: the same scores as ITM at explicit grid boxes."""
    model = vlp.load(runs("cmal"))
    g = model.cfg.method.grid_regions
    image = _images(1)
    ids, mask = model.tokenize(TEXTS)
    pixels = model.preprocess(image[0])[None].expand(len(TEXTS), -1, -1, -1)
    with torch.no_grad():
        boxed = model.method.itm_scores(pixels, grid_cell_boxes(g)[None].expand(len(TEXTS), -1, -1), None, ids, mask)
    torch.testing.assert_close(model.score_matrix(image, TEXTS)[0], boxed, atol=1e-5, rtol=0)


EVAL_KEYS = {"ve": "test/acc", "vqa": "test/acc", "nlvr2": "test/acc", "rec": "test/gt_acc"}
LABELS = {"ve": list(VE_LABELS), "vqa": vqa_answer_vocab(), "nlvr2": ["false", "true"], "rec": None}


@pytest.mark.parametrize("task", sorted(EVAL_KEYS))
def test_predictions_are_what_vlp_eval_scores(task, finetuned, tmp_path, capsys):
    """One line per example (its id, a class of the head or a candidate box, a probability), saved class
    names in task.json, and the task's own metric of the predicted classes = the run's test score."""
    run = finetuned(task)
    assert json.loads((run / "task.json").read_text()) == {"task": task, "labels": LABELS[task]}
    assert (run / "checkpoint" / "task.json").read_text() == (run / "task.json").read_text()  # travels with it
    out = tmp_path / "preds" / f"{task}.jsonl"
    assert main(["predict", task, "--run", str(run), "--out", str(out)]) == 0
    assert f"wrote 6 predictions to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = vlp.load(run)
    assert model.task == task and model.labels == LABELS[task]
    data = prediction_data(model.cfg, "test")
    dataset = task_dataset(model.cfg, data, "test", model.tokenizer)
    assert [r["id"] for r in rows] == [getattr(r, RECORD_IDS[task]) for r in dataset.records]
    assert all(0 < r["score"] <= 1 for r in rows)
    if task == "rec":
        assert all(r["prediction"] == pytest.approx(list(dataset.candidate_boxes(record)[r["region"]]))
                   for r, record in zip(rows, dataset.records))
        classes = [r["region"] for r in rows]
    else:
        classes = [LABELS[task].index(r["prediction"]) for r in rows]
    metrics = TASKS[task].metrics(torch.tensor(classes), dataset)
    assert metrics[EVAL_KEYS[task].split("/")[1].removeprefix("gt_")] == pytest.approx(
        json.loads((run / "eval.json").read_text())[EVAL_KEYS[task]])
    if task == "ve":  # the Python model predicts the same for an example
        record = dataset.records[0]
        label, prob = model.predict(data.images.load(record.image_id), record.hypothesis)
        assert (label, prob) == (rows[0]["prediction"], pytest.approx(rows[0]["score"], abs=1e-5))
        assert main(["predict", "vqa", "--run", str(run), "--out", str(tmp_path / "x.jsonl")]) == 2
        assert "is a ve fine-tuning run: vlp predict vqa needs a `vlp finetune vqa` run" in capsys.readouterr().err
    if task == "rec":
        with pytest.raises(ValueError, match="a rec run predicts from annotation files: vlp predict rec"):
            model.predict(_images(1)[0], "the red circle")


def test_a_finetune_without_task_json_still_loads(finetuned, tmp_path):
    """Runs fine-tuned before task.json existed: recognised by their weights, classes from the training data."""
    old = tmp_path / "old"
    shutil.copytree(finetuned("vqa"), old)
    (old / "task.json").unlink()
    (old / "checkpoint" / "task.json").unlink()
    (old / "checkpoint" / "manifest.json").unlink()  # an older vlp wrote neither
    model = vlp.load(old)
    assert model.task == "vqa" and model.labels == vqa_answer_vocab()
    pretrained = vlp.load(json.loads((old / "eval.json").read_text())["checkpoint"])
    assert pretrained.task is None and pretrained.labels is None
    with pytest.raises(ValueError, match="this run is a pre-training run"):
        pretrained.predict(_images(1)[0], "what?")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        vlp.load(tmp_path / "missing")


def _vqav2_files(root: Path) -> list[str]:
    """Two VQAv2-format questions about two COCO-named images (+ their annotations)."""
    images = root / "val2014"
    images.mkdir(parents=True)
    for n, image in zip((7, 9), _images(2)):
        image.save(images / f"COCO_val2014_{n:012d}.jpg")
    questions = [{"question_id": 70, "image_id": 7, "question": "what color is the circle?"},
                 {"question_id": 91, "image_id": 9, "question": "how many stars are there?"}]
    answers = [{"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(["red"] * 10)]}
               for q in questions]
    (root / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (root / "a.json").write_text(json.dumps({"data_subtype": "val2014", "annotations": answers}))
    return ["--data", "files", "--split", "val", "--set", f"task.image_root={images}",
            "--set", f"task.annotations.val=[{root / 'q.json'}, {root / 'a.json'}]"]


def test_predict_vqa_on_vqav2_files_writes_the_official_format(finetuned, tmp_path):
    run = finetuned("vqa")
    labels = json.loads((run / "task.json").read_text())["labels"]
    assert labels == vqa_answer_vocab()  # the world's answers, saved with the run
    out = tmp_path / "vqa.jsonl"
    assert main(["predict", "vqa", "--run", str(run), "--out", str(out), *_vqav2_files(tmp_path / "coco")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["70", "91"] and all(r["prediction"] in labels for r in rows)
    assert all(0 < r["score"] < 1 for r in rows)
    official = json.loads((tmp_path / "vqa_vqa_results.json").read_text())
    assert official == [{"question_id": 70, "answer": rows[0]["prediction"]},
                        {"question_id": 91, "answer": rows[1]["prediction"]}]


def test_embed_cli_writes_embeddings_and_ids(runs, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in zip(("b.png", "a.jpg", "c.png"), _images()):
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    texts = tmp_path / "captions.txt"
    texts.write_text("a red circle\n\ntwo yellow triangles\n")
    out = tmp_path / "emb"
    assert main(["embed", "--run", str(runs("albef")), "--images", str(folder), "--texts", str(texts),
                 "--out", str(out), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 image embeddings (32-d)" in captured.out and "ignored 1 file" in captured.err
    image_emb, text_emb = np.load(out / "image_embeddings.npy"), np.load(out / "text_embeddings.npy")
    assert image_emb.shape == (3, 32) and text_emb.shape == (2, 32) and image_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    assert json.loads((out / "image_ids.json").read_text()) == ["a.jpg", "b.png", "c.png"]
    assert json.loads((out / "text_ids.json").read_text()) == [{"line": 1, "text": "a red circle"},
                                                               {"line": 3, "text": "two yellow triangles"}]
    model = vlp.load(runs("albef"))
    np.testing.assert_allclose(image_emb[1], model.embed_image([folder / "b.png"])[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(text_emb, model.embed_text(["a red circle", "two yellow triangles"]).numpy(), atol=1e-5)


def test_embed_cli_errors(runs, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _images(1)[0].save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "emb"
    assert main(["embed", "--run", str(runs("albef")), "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot decode image") and "broken.png" in err
    assert not out.exists()  # nothing is written before every image is read
    assert main(["embed", "--run", str(runs("cmal")), "--texts", str(README), "--out", str(out)]) == 2
    assert "method 'cmal' has no joint embedding space" in capsys.readouterr().err
    assert main(["embed", "--run", str(runs("albef")), "--out", str(out)]) == 2
    assert "give --images FOLDER and/or --texts FILE" in capsys.readouterr().err


def test_readme_example_runs_as_written(runs, tmp_path, capsys):
    text = README.read_text()
    marker = "<!-- readme-example: use-a-trained-model -->"
    assert marker in text
    code = re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)
    assert 5 <= len([line for line in code.splitlines() if line.strip()]) <= 8
    image = tmp_path / "scene.png"
    _images(1)[0].save(image)
    assert code.count('"runs/albef"') == 1 and code.count('"scene.png"') == 1
    exec(compile(code.replace('"runs/albef"', repr(str(runs("albef")))).replace('"scene.png"', repr(str(image))),
                 "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    ranked = eval(printed[0])  # [(index, score), ...]
    assert sorted(i for i, _ in ranked) == [0, 1] and ranked[0][1] >= ranked[1][1]
    assert float(printed[1]) == pytest.approx(dict(ranked)[0], abs=1e-5)
