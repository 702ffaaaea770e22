"""Chat format (task generate): conversations (`format = "messages"`) and `data.chat = true`, rendered
by each model's own chat template, with the loss on the assistant's answer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

import jobs
import kit
from clirun import kd
from kdcli.errors import ModelError
from kdcli.models import load_task_model
from kdcli.recipe import TeacherConfig
from kdcli.tasks import cut_warning, task_kind

GENERATE = task_kind("generate")
# Two templates over one vocabulary: teacher and student may render the same turns differently.
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
          "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# A different prompt markup, the answer again straight after a line break: the same answer tokens.
ALT = ("{% for m in messages %}### {{ m['role'] | capitalize }}:{{ '\\n' }}{{ m['content'] }}"
       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
       "{% if add_generation_prompt %}### Assistant:{{ '\\n' }}{% endif %}")
# Llama 2 style: the answer after a space, so its first token differs from the other two templates'.
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
        "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>{% else %}[INST] {{ m['content'] }} [/INST]"
        "{% endif %}{% endfor %}")
TURNS = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]


def _with_template(path: Path, template: str | None) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """The same tiny causal Llama with each template above, and with none."""
    made = {}
    for name, template in (("chatml", CHATML), ("alt", ALT), ("inst", INST), ("plain", None)):
        path = kit.make_model_dir(tmp_path_factory.mktemp(name), "llama", "causal", layers=2)
        made[name] = _with_template(path, template)
    return made


def _model(path: Path):
    return load_task_model(TeacherConfig(ref=str(path)), "generate", 0)


def test_each_model_renders_the_turns_with_its_own_template(llamas):
    example = {"text": "Capital of France?", "answers": ["Paris"], "messages": TURNS}
    assert _model(llamas["chatml"]).prompt(example) == (
        "<|system|>\nAnswer in one word.\n<|user|>\nCapital of France?\n<|assistant|>\n")
    assert _model(llamas["inst"]).prompt(example) == (
        "<s><<SYS>>Answer in one word.<</SYS>>[INST] Capital of France? [/INST]")
    # Without turns, the prompt template as before.
    assert _model(llamas["chatml"]).prompt({"text": "Capital of France?", "options": []}) == (
        "Question: Capital of France?\nAnswer:")


@pytest.mark.parametrize("name", ["chatml", "alt", "inst"])
def test_the_loss_falls_on_the_answer_and_its_end_of_turn_only(llamas, name):
    model = _model(llamas[name])
    example = {"text": "Capital of France?", "answers": ["Paris"], "messages": TURNS}
    batch = GENERATE.encode(model, [example], max_length=64, answer_max_length=8)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    answer = [i for i, label in zip(ids, labels) if label != -100]
    prompt = [i for i, label in zip(ids, labels) if label == -100]
    assert labels == [-100] * len(prompt) + answer  # the answer is the end of the sequence, all of it targets
    assert model.tokenizer.decode(answer).strip() == "Paris" + model.tokenizer.eos_token
    assert model.tokenizer.decode(prompt) == model.prompt(example)  # the template's text, once: no second <s>
    # A long answer is cut to answer_max_length with its end kept.
    long = GENERATE.encode(model, [dict(example, answers=["Paris " * 20])], max_length=64, answer_max_length=4)
    kept = [i for i in long["labels"][0].tolist() if i != -100]
    assert len(kept) == 4 and kept[-1] == model.tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["chatml", "plain"])
def test_a_prompt_longer_than_max_length_loses_its_start_not_the_end_the_answer_follows(llamas, name):
    model = _model(llamas[name])
    question = "Capital of France? " + "Think of rivers, bridges and old streets. " * 8
    example = {"text": question, "answers": ["Paris"], "options": [],
               "messages": [*TURNS[:1], {"role": "user", "content": question}] if name == "chatml" else []}
    whole = model.tokenizer(model.prompt(example), add_special_tokens=name == "plain")["input_ids"]
    assert len(whole) > 24
    batch = GENERATE.encode(model, [example], max_length=24, answer_max_length=8)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    cut = whole[:1] + whole[-23:] if name == "plain" else whole[-24:]  # a BOS the tokenizer adds stays
    assert [i for i, label in zip(ids, labels) if label == -100] == cut  # chatml: up to "<|assistant|>"
    answer = [i for i in labels if i != -100]
    assert model.tokenizer.decode(answer).strip() == "Paris" + model.tokenizer.eos_token
    assert model.encode_prompts([example], max_length=24)["input_ids"][0].tolist() == cut
    assert model.tokenizer.truncation_side == "right"  # as it was
    # kd distill and kd eval say so.
    turns = [{"role": "user", "content": "Capital?"}] if example["messages"] else []
    short = dict(example, text="Capital?", messages=turns)
    assert cut_warning(GENERATE, model, [example, short], 24, None, "stage main, train") == (
        f"stage main, train: 1 of 2 inputs are longer than data.max_length = 24 tokens (the longest has {len(whole)}) "
        "and lose their start; raise data.max_length to keep them whole")
    assert cut_warning(GENERATE, model, [short], 24, None, "stage main, train") is None


def test_eval_gold_loss_is_the_cross_entropy_per_answer_token_of_the_rendered_conversation(llamas):
    """`kd eval`'s loss, checked against the model run by hand on each conversation alone (no padding)."""
    import torch

    model = _model(llamas["chatml"])
    rows = [{"text": q, "answers": [a], "messages": [*TURNS[:1], {"role": "user", "content": q}]}
            for q, a in (("Capital of France?", "Paris"), ("Largest planet?", "Jupiter, the gas giant"))]
    token_losses = []
    for row in rows:
        prompt = model.tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        answer = {"role": "assistant", "content": row["answers"][0]}
        full = model.tokenizer.apply_chat_template([*row["messages"], answer], tokenize=False)
        ids = model.tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        end = ids[0].tolist().index(model.tokenizer.eos_token_id, start) + 1  # the answer and its end of turn
        with torch.no_grad():
            logits = model.model(input_ids=ids[:, :end]).logits[0].float()
        token_losses += torch.nn.functional.cross_entropy(logits[start - 1 : end - 1], ids[0, start:end],
                                                          reduction="none").tolist()
    loss = GENERATE.gold_loss(model, rows, batch_size=2, max_length=64, template=None, answer_max_length=16)
    assert loss == pytest.approx(sum(token_losses) / len(token_losses), rel=1e-4)


