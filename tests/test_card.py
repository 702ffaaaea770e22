"""Model cards (kdcli.card): what a trained run's cards say, that they follow eval and bench, and that
their loading snippet answers as kd does; and `kd push` against a local stand-in for the Hub."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import jobs
from clirun import kd
from kdcli import __version__
from kdcli.card import usage_snippet
from kdcli.models import load_task_model
from kdcli.recipe import DataConfig, Stage, TeacherConfig
from kdcli.rundir import done_state, read_json
from kdcli.tasks import task_kind

WORDS = {"positive": "profit rose strongly", "negative": "losses widened again", "neutral": "shares were unchanged"}


def run_snippet(code: str) -> tuple[str, dict]:
    """What a card's Python prints when run, and its variables."""
    printed, variables = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "model card", "exec"), variables)
    return printed.getvalue().strip(), variables


def snippet_output(code: str) -> str:
    return run_snippet(code)[0]


def python_block(card: ModelCard) -> str:
    return card.text.split("```python\n", 1)[1].split("\n```", 1)[0]


# --------------------------------------------------------------------------- a trained run's cards


@pytest.mark.slow
def test_cards_of_a_trained_run_follow_eval_and_bench(here, tiny):
    with open("data.jsonl", "w") as handle:
        for i in range(40):
            label = list(WORDS)[i % 3]
            handle.write(json.dumps({"text": f"Report {i}: {WORDS[label]} in quarter {i % 4}", "label": label}) + "\n")
    teacher = tiny("bert", "sequence-classification", num_labels=3)
    jobs.write_recipe("tiny.toml", {
        "name": "tiny", "task": "classify",
        "data": {"format": "jsonl", "path": "data.jsonl", "label_names": list(WORDS), "max_length": 32},
        "teachers": {"t": {"ref": str(teacher), "finetune": {"epochs": 1, "batch_size": 8}}},
        "student": {"from_teacher": "t", "layers": [0, 2]},
        "train": {"epochs": 1, "batch_size": 8, "eval_every": 16, "log_every": 8, "eval_batch_size": 16},
        "bench": {"batch_sizes": [1, 4], "warmup": 1, "iters": 2, "max_seconds": 1, "threads": 1, "max_examples": 8},
    })
    kd("distill", "tiny.toml")
    student, finetuned = Path("runs/tiny/student"), Path("runs/tiny/teachers/t")
    card = ModelCard.load(student / "README.md")
    assert "Not evaluated yet: `kd eval RECIPE --model student`" in card.text
    assert card.data.eval_results is None and card.data.base_model is None  # the teacher is a local folder
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert f"- base model: `{teacher}` (layers [0, 2] of teacher `t`)" in card.text
    assert f"- kd version: {__version__}" in card.text
    assert Path("runs/tiny/recipe.resolved.toml").read_text().strip() in card.text
    assert "| main | jsonl: `data.jsonl` | 32 / 4 / 4 |" in card.text  # the manifest's counts
    assert "- labels: `positive`, `negative`, `neutral`" in card.text
    # The cards are outside what marks a model finished: the teacher is still up to date, not fine-tuned again.
    fingerprint = read_json(finetuned / "done.json")["fingerprint"]
    assert (finetuned / "README.md").is_file() and done_state(finetuned, fingerprint) == (True, None)

    kd("eval", "tiny.toml", "--model", "student")
    kd("eval", "tiny.toml", "--model", "teacher:t")
    kd("bench", "tiny.toml", "--model", "student")
    card = ModelCard.load(student / "README.md")
    evaluation = read_json(Path("runs/tiny/eval/student.json"))
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores == {k: evaluation["metrics"][k] for k in ("accuracy", "f1", "precision", "recall")}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert f"| accuracy | {evaluation['metrics']['accuracy']:.4f} |" in card.text
    p50 = read_json(Path("runs/tiny/bench/student.json"))["batches"]["4"]["latency_ms_per_example"]["p50"]
    assert f"| 4 | {p50:.3f} |" in card.text
    compare = kd("compare", "runs/tiny", "--format", "md").stdout
    row = next(line for line in compare.splitlines() if line.startswith("| **student"))
    assert row in card.text  # kd compare's own row, the teacher's row above it
    assert next(line for line in compare.splitlines() if line.startswith("| teacher:t")) in card.text
    teacher_card = ModelCard.load(finetuned / "README.md")
    assert {r.metric_type: r.metric_value for r in teacher_card.data.eval_results}["accuracy"] == (
        read_json(Path("runs/tiny/eval/teacher-t.json"))["metrics"]["accuracy"])

    # The snippet loads the saved folder and labels a sentence as kd's own eval would.
    code = python_block(card)
    assert 'model_id = "runs/tiny/student"' in code.replace("'", '"')
    model = load_task_model(TeacherConfig(ref=str(student)), "classify", 3)
    expected = task_kind("classify").predict(model, [_row("Your text here.")], 8, 32, None, 16)
    printed, variables = run_snippet(code)
    assert printed == str([list(WORDS)[expected[0]]])
    encoded = task_kind("classify").encode(model, [_row("Your text here.")], 32)
    assert torch.equal(variables["inputs"]["input_ids"], encoded["input_ids"])


