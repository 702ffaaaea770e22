"""`kd export`: a trained model as ONNX, ONNX int8 and PyTorch int8, answering as the model does, and the exports
as roles of `kd eval`, `kd bench` and `kd compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import jobs
from clirun import kd, kd_in
from kdcli import exported, recipe
from kdcli.export import export_role
from kdcli.models import load_task_model
from kdcli.recipe import ModelSpec
from kdcli.report import collect_run
from kdcli.roles import STUDENT, Role, describe, load
from kdcli.rundir import RunDir
from kdcli.tasks import task_kind


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> Path:
    """A run whose student (a tiny BERT) learnt the cue-word sentences well enough to answer them with margins;
    tests work on copies of it."""
    root = tmp_path_factory.mktemp("export-run")
    jobs.write_classify_run(root, tiny("bert", "sequence-classification", num_labels=3, layers=2), name="tiny",
                            rows=120, loss={"alpha": 1.0},
                            train={"max_steps": 40, "batch_size": 8, "lr": 0.01, "eval_every": 160,
                                   "checkpoint_every": 10_000, "log_every": 160})
    kd_in(root, "distill", "recipe.toml")
    return root


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps nothing the asserts read
    return copy


def logits(model, rows: list[dict]) -> torch.Tensor:
    """Class logits in batches of one, five and sixteen rows: a batch of one, and padded ones of several lengths."""
    classify = task_kind("classify")
    out, start = [], 0
    with torch.inference_mode():
        for size in (1, 5, 16, 16):
            batch = classify.encode(model, rows[start : start + size], 32)
            out.append(classify.forward(model, batch).logits.float())
            start += size
    return torch.cat(out)


@pytest.mark.slow
def test_every_format_answers_as_the_student(run):
    loaded = recipe.load(Path("recipe.toml"))
    student = load(loaded, STUDENT, 3)
    rows = jobs.rows(38, seed=7)  # not the rows the export was checked on
    rows[3] = dict(rows[3], text=rows[3]["text"] + " after the board cut jobs and losses widened in the group")
    expected = logits(student, rows)
    sizes = {}
    for fmt in exported.FORMATS:
        result = export_role(loaded, STUDENT, fmt)
        folder = Path(result["path"])
        assert folder == run / "runs" / "tiny" / "export" / f"student-{fmt}" and result["format"] == fmt
        assert result["export_role"] == f"export:student-{fmt}"
        assert result["parameters"] == student.model.num_parameters()
        model = exported.load(folder)
        assert model.cpu_only and model.device.type == "cpu"
        got = logits(model, rows)
        difference = float((got - expected).abs().max())
        check = result["check"]
        assert check["split"] == "test" and check["unit"] == "answers" and 0 < check["compared"] == check["rows"]
        if fmt == "onnx":  # the same arithmetic, rounded otherwise
            assert difference < 1e-4 and check["max_abs_difference"] < 1e-4 and check["argmax_agreement"] == 1.0
        else:  # int8 weights move the logits a little, so only a row whose answer was nearly a tie may change it
            assert difference < 0.5 and 0.0 <= check["argmax_agreement"] <= 1.0
            changed = got.argmax(-1) != expected.argmax(-1)
            top2 = expected.topk(2, dim=-1).values
            per_row = (got - expected).abs().amax(-1)
            assert bool(((top2[:, 0] - top2[:, 1]) <= 2 * per_row)[changed].all())
        if fmt == "onnx-int8":
            import onnx

            operators = {node.op_type for node in onnx.load(folder / "model.onnx").graph.node}
            assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators
        if fmt == "torch-int8":  # 2 blocks of 6 linear layers; the pooler and the classifier stay fp32
            assert result["graph"]["int8_layers"] == 12
            assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.model.modules()) == 12
        sizes[fmt] = result["size_bytes"]
        assert sizes[fmt] == sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".pt"))
    assert sizes["onnx-int8"] < sizes["onnx"]


@pytest.mark.slow
def test_exports_are_roles_of_eval_bench_and_compare(run):
    written = json.loads(kd("export", "recipe.toml", "--format", "onnx-int8", "--json").stdout)
    assert written["path"] == str(run / "runs" / "tiny" / "export" / "student-onnx-int8")
    shown = kd("export", "recipe.toml", "--format", "onnx").stdout
    assert "student exported as onnx" in shown and "--model export:student-onnx" in shown

    student = json.loads(kd("eval", "recipe.toml", "--model", "student", "--json").stdout)
    onnx = json.loads(kd("eval", "recipe.toml", "--model", "export:student-onnx", "--json").stdout)
    assert onnx["metrics"] == student["metrics"] and onnx["agreement"] == student["agreement"]  # the same answers
    assert onnx["model"] == student["model"] + ", ONNX" and onnx["parameters"] == student["parameters"]
    int8 = json.loads(kd("eval", "recipe.toml", "--model", "export:student-onnx-int8", "--json").stdout)
    assert int8["role"] == "export:student-onnx-int8" and int8["n"] == student["n"]
    assert Path("runs/tiny/eval/export-student-onnx-int8.json").is_file()

    for role in ("student", "export:student-onnx", "export:student-onnx-int8"):
        kd("bench", "recipe.toml", "--model", role)
    bench = json.loads(Path("runs/tiny/bench/export-student-onnx-int8.json").read_text())
    assert bench["size_bytes"] == Path("runs/tiny/export/student-onnx-int8/model.onnx").stat().st_size
    assert bench["device"] == "cpu" and bench["parameters"] == student["parameters"]

    (table,) = json.loads(kd("compare", "--format", "json").stdout)
    rows = {row["role"]: row for row in table["rows"]}
    assert list(rows)[-3:] == ["student", "export:student-onnx", "export:student-onnx-int8"]
    assert "size_bytes" in [column["key"] for column in table["columns"]]
    assert rows["student"]["size_bytes"] == Path("runs/tiny/student/model.safetensors").stat().st_size
    assert rows["export:student-onnx-int8"]["size_bytes"] == bench["size_bytes"]
    assert rows["export:student-onnx"]["accuracy"] == rows["student"]["accuracy"]


@pytest.mark.slow
def test_refusals_name_what_to_do(run):
    failed = kd("export", "recipe.toml", "--format", "tflite", code=1)
    assert "'tflite' is not an export format" in failed.stderr and "onnx, onnx-int8, torch-int8" in failed.stderr
    failed = kd("export", "recipe.toml", "--model", "teacher:t", code=1)
    assert "only those are exported" in failed.stderr
    failed = kd("eval", "recipe.toml", "--model", "export:student-onnx", code=1)
    assert "there is no onnx export of student" in failed.stderr
    assert "kd export RECIPE --model student --format onnx" in failed.stderr
    assert "names no export format" in kd("bench", "recipe.toml", "--model", "export:student-tflite", code=1).stderr

    kd("export", "recipe.toml", "--format", "torch-int8")
    weights = Path("runs/tiny/export/student-torch-int8/model-int8.pt")
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "is damaged (model-int8.pt has changed" in kd("eval", "recipe.toml", "--model",
                                                         "export:student-torch-int8", code=1).stderr
    kd("export", "recipe.toml", "--format", "torch-int8")  # written again, whole
    kd("eval", "recipe.toml", "--model", "export:student-torch-int8")

    from safetensors.torch import load_file, save_file

    trained_again = Path("runs/tiny/student/model.safetensors")
    save_file({name: tensor + 0.01 for name, tensor in load_file(trained_again).items()}, trained_again)
    failed = kd("eval", "recipe.toml", "--model", "export:student-torch-int8", code=1)
    assert "was exported from another student model" in failed.stderr and "kd export RECIPE" in failed.stderr


def test_onnx_refuses_generation_and_t5_and_says_what_fits(tiny):
    onnx, int8 = exported.FORMATS["onnx"], exported.FORMATS["torch-int8"]
    t5 = load_task_model(ModelSpec(ref=str(tiny("t5", "seq2seq"))), "choice", 2)
    llama = load_task_model(ModelSpec(ref=str(tiny("llama", "causal"))), "generate", 0)
    assert "seq2seq" in onnx.problem(t5) and "decoding" in onnx.problem(llama)
    assert int8.problem(t5) is None and int8.problem(llama) is None


@pytest.mark.slow
@pytest.mark.parametrize("family, head", [("bert", "multiple-choice"), ("llama", "causal")])
def test_choice_heads_export_to_onnx(tiny, tmp_path, family, head):
    """A multiple-choice encoder's [batch, options, length] inputs, and a decoder's option tokens after the prompt."""
    choice = task_kind("choice")
    model = load_task_model(ModelSpec(ref=str(tiny(family, head, num_labels=1)), head=head), "choice", 2)
    rows = [dict(row, options=["yes, it rose", f"no, it fell {row['idx']} times"], label=row["idx"] % 2)
            for row in jobs.rows(22, seed=4)]
    manifest = exported.write(model, exported.FORMATS["onnx"], choice.bench_inputs(model, rows[:4], 32, None),
                              tmp_path, None)
    (tmp_path / exported.MANIFEST).write_text(json.dumps(manifest))
    export = exported.load(tmp_path)
    assert export.option_token_ids == model.option_token_ids and export.prompt_suffix == model.prompt_suffix
    with torch.inference_mode():
        for batch in (rows[4:5], rows[5:22]):
            encoded = choice.encode(model, batch, 32)
            expected = choice.forward(model, encoded).logits
            assert expected.shape == (len(batch), 2)
            assert float((choice.forward(export, encoded).logits - expected).abs().max()) < 1e-4


@pytest.mark.slow
def test_a_causal_generator_exports_as_torch_int8(tiny, here):
    run = RunDir(here / "runs" / "gen")
    load_task_model(ModelSpec(ref=str(tiny("llama", "causal", layers=2))), "generate", 0).save(run.student)
    jobs.write_trivia("trivia.jsonl", 30)
    jobs.write_recipe("gen.toml", {"name": "gen", "task": "generate",
                                   "data": {"format": "triviaqa", "path": "trivia.jsonl"},
                                   "student": {"ref": str(tiny("llama", "causal", layers=2))},
                                   "loss": {"alpha": 1.0}, "eval": {"max_new_tokens": 4},
                                   "bench": {"batch_sizes": [2], "warmup": 1, "iters": 2, "max_seconds": 1,
                                                             "max_examples": 4}})
    failed = kd("export", "gen.toml", "--format", "onnx", code=1)
    assert "decoding one token after another" in failed.stderr and "export it as torch-int8" in failed.stderr

    result = json.loads(kd("export", "gen.toml", "--format", "torch-int8", "--json").stdout)
    assert result["check"]["unit"] == "answer tokens" and result["check"]["compared"] > result["check"]["rows"]
    assert result["graph"]["int8_layers"] == 2 * 7  # q, k, v, o, gate, up, down in each block; not the output head
    evaluated = json.loads(kd("eval", "gen.toml", "--model", "export:student-torch-int8", "--json").stdout)
    assert len(evaluated["predictions"]) == evaluated["n"] > 0 and "loss" in evaluated["metrics"]
    benched = json.loads(kd("bench", "gen.toml", "--model", "export:student-torch-int8", "--json").stdout)
    assert list(benched["results"][0]["batches"]) == ["1", "2"]


def test_export_roles_parse_describe_and_find_their_files(tmp_path):
    for text, source, fmt in (("export:student-onnx-int8", "student", "onnx-int8"),
                              ("export:student:fin-onnx", "student:fin", "onnx"),
                              ("export:dataset-torch-int8", "dataset", "torch-int8"),
                              ("export:student-x-onnx", "student-x", "onnx"),
                              ("export:student-tflite", "student-tflite", "")):
        role = Role.parse(text)
        assert (role.kind, str(role.source), role.format, str(role)) == ("export", source, fmt, text)
        assert not role.trained and role.teacher is None
    run = RunDir(tmp_path)
    assert run.export(Role.parse("student:fin"), "onnx") == tmp_path / "export" / "student-fin-onnx"
    assert run.eval(Role.parse("export:student:fin-onnx")) == tmp_path / "eval" / "export-student-fin-onnx.json"
    spec = {"student": {"from_teacher": "big", "layers": [0, 2]}}
    assert describe(spec, Role.parse("export:student-torch-int8")) == "big layers [0, 2], distilled, PyTorch int8"
    assert describe(spec, Role.parse("export:student:big-onnx-int8")) == ("big layers [0, 2], distilled from big "
                                                                          "alone, ONNX int8")


def test_compare_shows_the_size_on_disk_once_a_run_has_an_export(tmp_path):
    root = tmp_path / "fin"
    jobs.write_recipe(root / "recipe.resolved.toml", {"name": "fin", "task": "classify",
                                                      "student": {"from_teacher": "big", "layers": [0, 2]},
                                                      "teachers": {"big": {"ref": "bert-base-uncased"}}})
    sizes = {"student": 66_000_000, "export:student-torch-int8": 20_000_000, "export:student-onnx": 66_100_000}
    for role, size in sizes.items():
        (root / "bench").mkdir(exist_ok=True)
        (root / "bench" / f"{role.replace(':', '-')}.json").write_text(json.dumps(
            {"role": role, "model": role, "parameters": 16_000_000, "size_bytes": size,
             "batches": {"1": {"latency_ms_per_example": {"p50": 5.0}}}}))
    table = collect_run(root)
    assert [row["role"] for row in table.rows][-3:] == ["student", "export:student-onnx", "export:student-torch-int8"]
    assert [column.key for column in table.columns][:4] == ["role", "model", "parameters", "size_bytes"]
    assert {row["role"]: row["size_bytes"] for row in table.rows if row["size_bytes"]} == sizes
    (root / "bench" / "export-student-onnx.json").unlink()
    (root / "bench" / "export-student-torch-int8.json").unlink()
    assert "size_bytes" not in [column.key for column in collect_run(root).columns]  # parameters tell fp32 sizes