def test_a_tokenizer_without_a_chat_template_is_a_clear_error_naming_the_model(llamas):
    with pytest.raises(ModelError, match="has no chat template") as error:
        _model(llamas["plain"]).prompt({"text": "x", "messages": TURNS})
    assert str(llamas["plain"]) in error.value.message and "data.chat = false" in error.value.hint


# --------------------------------------------------------------------------- data and the CLI

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + 1?"},
                  {"role": "assistant", "content": str(i + 1)}]}
    for i in range(40)
]


def _recipe(teacher: Path, student: Path, data: dict, **loss) -> Path:
    return jobs.write_recipe("chat.toml", {
        "name": "chat", "task": "generate",
        "data": {"max_length": 48, "answer_max_length": 6} | data,
        "student": {"ref": str(student)},
        "teachers": {"t": {"ref": str(teacher)}},
        "loss": {"alpha": 0.5, "temperature": 2.0, "top_k": 8} | loss,
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "eval_every": 10_000, "eval_batch_size": 16},
        "eval": {"max_new_tokens": 4, "batch_size": 16},
        "bench": {"batch_sizes": [1], "iters": 1, "max_seconds": 1, "warmup": 1, "threads": 1},
    })


def test_a_messages_file_is_prepared_with_its_turns(here, llamas):
    Path("c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    recipe = _recipe(llamas["chatml"], llamas["chatml"], {"format": "messages", "path": "c.jsonl"})
    kd("prepare", recipe)
    from kdcli import recipe as recipe_mod
    from kdcli.data.stage import stage_data
    from kdcli.rundir import RunDir

    loaded = recipe_mod.load(Path(recipe), [])
    data = stage_data(loaded, RunDir.for_recipe(loaded), loaded.resolved_stages()[0])
    row = data.rows["train"][0]
    number = int(row["text"].split()[2])
    assert row["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": f"What is {number} + 1?"}]
    assert row["answers"] == [str(number + 1)]