def _row(text: str, options: list[str] | None = None, messages: list[dict] | None = None) -> dict:
    return {"id": "0", "text": text, "options": options or [], "label": -1, "answers": [], "idx": 0,
            "messages": messages or []}


# --------------------------------------------------------------------------- the snippet of each head


def _stage(**data) -> Stage:
    return Stage(name="main", data=DataConfig(format="jsonl", path="x.jsonl", max_length=32, **data))


def test_a_multiple_choice_snippet_picks_the_option_kd_picks(tiny):
    path = tiny("bert", "multiple-choice", num_labels=2)
    model = load_task_model(TeacherConfig(ref=str(path)), "choice", 2)
    options = ["option 1", "option 2"]
    code = usage_snippet("multiple-choice", str(path), _stage(), 16, {"task": "choice", "num_classes": 2})
    assert "AutoModelForMultipleChoice.from_pretrained(model_id)" in code
    choice = task_kind("choice")
    for question in ("Your question here?", "The trophy does not fit in _ because it is too large."):
        with torch.no_grad():
            logits = model.class_logits(choice.encode(model, [_row(question, options)], 32)).logits
        printed, variables = run_snippet(code.replace('question = "Your question here?"', f"question = {question!r}"))
        assert torch.allclose(variables["logits"], logits, atol=1e-5)  # the same inputs: the same scores
        assert printed == options[logits.argmax(-1).item()]


@pytest.mark.parametrize("family, head", [("llama", "causal"), ("t5", "seq2seq")])
def test_a_generation_snippet_answers_as_kd_does(tiny, family, head):
    path = tiny(family, head)
    model = load_task_model(TeacherConfig(ref=str(path)), "generate", 0)
    template = "Q: {text}\nA:"
    answer = task_kind("generate").predict(model, [_row("Your question here?")], 8, 32, template, 6)[0]
    code = usage_snippet(head, str(path), _stage(template=template), 6, {"task": "generate"})
    assert {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}[head] in code
    assert repr("Q: Your question here?\nA:") in code
    printed = snippet_output(code)
    assert (printed.splitlines() or [""])[0].strip() == answer  # kd scores the first line


