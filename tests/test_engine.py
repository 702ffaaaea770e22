"""`kd cache-teachers` and `kd distill` end to end through the CLI, on tiny models and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import jobs
import kit
from clirun import kd
from kdcli.cache import check_cache
from kdcli.errors import CacheError
from kdcli.rundir import read_json


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "bert": kit.make_model_dir(root, "bert", "sequence-classification", num_labels=3, layers=4),
        "roberta": kit.make_model_dir(root, "roberta", "sequence-classification", num_labels=3, layers=2),
        "t5": kit.make_model_dir(root, "t5", "seq2seq", layers=2),
    }


@pytest.fixture
def workdir(here) -> Path:
    jobs.write_sentences(here / "sentences.jsonl", 60)
    with open("questions.jsonl", "w") as handle:
        for i in range(60):
            handle.write(json.dumps({"text": f"which one is right {i}?", "a": f"red {i}", "b": f"blue {i}",
                                     "c": f"green {i}", "label": i % 3}) + "\n")
    return here


def classify_recipe(models: dict[str, Path], roberta: bool = True, **top) -> Path:
    """Two teachers (bert fine-tuned first, with a hidden map; roberta as it is); ``top``: more top-level keys."""
    teachers = {"bert": {"ref": str(models["bert"]), "finetune": {"epochs": 2, "batch_size": 8, "lr": 1e-3},
                         "hidden": {"map": "skip"}}}
    if roberta:
        teachers["roberta"] = {"ref": str(models["roberta"])}
    return jobs.write_recipe("classify.toml", {
        "name": "cls", "task": "classify",
        "data": {"format": "jsonl", "path": "sentences.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "bert", "layers": [0, 2]},
        "teachers": teachers,
        "loss": {"alpha": 0.5, "beta": 0.5},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "eval_every": 16, "checkpoint_every": 32, "log_every": 8},
    } | top)


@pytest.mark.slow
def test_classify_with_two_teachers_one_fine_tuned_first(models, workdir):
    recipe = classify_recipe(models)
    first = kd("distill", str(recipe))
    assert "fine-tuning teacher bert" in first.output
    assert "bert (live), roberta (live)" in first.output
    run = workdir / "runs" / "cls"
    assert read_json(run / "teachers" / "bert" / "done.json")["fingerprint"]
    assert read_json(run / "env.json")["device"] == "cpu"

    # The student is a Hugging Face model with the recipe's label names.
    from transformers import AutoModelForSequenceClassification, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(run / "student")
    assert model.config.num_hidden_layers == 2
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    predicted = pipeline("text-classification", model=str(run / "student"))("sales rose by 3 percent")[0]["label"]
    assert predicted in jobs.LABELS

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["stage"] == "main" and x["kind"] == "train"]
    assert {"ce", "kd", "hidden", "lr", "samples_per_s", "elapsed"} <= train_lines[-1].keys()
    assert any(x["kind"] == "eval" and x["best"] for x in lines if x["stage"] == "main")

    again = kd("distill", str(recipe))
    assert "up to date" in again.output and "fine-tuning" not in again.output

    cached = kd("cache-teachers", str(recipe))
    assert "built" in cached.output
    assert (run / "cache" / "main" / "bert" / "manifest.json").is_file()
    assert "up to date" in kd("cache-teachers", str(recipe)).output
    rerun = kd("distill", str(recipe), "--set", "train.lr=5e-4")
    assert "bert (cache), roberta (cache)" in rerun.output


@pytest.mark.slow
def test_dataset_role_trains_the_student_on_labels_only(models, workdir):
    recipe = classify_recipe(models)
    result = kd("distill", str(recipe), "--no-teachers", "--json")
    assert json.loads(result.stdout)[0]["name"] == "main.dataset"
    assert (workdir / "runs" / "cls" / "dataset" / "config.json").is_file()
    assert not (workdir / "runs" / "cls" / "student").exists()
    assert not (workdir / "runs" / "cls" / "teachers" / "roberta").exists()  # not fine-tuned, not needed


@pytest.mark.slow
def test_a_student_taught_by_one_teacher_alone_equals_one_from_a_recipe_with_only_that_teacher(models, workdir):
    recipe = classify_recipe(models)
    solo = kd("distill", str(recipe), "--teacher", "bert")
    assert "teachers: bert (live)" in solo.output and "roberta" not in solo.output
    run = workdir / "runs" / "cls"
    assert read_json(run / "student-bert" / "training.json")["teachers"] == {"bert": "live"}
    assert not (run / "student").exists() and not (run / "teachers" / "roberta").exists()
    assert "up to date" in kd("distill", str(recipe), "--teacher", "bert").output

    alone = classify_recipe(models, roberta=False, output_dir="other")
    kd("distill", str(alone))
    from safetensors.torch import load_file

    expected = load_file(workdir / "other" / "cls" / "student" / "model.safetensors")
    got = load_file(run / "student-bert" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_teacher_without_a_layer_map_teaches_alone_by_logits_only(models, workdir):
    recipe = classify_recipe(models)
    result = kd("distill", str(recipe), "--teacher", "roberta", "--json")
    assert json.loads(result.stdout)[0]["name"] == "main.student-roberta"
    lines = [json.loads(line) for line in (workdir / "runs" / "cls" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["stage"] == "main.student-roberta" and x["kind"] == "train"]
    assert train and all(x.get("hidden", 0.0) == 0.0 for x in train) and all(x["kd"] > 0 for x in train)


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nobody"], "no teacher named 'nobody'"),
    (["--teacher", "bert", "--no-teachers"], "contradict"),
])
def test_a_wrong_single_teacher_is_refused_before_work(models, workdir, args, message):
    recipe = classify_recipe(models)
    result = kd("distill", str(recipe), *args, code=1)
    assert message in result.output
    assert not (workdir / "runs" / "cls" / "teachers").exists()


@pytest.mark.slow
def test_a_cache_made_for_other_settings_is_refused_naming_the_field(models, workdir):
    recipe = classify_recipe(models)
    kd("cache-teachers", str(recipe))
    from kdcli import recipe as recipe_mod
    from kdcli import teachers
    from kdcli.data.stage import stage_data
    from kdcli.rundir import RunDir

    changed = recipe_mod.load(recipe, ["teachers.roberta.dtype=bfloat16"])
    run = RunDir.for_recipe(changed)
    stage = changed.resolved_stages()[0]
    data = stage_data(changed, run, stage)
    identity, _ = teachers.cache_identity(changed, run, stage, "roberta", data)
    with pytest.raises(CacheError, match="dtype = 'auto', but the recipe now gives 'bfloat16'"):
        check_cache(run.cache("main", "roberta"), identity, "roberta")
    result = kd("distill", str(recipe), "--set", "teachers.roberta.dtype=bfloat16")
    assert "using the live teacher" in result.output


@pytest.mark.slow
def test_an_incomplete_cache_is_never_taken_for_a_whole_one(models, workdir):
    recipe = classify_recipe(models)
    kd("cache-teachers", str(recipe))
    cache = workdir / "runs" / "cls" / "cache" / "main" / "roberta"
    (cache / "train-00000.safetensors").unlink()
    said = " ".join(kd("distill", str(recipe)).output.split())  # rich wraps long lines
    assert "train-00000.safetensors is missing" in said and "roberta (live)" in said


def _flip(offset: int):
    def damage(cache: Path) -> None:
        data = bytearray((cache / "train-00000.safetensors").read_bytes())
        data[offset] ^= 0x01
        (cache / "train-00000.safetensors").write_bytes(bytes(data))

    return damage


def _edit_manifest(edit):
    def damage(cache: Path) -> None:
        manifest = read_json(cache / "manifest.json")
        (cache / "manifest.json").write_text(json.dumps(edit(manifest)))

    return damage


CACHE_DAMAGE = {
    # (what is done to the cache, what kd says about it)
    "a data byte flipped": (_flip(-5), "train-00000.safetensors is not the file that was written"),
    "a header byte flipped": (_flip(12), "train-00000.safetensors is not the file that was written"),
    "a shard truncated": (lambda c: (c / "train-00000.safetensors").write_bytes(
        (c / "train-00000.safetensors").read_bytes()[:100]), "train-00000.safetensors is not the file"),
    "the manifest a list": (_edit_manifest(lambda m: [m]), "manifest.json holds a list, not a manifest"),
    "no train shards": (_edit_manifest(lambda m: m | {"splits": m["splits"] | {"train": {"shards": []}}}),
                        "its train shards hold 0 rows, the train split has"),
    "a validation shard listed as train": (
        _edit_manifest(lambda m: m | {"splits": m["splits"] | {"train": {"shards": ["validation-00000.safetensors"]}}}),
        "'validation-00000.safetensors' is not a train shard"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_a_damaged_cache_is_never_used_and_cache_teachers_rebuilds_it(case, models, workdir):
    recipe = jobs.write_recipe("one.toml", {
        "name": "one", "task": "classify",
        "data": {"format": "jsonl", "path": "sentences.jsonl", "label_names": jobs.LABELS},
        "student": {"ref": str(models["roberta"])}, "teachers": {"t": {"ref": str(models["roberta"])}},
        "train": {"max_steps": 2, "batch_size": 8, "eval_every": 400},
    })
    kd("cache-teachers", str(recipe))
    cache = workdir / "runs" / "one" / "cache" / "main" / "t"
    written = (cache / "train-00000.safetensors").read_bytes()
    damage, says = CACHE_DAMAGE[case]
    damage(cache)
    used = " ".join(kd("distill", str(recipe)).output.split())
    assert f"is damaged: {says}" in used and "t (live)" in used
    rebuilt = " ".join(kd("cache-teachers", str(recipe)).output.split())
    assert "rebuilding the cache of t" in rebuilt and says in rebuilt
    assert (cache / "train-00000.safetensors").read_bytes() == written


def test_a_shard_damaged_after_the_check_is_a_cache_error_not_a_crash(tmp_path):
    from kdcli.cache import CachedTeacher

    (tmp_path / "train-00000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (tmp_path / "manifest.json").write_text(json.dumps({"cache_format": 3, "task": "classify",
                                                        "splits": {"train": {"shards": ["train-00000.safetensors"]}}}))
    with pytest.raises(CacheError, match="cannot be read .*SafetensorError"):
        CachedTeacher(tmp_path)


@pytest.mark.slow
def test_two_stage_choice_with_a_seq2seq_student(models, workdir):
    jobs.write_recipe("choice.toml", {
        "name": "mc", "task": "choice",
        "data": {"format": "jsonl", "path": "questions.jsonl",
                 "columns": {"text": "text", "label": "label", "options": ["a", "b", "c"]}},
        "student": {"ref": str(models["t5"])},
        "teachers": {"big": {"ref": str(models["t5"])}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 24},
        "stages": [{"name": "labels", "teachers": [], "loss": {"alpha": 1.0}},
                   {"name": "distil", "loss": {"alpha": 0.5, "divergence": "jsd"}}],
    })
    result = kd("distill", "choice.toml")
    run = workdir / "runs" / "mc"
    assert (run / "stages" / "labels" / "student" / "done.json").is_file()
    assert (run / "stages" / "distil" / "student" / "done.json").is_file()
    assert read_json(run / "student" / "training.json")["stage"] == "distil"
    assert "big (live)" in result.output
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"labels", "distil"}
    assert "up to date" in kd("distill", "choice.toml").output

    # Stage 2 starts from stage 1's best student, not from the pretrained one: with a learning rate
    # too small to move a float32 weight, stage 2 ends with stage 1's weights, which training changed.
    from safetensors.torch import load_file

    first = load_file(run / "stages" / "labels" / "student" / "model.safetensors")
    pretrained = load_file(models["t5"] / "model.safetensors")
    assert any(not torch.equal(first[k], pretrained[k]) for k in first if k in pretrained)
    jobs.write_recipe("still.toml", {"stages": {"1": {"train": {"lr": 1e-30, "warmup_ratio": 0.0}}}})
    kd("distill", "choice.toml", "--params", "still.toml")
    second = load_file(run / "stages" / "distil" / "student" / "model.safetensors")
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_mismatched_label_count_is_refused_before_training(models, workdir, tmp_path):
    recipe = classify_recipe(models)
    two = kit.make_model_dir(tmp_path / "two", "roberta", "sequence-classification", num_labels=2, layers=2)
    result = kd("distill", str(recipe), "--set", f'teachers.roberta.ref="{two}"', code=1)
    assert "error:" in result.output and "2 labels" in result.output
    assert not (workdir / "runs" / "cls" / "checkpoints").exists()  # not even the teacher was fine-tuned


def test_a_layer_map_out_of_range_is_refused_before_training(models, workdir):
    recipe = classify_recipe(models)
    result = kd("distill", str(recipe), "--set", 'teachers.bert.hidden={map = "pairs", pairs = [[0, 9]]}', code=1)
    assert "teacher layer 9 is out of range" in result.output
    assert not (workdir / "runs" / "cls" / "checkpoints").exists()


@pytest.mark.slow
def test_an_8bit_teacher_caches_logits_close_to_the_full_precision_teacher(minilm_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from kdcli.cache import LiveTeacher, build_cache
    from kdcli.job import TeacherSettings
    from kdcli.models import load_task_model
    from kdcli.recipe import TeacherConfig

    rows = jobs.rows(24)
    caches = {}
    for name, eight in (("fp32", False), ("int8", True)):
        torch.manual_seed(0)  # the same freshly initialised head for both
        teacher = load_task_model(TeacherConfig(ref=str(minilm_dir), load_in_8bit=eight, finetune={}), "classify", 3)
        build_cache(tmp_path / name, LiveTeacher(teacher, TeacherSettings(max_length=32)), {"train": rows}, {},
                    batch_size=8)
        from safetensors.torch import load_file

        caches[name] = load_file(tmp_path / name / "train-00000.safetensors")["logits"]
    assert (caches["fp32"] - caches["int8"]).abs().max() < 0.05
    assert (caches["fp32"].argmax(-1) == caches["int8"].argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_kd_run_does_every_step_and_a_second_run_reuses_them(models, workdir):
    recipe = classify_recipe(models, single_teacher_students=["roberta"],
                             bench={"batch_sizes": [1, 4], "iters": 3, "max_seconds": 1, "warmup": 1,
                                    "threads": 1})
    first = kd("run", str(recipe))
    run = workdir / "runs" / "cls"
    assert "student taught by roberta alone" in first.output
    for role in ("teacher:bert", "teacher:roberta", "baseline", "dataset", "student:roberta", "student"):
        assert run.joinpath("eval", role.replace(":", "-") + ".json").is_file(), role
        assert run.joinpath("bench", role.replace(":", "-") + ".json").is_file(), role
    assert "student" in first.output and "compare" in first.output
    steps = first.output[first.output.index("wall time by step"):]
    for title in ("prepare", "teachers: fine-tune", "teachers: cache", "distil: student trained on the dataset alone",
                  "distil: student", "evaluate", "benchmark", "compare", "total"):
        assert f"│ {title} " in steps, title
    # Each distillation's whole stage, beside its optimizer steps: the wall pace is never the faster one.
    done = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "done"]
    assert {record["stage"] for record in done} == {"main", "main.dataset", "main.student-roberta"}
    for record in done:
        assert 0 < record["wall_samples_per_s"] <= record["samples_per_s"] and record["wall_seconds"] > 0, record
        assert record["wall_samples_per_s"] == pytest.approx(record["samples"] / record["wall_seconds"])
    assert "samples/s wall" in first.output
    second = kd("run", str(recipe))
    assert second.output.count("up to date") >= 10  # prepare, three distils, 6 evals
    assert "bench: every role up to date" in second.output and "wall time by step" in second.output
    assert "fine-tuning" not in second.output