@pytest.mark.parametrize("line, says", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' should be a list of at least two turns"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
     "the last turn should be the assistant's answer"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "not a turn of role system, user or assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "yo"}]},
     "no user turn before the answer"),
])
def test_a_bad_conversation_is_a_clean_error_naming_the_line(here, llamas, line, says):
    Path("c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS[:5]) + json.dumps(line) + "\n")
    recipe = _recipe(llamas["chatml"], llamas["chatml"], {"format": "messages", "path": "c.jsonl"})
    result = kd("prepare", recipe, code=1)
    assert f"c.jsonl:6: {says}" in result.stderr and "hint:" in result.stderr


@pytest.mark.parametrize("data, says", [
    ({"format": "messages", "path": "c.jsonl"}, "format = 'messages' needs task 'generate'"),
    ({"format": "jsonl", "path": "c.jsonl", "chat": True}, "chat = true needs task 'generate'"),
])
def test_chat_is_refused_for_other_tasks(here, data, says):
    jobs.write_recipe("r.toml", {"name": "r", "task": "classify", "data": data, "student": {"ref": "m"}})
    assert says in kd("check", "r.toml", code=1).stderr


def test_a_system_prompt_without_chat_is_refused(here):
    jobs.write_recipe("r.toml", {"name": "r", "task": "generate", "student": {"ref": "m"},
                                 "data": {"format": "triviaqa", "path": "t.jsonl", "system": "Be brief."}})
    assert "system needs chat = true" in kd("check", "r.toml", code=1).stderr


def test_a_teacher_without_a_chat_template_is_refused_before_any_work(here, llamas):
    jobs.write_trivia("trivia.jsonl")
    recipe = _recipe(llamas["plain"], llamas["chatml"], {"format": "triviaqa", "path": "trivia.jsonl",
                                                         "chat": True})
    result = kd("distill", recipe, code=1)
    assert f"teacher t ({llamas['plain']}): its tokenizer has no chat template" in result.stderr
    assert not Path("runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("student, kd_level", [("alt", "token"), ("inst", "sequence")])
def test_chat_distillation_with_two_templates_through_the_cli(here, llamas, student, kd_level):
    """Teacher and student render prompts differently; token-level KD lines up their answer tokens."""
    jobs.write_trivia("trivia.jsonl")
    recipe = _recipe(llamas["chatml"], llamas[student], {"format": "triviaqa", "path": "trivia.jsonl",
                                                         "chat": True, "system": "Answer with a number."},
                     kd_level=kd_level)
    assert "t (live)" in kd("distill", recipe).output
    assert "built" in kd("cache-teachers", recipe).output
    assert "t (cache)" in kd("distill", recipe, "--set", "train.lr=5e-4").output
    result = json.loads(kd("eval", recipe, "--json").stdout)
    assert result["n"] > 0 and 0 <= result["metrics"]["f1"] <= 1 and "t" in result["agreement"]
    assert result["metrics"]["loss"] > 0  # the gold answers' cross-entropy
    bench = json.loads(kd("bench", recipe, "--json").stdout)["results"][0]
    assert bench["batches"]["1"]["throughput"] > 0


@pytest.mark.slow
def test_transfer_prompts_in_chat_format_are_answered_by_the_teacher_live_and_cached(here, llamas):
    """Unlabelled questions, asked as chat turns like the labelled ones: the teacher's greedy answers
    are the targets, and its cache keeps them beside its log-probs."""
    jobs.write_trivia("trivia.jsonl")
    Path("questions.jsonl").write_text("".join(json.dumps({"context": f"Question: How many moons has planet {i}?"
                                                                      "\nAnswer:"}) + "\n" for i in range(24)))
    recipe = _recipe(llamas["chatml"], llamas["alt"], {"format": "triviaqa", "path": "trivia.jsonl", "chat": True,
                                                       "transfer": {"path": "questions.jsonl", "share": 0.5}})
    assert "t (live)" in kd("distill", recipe).output
    train = [json.loads(line) for line in Path("runs/chat/metrics.jsonl").read_text().splitlines()]
    assert any(record["kind"] == "train" and record["kd"] > 0 for record in train)
    kd("cache-teachers", recipe)
    cache = Path("runs/chat/cache/main/t")
    manifest = json.loads((cache / "manifest.json").read_text())
    answers = json.loads((cache / "transfer-answers.json").read_text())
    assert manifest["splits"]["transfer"]["rows"] == len(answers) == 24

    from kdcli import recipe as recipe_mod
    from kdcli.cache import LiveTeacher
    from kdcli.data.stage import stage_data
    from kdcli.job import TeacherSettings
    from kdcli.rundir import RunDir

    loaded = recipe_mod.load(Path(recipe), [])
    rows = stage_data(loaded, RunDir.for_recipe(loaded), loaded.resolved_stages()[0]).rows["transfer"]
    assert rows[0]["messages"] == [{"role": "user", "content": rows[0]["text"]}]  # asked as a user turn
    teacher = LiveTeacher(_model(llamas["chatml"]), TeacherSettings(max_length=48, top_k=8, temperature=2.0,
                                                                    answer_max_length=6))
    assert teacher([rows[0]], "transfer").texts == [answers[0]]  # what the cache holds: the teacher's answer
    assert "t (cache)" in kd("distill", recipe, "--set", "train.lr=5e-4").output


def test_templates_that_tokenize_the_answer_differently_need_sequence_level_kd(here, llamas):
    jobs.write_trivia("trivia.jsonl")
    recipe = _recipe(llamas["chatml"], llamas["inst"], {"format": "triviaqa", "path": "trivia.jsonl", "chat": True})
    result = kd("distill", recipe, code=1)
    assert "answer tokens per example" in result.stderr and 'loss.kd_level = "sequence"' in result.stderr


@pytest.mark.slow
def test_the_real_smollm2_instruct_template_renders_and_targets_the_answer(smollm2_gguf, llamas):
    """SmolLM2-Instruct's own tokenizer and chat template (read from its GGUF file; the weights are not
    needed to render and to mask)."""
    from dataclasses import replace

    from kdcli.models import load_tokenizer

    spec = TeacherConfig(ref=f"package:{smollm2_gguf.parent.name}", gguf_file=smollm2_gguf.name)
    tokenizer = load_tokenizer(spec)
    model = replace(_model(llamas["chatml"]), tokenizer=tokenizer)
    turns = [{"role": "system", "content": "Answer with one word: negative, neutral or positive."},
             {"role": "user", "content": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."}]
    example = {"text": turns[1]["content"], "answers": ["positive"], "messages": turns}
    prompt = model.prompt(example)
    assert prompt.startswith("<|im_start|>system\nAnswer with one word") and prompt.endswith("<|im_start|>assistant\n")
    batch = GENERATE.encode(model, [example], max_length=128, answer_max_length=8)
    answer = [i for i in batch["labels"][0].tolist() if i != -100]
    assert tokenizer.decode(answer) == "positive<|im_end|>" and answer[-1] == tokenizer.eos_token_id
    # The GGUF vocabulary is converted once per process (it takes seconds): later loads are copies.
    again = load_tokenizer(spec)
    again.padding_side = "left" if tokenizer.padding_side == "right" else "right"
    assert again is not tokenizer and again.padding_side != tokenizer.padding_side
    assert again(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