def test_a_chat_snippet_renders_the_turns_with_the_models_template(tiny, tmp_path):
    import transformers

    path = Path(shutil.copytree(tiny("llama", "causal"), tmp_path / "chat"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer.save_pretrained(path)
    model = load_task_model(TeacherConfig(ref=str(path)), "generate", 0)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Your question here?"}]
    answer = task_kind("generate").predict(model, [_row("Your question here?", messages=turns)], 8, 32, None, 6)[0]
    code = usage_snippet("causal", str(path), _stage(chat=True, system="Be brief."), 6, {"task": "generate"})
    assert "apply_chat_template" in code
    assert model.prompt_lengths([_row("", messages=turns)], whole=True)[0] > 32  # cut, as kd cuts it
    assert (snippet_output(code).splitlines() or [""])[0].strip() == answer


# --------------------------------------------------------------------------- kd push


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's answers to create_repo, the card check, preupload and commit; every request is kept."""

    requests: list[dict] = []
    existing: set[str] = set()
    forbidden: set[str] = set()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path == "/api/repos/create":
            asked = json.loads(body)
            repo = f"{asked['organization']}/{asked['name']}"
            if asked["organization"] in self.forbidden:
                return self._answer(403, {"error": f"You don't have the rights to create a model under {repo}"})
            if repo in self.existing:
                return self._answer(409, {"error": "You already created this model repo"})
            self.existing.add(repo)
            return self._answer(200, {"url": f"https://huggingface.co/{repo}"})  # as the Hub answers, behind a proxy
        if self.path == "/api/validate-yaml":
            return self._answer(200, {})
        if "/preupload/" in self.path:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(body)["files"]]
            return self._answer(200, {"files": files})
        if "/commit/" in self.path:
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self._answer(200, {"commitUrl": f"https://huggingface.co/{repo}/commit/{'1' * 40}",
                                      "commitOid": "1" * 40})
        self._answer(404, {"error": "not found"})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    """A local Hub, with HF_ENDPOINT pointing at it, a token, and huggingface_hub out of offline mode."""
    import huggingface_hub.constants

    FakeHub.requests, FakeHub.existing, FakeHub.forbidden = [], set(), {"someone-else"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield FakeHub
    server.shutdown()
    server.server_close()


@pytest.fixture
def saved_run(here, tiny) -> Path:
    """A run as distill leaves it, without training: a tiny classifier copied in as the student."""
    jobs.write_recipe("fin.toml", {
        "name": "fin", "task": "classify", "data": {"format": "jsonl", "path": "s.jsonl", "label_names": list(WORDS)},
        "student": {"ref": "distilbert-base-uncased"}, "loss": {"alpha": 1.0},
    })
    student = Path("runs/fin/student")
    shutil.copytree(tiny("bert", "sequence-classification"), student)
    (student / "kd.json").write_text(json.dumps({"kind": "sequence-classification", "task": "classify",
                                                 "num_classes": 3, "label_names": list(WORDS)}))
    (student / "done.json").write_text("{}")
    (student / ".config.json.tmp-1.abcdef01").write_text("")  # a write interrupted earlier
    shutil.copy("fin.toml", "runs/fin/recipe.resolved.toml")
    return student


def _commit(requests: list[dict]) -> tuple[dict, dict[str, bytes]]:
    """The commit's header and the files it carried, by path."""
    lines = [json.loads(line) for line in next(r for r in requests if "/commit/" in r["path"])["body"].splitlines()]
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
             for line in lines if line["key"] == "file"}
    return next(line["value"] for line in lines if line["key"] == "header"), files


def test_push_creates_the_repository_and_commits_the_folder_with_a_card_naming_it(hub, saved_run):
    out = kd("push", "fin.toml", "--repo", "me/fin-student", "--private")
    assert "to http://127.0.0.1" in out.stdout and "(new, private)" in out.stdout
    create = json.loads(hub.requests[0]["body"])
    assert hub.requests[0]["path"] == "/api/repos/create"
    assert (create["organization"], create["name"], create["visibility"]) == ("me", "fin-student", "private")
    assert all(r["auth"] == "Bearer hf_test_token" for r in hub.requests)
    header, files = _commit(hub.requests)
    expected = sorted(p.name for p in saved_run.iterdir()
                      if p.name not in ("done.json", "README.md") and not p.name.startswith("."))
    assert sorted(files) == sorted([*expected, "README.md"])
    assert files["model.safetensors"] == (saved_run / "model.safetensors").read_bytes()
    assert "student of kd run fin" in header["summary"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "distilbert-base-uncased"  # a Hub id: the Hub links it
    assert 'model_id = "me/fin-student"' in python_block(card).replace("'", '"')
    # The folder's own card loads the folder.
    assert 'model_id = "runs/fin/student"' in python_block(ModelCard.load(saved_run / "README.md")).replace("'", '"')


def test_push_to_an_existing_repository_adds_a_commit(hub, saved_run):
    hub.existing.add("me/fin-student")
    out = kd("push", "fin.toml", "--repo", "me/fin-student", "--private", "--json")
    result = json.loads(out.stdout)
    assert result["created"] is False and result["private"] is None and result["commit"] == "1" * 40
    assert "README.md" in result["files"] and "done.json" not in result["files"]


@pytest.mark.parametrize("case, message, hint", [
    ("forbidden", "cannot create someone-else/fin on", "a repository of your own"),
    ("no token", "no Hugging Face token", "hf auth login"),
    ("offline", "huggingface_hub is in offline mode", "unset HF_HUB_OFFLINE"),
    ("no hub", "cannot reach the Hub at http://127.0.0.1:9", "check the network"),
    ("baseline", "the baseline is the student before training", "kd push uploads the models kd saved"),
    ("untrained", "there is no trained dataset model", "kd distill RECIPE --no-teachers"),
    ("bad id", "--repo 'me/fin/student' is not a Hub repository id", "NAMESPACE/NAME"),
])
def test_push_errors_say_what_to_do(hub, saved_run, monkeypatch, tmp_path, case, message, hint):
    import huggingface_hub.constants

    args = ["push", "fin.toml", "--repo", "someone-else/fin" if case == "forbidden" else "me/fin"]
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    elif case == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    elif case == "no hub":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    elif case in ("baseline", "untrained"):
        args += ["--model", "baseline" if case == "baseline" else "dataset"]
    elif case == "bad id":
        args[3] = "me/fin/student"
    result = kd(*args, code=1)
    assert f"error: {message}" in result.stderr.replace("\n", " ") and hint in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not any("/commit/" in r["path"] for r in hub.requests)  # nothing uploaded
