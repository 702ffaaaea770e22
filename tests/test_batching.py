"""Length-sorted batching of the inference passes (``kdcli.batching``): the batches, the lengths they
are sorted by, and the answers, which are those of the same pass in data order.

What "the same" means: each row's answer is put back at its own index, so predictions (class
indices, greedy texts), the cache's rows, shapes, token ids, lengths and manifest are equal. The
floats are equal up to rounding only, not bit for bit: padding is masked out, so a row's outputs are
mathematically the same in any batch, but a matrix product of another shape sums in another order.
MiniLM's fp32 logits differ by 2e-8 between a sentence alone and in a batch; the tiny models here,
their weights shaken to tell inputs apart, by up to 1e-6. The tests hold fp32 values to 1e-5 and
the cache's fp16 log-probs to one fp16 step (a rounding may fall the other way), everything else to
equality; a validation loss, summed over other batches, to a relative 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kit
from kdcli.batching import in_data_order, length_sorted_batches
from kdcli.cache import LiveTeacher, build_cache
from kdcli.job import TeacherSettings
from kdcli.models import load_task_model
from kdcli.recipe import TeacherConfig
from kdcli.rundir import read_json
from kdcli.tasks import task_kind

CLASSIFY, CHOICE, GENERATE = task_kind("classify"), task_kind("choice"), task_kind("generate")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def data_order(monkeypatch):
    """Run a pass the way it ran before sorting: ``data_order(fn)`` calls ``fn`` with KD_BATCH_ORDER=data."""
    def run(fn):
        with monkeypatch.context() as patch:
            patch.setenv("KD_BATCH_ORDER", "data")
            return fn()
    monkeypatch.delenv("KD_BATCH_ORDER", raising=False)
    return run


def sentences(n: int) -> list[dict]:
    """Classify rows of very different lengths (one to three corpus sentences), labels 0..2."""
    corpus = kit.CORPUS[:20]
    return [{"id": str(i), "text": " ".join(corpus[(7 * i + j) % 20] for j in range(1 + i % 3)), "options": [],
             "label": i % 3, "answers": [], "idx": i} for i in range(n)]


def questions(n: int) -> list[dict]:
    """Generate rows whose prompts and answers differ in length."""
    corpus = kit.CORPUS[:20]
    answers = [["Paris"], ["Mars", "the red planet"], ["William Shakespeare"], ["eight"], ["the river Nile in Egypt"]]
    return [{"id": str(i), "text": f"{corpus[(3 * i) % 20] if i % 2 else ''} question {i}?".strip(), "options": [],
             "label": -1, "answers": answers[i % 5], "idx": i} for i in range(n)]


def choices(n: int) -> list[dict]:
    corpus = kit.CORPUS[:20]
    return [{"id": str(i), "text": corpus[i % 20], "options": [corpus[(i + 5) % 20][: 10 + 7 * (i % 4)], "maybe"],
             "label": i % 2, "answers": [], "idx": i} for i in range(n)]


def chat(rows: list[dict]) -> list[dict]:
    return [dict(row, messages=[{"role": "user", "content": row["text"]}]) for row in rows]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching-models")
    made = {
        "bert": kit.make_model_dir(root, "bert", "sequence-classification", layers=2),
        "bert-mc": kit.make_model_dir(root, "bert", "multiple-choice", num_labels=2, layers=2),
        "llama": kit.make_model_dir(root, "llama", "causal", layers=2),
        "t5": kit.make_model_dir(root, "t5", "seq2seq", layers=2),
    }
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(made["llama"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(made["llama"])
    return made


def load(path: Path, task: str, classes: int, noise: float = 0.0):
    """The model, its new head the same every time; ``noise`` moves every weight (seeded), so that a
    tiny untrained classifier tells its inputs apart instead of giving all of them one class."""
    torch.manual_seed(0)
    model = load_task_model(TeacherConfig(ref=str(path), finetune={}), task, classes)
    model.model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.model.parameters() if noise else []:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return model


# --------------------------------------------------------------------------- the helper


def test_batches_run_longest_first_and_ties_keep_data_order():
    assert length_sorted_batches([3, 9, 3, 5, 9, 1, 3], 3) == [[1, 4, 3], [0, 2, 6], [5]]
    assert length_sorted_batches([], 4) == []
    assert length_sorted_batches([2, 2, 2], 8) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        length_sorted_batches([1], 0)


def test_answers_go_back_to_data_order(data_order):
    lengths = [4, 1, 7, 7, 2, 9, 4]
    batches = length_sorted_batches(lengths, 2)
    assert in_data_order(batches, [[f"row {i}" for i in index] for index in batches]) == [
        f"row {i}" for i in range(7)]
    assert data_order(lambda: length_sorted_batches(lengths, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="gave 1 answers"):
        in_data_order([[0, 1]], [["a"]])
    with pytest.raises(ValueError, match="once each"):
        in_data_order([[0, 1], [1]], [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="2 batches gave 1"):
        in_data_order([[0], [1]], [["a"]])


# --------------------------------------------------------------------------- lengths


def width(batch: dict) -> int:
    """The tokens one example takes in an encoded batch of that example alone."""
    tokens = batch["attention_mask"].shape[-1]
    return tokens + batch["labels"].shape[-1] if "decoder_input_ids" in batch and batch["labels"].dim() == 2 else tokens


@pytest.mark.parametrize("case", ["classify", "choice-multiple-choice", "choice-causal", "choice-seq2seq",
                                  "generate-causal", "generate-causal-chat", "generate-seq2seq"])
def test_lengths_are_the_tokens_encode_gives_the_model(models, case):
    task, rows, model = {
        "classify": (CLASSIFY, sentences(9), ("bert", "classify", 3)),
        "choice-multiple-choice": (CHOICE, choices(9), ("bert-mc", "choice", 2)),
        "choice-causal": (CHOICE, choices(9), ("llama", "choice", 2)),
        "choice-seq2seq": (CHOICE, choices(9), ("t5", "choice", 2)),
        "generate-causal": (GENERATE, questions(9), ("llama", "generate", 0)),
        "generate-causal-chat": (GENERATE, chat(questions(9)), ("llama", "generate", 0)),
        "generate-seq2seq": (GENERATE, questions(9), ("t5", "generate", 0)),
    }[case]
    path, name, classes = model
    model = load(models[path], name, classes)
    lengths = task.lengths(model, rows, 64, None, 6)
    assert lengths == [width(task.encode(model, [row], 64, None, 6)) for row in rows]
    assert len(set(lengths)) > 3, lengths  # the rows do differ, so sorting them matters
    if task is GENERATE:
        prompts = model.prompt_lengths(rows, 64)
        assert prompts == [model.encode_prompts([row], 64)["attention_mask"].shape[-1] for row in rows]
        sequence = TeacherSettings(max_length=64, kd_level="sequence", answer_max_length=6)
        assert task.teacher_lengths(model, rows, sequence) == prompts  # greedy answers follow the prompt alone
        token = TeacherSettings(max_length=64, answer_max_length=6)
        assert task.teacher_lengths(model, rows, token) == lengths


# --------------------------------------------------------------------------- the passes: sorted = data order


def test_classify_predictions_and_validation_are_those_of_data_order(models, data_order):
    model, rows = load(models["bert"], "classify", 3, noise=0.2), sentences(40)
    assert length_sorted_batches(CLASSIFY.lengths(model, rows, 64), 8) != data_order(
        lambda: length_sorted_batches(CLASSIFY.lengths(model, rows, 64), 8))  # the two runs batch differently

    def both(fn):
        return fn(), data_order(fn)

    sorted_answers, plain_answers = both(lambda: CLASSIFY.predict(model, rows, 8, 64, None, 0))
    assert sorted_answers == plain_answers and len(set(sorted_answers)) > 1
    sorted_scores, plain_scores = both(lambda: CLASSIFY.validate(model, rows, 8, 64, None, "f1", 0))
    assert sorted_scores["accuracy"] == plain_scores["accuracy"] and sorted_scores["f1"] == plain_scores["f1"]
    assert sorted_scores["loss"] == pytest.approx(plain_scores["loss"], rel=1e-5)  # summed in another order
    choice = load(models["bert-mc"], "choice", 2, noise=0.2)
    chosen = CHOICE.predict(choice, choices(20), 4, 64, None, 0)
    assert chosen == data_order(lambda: CHOICE.predict(choice, choices(20), 4, 64, None, 0)) and len(set(chosen)) > 1


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_answers_and_gold_loss_are_those_of_data_order(models, family, data_order):
    model = load(models[family], "generate", 0)
    rows = questions(24)
    answers = GENERATE.predict(model, rows, 8, 32, None, 6)
    assert answers == data_order(lambda: GENERATE.predict(model, rows, 8, 32, None, 6))
    assert len(set(answers)) > 1  # an untrained model still answers differently to different prompts
    # Left padding (causal): each answer is the one the prompt gets alone, whatever its batch.
    assert answers[:4] == [model.generate([row], 6, 32, None, batch_size=1)[0] for row in rows[:4]]
    loss = GENERATE.gold_loss(model, rows, 8, 32, None, 6)
    assert loss == pytest.approx(data_order(lambda: GENERATE.gold_loss(model, rows, 8, 32, None, 6)), rel=1e-5)
    if family == "llama":
        talk = chat(rows)
        assert model.generate(talk, 6, 32, None, 8) == data_order(lambda: model.generate(talk, 6, 32, None, 8))


def cache_files(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    manifest = read_json(path / "manifest.json")
    shards = {name: load_file(path / name) for info in manifest["splits"].values() for name in info["shards"]
              if name.endswith(".safetensors")}
    timing = ("seconds", "rows_per_second", "sha256", "bytes")  # when it ran, and bytes rounded otherwise
    return shards, {k: v for k, v in manifest.items() if k not in timing}


def test_a_classify_cache_holds_the_rows_of_data_order(models, tmp_path, data_order):
    teacher = LiveTeacher(load(models["bert"], "classify", 3, noise=0.2),
                          TeacherSettings(hidden_layers=(0, 1), max_length=64))
    splits = {"train": sentences(40), "validation": sentences(13)}
    build_cache(tmp_path / "sorted", teacher, splits, {}, batch_size=8)
    data_order(lambda: build_cache(tmp_path / "plain", teacher, splits, {}, batch_size=8))
    (mine, manifest), (theirs, plain_manifest) = cache_files(tmp_path / "sorted"), cache_files(tmp_path / "plain")
    assert manifest == plain_manifest and mine.keys() == theirs.keys() == {"train-00000.safetensors",
                                                                            "validation-00000.safetensors"}
    for name, tensors in mine.items():
        assert tensors.keys() == theirs[name].keys() == {"logits", "hidden.0", "hidden.1"}
        assert torch.equal(tensors["logits"].argmax(-1), theirs[name]["logits"].argmax(-1)), name
        for key, value in tensors.items():
            torch.testing.assert_close(value, theirs[name][key], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
    # Row i is row i's answer: what the teacher says about it alone.
    alone = teacher([splits["train"][5]], "train")
    torch.testing.assert_close(mine["train-00000.safetensors"]["logits"][5], alone.logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kd_level", ["token", "sequence"])
def test_a_generate_cache_holds_the_rows_of_data_order(models, tmp_path, kd_level, data_order):
    teacher = LiveTeacher(load(models["llama"], "generate", 0),
                          TeacherSettings(max_length=32, kd_level=kd_level, top_k=8, answer_max_length=6))
    splits = {"train": questions(30), "validation": questions(7)}
    build_cache(tmp_path / "sorted", teacher, splits, {}, batch_size=8)
    data_order(lambda: build_cache(tmp_path / "plain", teacher, splits, {}, batch_size=8))
    (mine, manifest), (theirs, plain_manifest) = cache_files(tmp_path / "sorted"), cache_files(tmp_path / "plain")
    assert manifest == plain_manifest  # rows, tokens, bytes per token, the teacher's accuracy
    if kd_level == "sequence":
        for split in splits:
            answers = read_json(tmp_path / "sorted" / f"{split}-answers.json")
            assert answers == read_json(tmp_path / "plain" / f"{split}-answers.json") and len(set(answers)) > 1
        return
    for name, tensors in mine.items():
        assert torch.equal(tensors["lengths"], theirs[name]["lengths"]) and torch.equal(tensors["ids"],
                                                                                        theirs[name]["ids"]), name
        # fp16 log-probs (sign bits carry ids): at most one fp16 step apart, where a rounding fell the other way
        ours, plain = tensors["logprobs"].float().abs(), theirs[name]["logprobs"].float().abs()
        assert torch.equal(tensors["logprobs"].float().sign(), theirs[name]["logprobs"].float().sign()), name
        torch.testing.assert_close(ours, plain, rtol=2**-10, atol=2**-24, msg=name)
