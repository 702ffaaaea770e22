"""Model cards: the README.md of every model kd saves, built from the run directory's files.

A card is a derived file, like a `kd compare` table. ``write_cards`` rebuilds the card of each
model folder of a run (``student/``, ``dataset/``, ``student-NAME/`` and the fine-tuned teachers
under ``teachers/``) from what the run holds: the recorded recipe, the prepared data's manifests,
``eval/ROLE.json``, ``bench/ROLE.json``, ``env.json`` and the folder's own ``kd.json`` and
``training.json``. Nothing in kd reads a card back, so rewriting one changes no result, and every
command that writes into a run rewrites them when it succeeds (``cli._locked``). `kd push`
uploads the same card, its loading snippet naming the Hub repository instead of the folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli import __version__
from kdcli.errors import ModelError, RecipeError
from kdcli.recipe import Recipe, Stage, load, to_toml
from kdcli.report import collect_run, compare_markdown, print_warning
from kdcli.roles import DATASET, STUDENT, Role, describe, solo_role, teacher_role
from kdcli.rundir import RunDir, read_json, role_filename, write_text_atomic

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD = "README.md"

# The Hub's pipeline tag for each head kd loads; a multiple-choice encoder has no pipeline.
PIPELINE_TAGS = {"sequence-classification": "text-classification", "seq2seq": "text2text-generation",
                 "causal": "text-generation"}


def saved_folder(recipe: Recipe, run: RunDir, role: Role) -> Path | None:
    """The folder kd saved ``role``'s model in, once it is there: a trained role's, or a fine-tuned
    teacher's. Other roles' weights are not kd's (a Hub model, a path) or were never saved (baseline)."""
    if role.trained:
        folder = run.final(role)
        return folder if (folder / "config.json").is_file() else None
    if role.kind == "teacher" and role.name in recipe.teachers and recipe.teachers[role.name].finetune is not None:
        folder = run.teacher(role.name)
        return folder if (folder / "done.json").is_file() else None
    return None


def model_folders(recipe: Recipe, run: RunDir) -> list[tuple[Role, Path]]:
    """Every model kd saved in the run, with its folder."""
    roles = [STUDENT, DATASET, *(solo_role(n) for n in recipe.teachers), *(teacher_role(n) for n in recipe.teachers)]
    return [(role, folder) for role in roles if (folder := saved_folder(recipe, run, role)) is not None]


def recorded_recipe(run: RunDir) -> Recipe | None:
    """The recipe the run records (what its models were made with), or None before any step recorded it."""
    if not run.resolved_recipe.is_file():
        return None
    try:
        return load(run.resolved_recipe)
    except RecipeError as exc:
        print_warning(f"no model cards: {exc.message}")
        return None


def write_cards(recipe: Recipe) -> list[Path]:
    """Rewrite the card of every model the run of ``recipe`` holds; returns the cards written."""
    run = RunDir.for_recipe(recipe)
    recorded = recorded_recipe(run)
    if recorded is None:
        return []
    written = []
    for role, folder in model_folders(recorded, run):
        write_text_atomic(folder / CARD, str(build_card(recorded, run, role, folder)))
        written.append(folder / CARD)
    return written


def build_card(recipe: Recipe, run: RunDir, role: Role, folder: Path, repo_id: str | None = None) -> "ModelCard":
    """The card of ``role``'s model in ``folder``; ``repo_id``: the Hub repository it is pushed to, which
    its loading snippet then names (else the folder, as the recipe's output_dir reaches it)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    info = _json(folder / "kd.json") or {}
    kind = info.get("kind")
    evaluation = _json(run.eval(role))
    bench = _json(run.bench(role))
    stage = recipe.resolved_stages()[-1]
    base = _base_ref(recipe, role)
    hub_base = _hub_id(base)
    hub_data = sorted({s.data.hub_name for s in recipe.resolved_stages() if s.data.hub_name})
    model_name = f"{recipe.name}-{role_filename(role)}"
    metrics = _metrics(evaluation)
    results = None
    if evaluation is not None and metrics:  # the Hub's model-index: one result per headline score
        stage_name, split = evaluation.get("stage"), evaluation.get("split")
        hub_name = next((s.data.hub_name for s in recipe.resolved_stages() if s.name == stage_name), None)
        results = [EvalResult(task_type=PIPELINE_TAGS.get(kind, kind or recipe.task),
                              dataset_type=hub_name or f"{recipe.name}/{stage_name}",
                              dataset_name=f"{recipe.name}: stage {stage_name}", dataset_split=split,
                              metric_type=name, metric_name=name.replace("_", " "), metric_value=value)
                   for name, value in metrics.items()]
    data = ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TAGS.get(kind), base_model=hub_base,
        datasets=hub_data or None, metrics=list(metrics) or None,
        tags=["kd", "knowledge-distillation" if role.kind != "teacher" else "fine-tuned", recipe.task],
        model_name=model_name if results else None, eval_results=results,
    )
    model_id = repo_id or (Path(recipe.output_dir) / recipe.name / folder.relative_to(run.root)).as_posix()
    sections = [
        _summary(recipe, run, role, base, info, folder),
        _evaluation_section(role, evaluation, metrics),
        _bench_section(role, bench),
        _compare_section(run, role),
        _data_section(recipe, run),
        _usage_section(kind, model_id, stage, recipe.eval.max_new_tokens, info),
        _recipe_section(recipe),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


# --------------------------------------------------------------------------- what the run's files say


def _json(path: Path) -> dict[str, Any] | None:
    """A result or record file as a dict; None when it is not there. A damaged one is left out with a warning,
    as `kd compare` leaves it out."""
    if not path.is_file():
        return None
    try:
        document = read_json(path)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        print_warning(f"the model card leaves out {path}: not valid JSON ({exc})")
        return None
    if not isinstance(document, dict):
        print_warning(f"the model card leaves out {path}: not an object")
        return None
    return document


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """The headline scores of an eval result (per-class tables and counts left out)."""
    if evaluation is None or not isinstance(evaluation.get("metrics"), dict):
        return {}
    return {name: value for name, value in evaluation["metrics"].items() if _number(value) and name != "n"}


def _base_ref(recipe: Recipe, role: Role) -> str:
    """The model this one was made from: a teacher's ref, or the student's (its teacher's when cut from one)."""
    if role.kind == "teacher":
        return recipe.teachers[role.name].ref
    return recipe.student.ref or recipe.teachers[recipe.student.from_teacher].ref


def _hub_id(ref: str) -> str | None:
    """``ref`` when it is a Hub id (the card's ``base_model`` must be one), else None (a path, a package)."""
    from kdcli.models import resolve_ref

    try:
        return None if Path(resolve_ref(ref)).is_dir() else ref
    except ModelError:  # a folder that is gone, a package that is not installed here
        return None


def _command(verb: str, role: Role) -> str:
    return f"`kd {verb} RECIPE --model {role}`"


# --------------------------------------------------------------------------- sections


def _summary(recipe: Recipe, run: RunDir, role: Role, base: str, info: dict[str, Any], folder: Path) -> str:
    lines = [f"# {recipe.name}: {role}", ""]
    if role.kind == "teacher":
        lines.append(f"The teacher `{role.name}`, fine-tuned by kd on the run's training data (labels only) "
                     "before it taught the students.")
    else:
        teachers = list(dict.fromkeys(t for s in recipe.resolved_stages() for t in s.teachers or []))
        by = f" (teachers: {', '.join(f'`{t}`' for t in teachers)})" if role == STUDENT and teachers else ""
        lines.append(f"A student made by kd: {describe(recipe.model_dump(mode='json'), role)}{by}.")
    stages = recipe.resolved_stages()
    lines += [
        "",
        f"- task: `{recipe.task}`" + (f", head `{info['kind']}`" if info.get("kind") else ""),
        f"- base model: `{base}`" + (f" (layers {recipe.student.layers} of teacher "
                                      f"`{recipe.student.from_teacher}`)"
                                      if role.kind != "teacher" and recipe.student.from_teacher else ""),
    ]
    if info.get("label_names"):
        lines.append("- labels: " + ", ".join(f"`{name}`" for name in info["label_names"]))
    if role.kind != "teacher":
        lines.append(f"- stages: {', '.join(s.name for s in stages)} (each starts from the previous one's best model)")
    training = _json(folder / "training.json") or {}
    metric = (recipe.train if role.kind == "teacher" else stages[-1].train).metric  # what picked the checkpoint
    if _number(training.get("step")):
        lines.append(f"- kept checkpoint: step {training['step']} of job `{training.get('stage')}`"
                     + (f", validation {metric} {training[metric]:.4f}" if _number(training.get(metric)) else ""))
    env = _json(run.env) or {}
    trained_with = ", ".join(f"{name} {env[name]}" for name in ("kd", "torch", "transformers") if env.get(name))
    lines.append(f"- kd version: {__version__} (this card)" + (f"; the run last trained with {trained_with}"
                                                                 if trained_with else ""))
    return "\n".join(lines)


def _evaluation_section(role: Role, evaluation: dict[str, Any] | None, metrics: dict[str, float]) -> str:
    lines = ["## Evaluation", ""]
    if not metrics:
        return "\n".join(lines + [f"Not evaluated yet: {_command('eval', role)} scores it."])
    assert evaluation is not None
    lines += [f"`kd eval` on the {evaluation.get('split')} split of stage `{evaluation.get('stage')}` "
              f"({evaluation.get('n')} examples), {evaluation.get('created', 'date not recorded')}:", "",
              "| metric | value |", "|---|---:|"]
    lines += [f"| {name.replace('_', ' ')} | {value:.4f} |" for name, value in metrics.items()]
    agreement = evaluation.get("agreement")
    if isinstance(agreement, dict) and agreement:
        lines += ["", "Agreement with the teachers (same answer): "
                  + ", ".join(f"`{t}` {rate:.1%}" for t, rate in agreement.items() if _number(rate))]
    for warning in (evaluation.get("shortcut"), evaluation.get("inputs_cut")):
        if isinstance(warning, str) and warning:
            lines += ["", f"Warning: {warning}"]
    return "\n".join(lines)


def _bench_section(role: Role, bench: dict[str, Any] | None) -> str:
    lines = ["## Speed", ""]
    batches = bench.get("batches") if bench else None
    if not isinstance(batches, dict) or not batches:
        return "\n".join(lines + [f"Not benchmarked yet: {_command('bench', role)} measures it."])
    assert bench is not None
    lines += [f"`kd bench` on {bench.get('device')} ({bench.get('threads')} torch threads, "
              f"dtype {bench.get('dtype')}), {bench.get('created', 'date not recorded')}; "
              f"{bench.get('timed', 'the model call')}:", "",
              "| batch | median ms/example | 95% interval | examples/s |", "|---:|---:|---:|---:|"]
    for size, batch in batches.items():
        latency = batch.get("latency_ms_per_example") if isinstance(batch, dict) else None
        interval = latency.get("ci95") if isinstance(latency, dict) else None
        if (isinstance(latency, dict) and _number(latency.get("p50")) and isinstance(interval, list)
                and len(interval) == 2 and all(map(_number, interval)) and _number(batch.get("throughput"))):
            lines.append(f"| {size} | {latency['p50']:.3f} | {interval[0]:.3f}–{interval[1]:.3f} | "
                         f"{batch['throughput']:,.1f} |")
    facts = []
    if _number(bench.get("parameters")):
        facts.append(f"{bench['parameters']:,} parameters")
    if _number(bench.get("size_bytes")):
        facts.append(f"{bench['size_bytes'] / 1e6:,.1f} MB of weights")
    if _number(bench.get("weight_bytes")) and _number(bench.get("call_memory_bytes")):
        facts.append(f"{bench['weight_bytes'] / 1e6:,.1f} MB of weights in memory and "
                     f"{bench['call_memory_bytes'] / 1e6:,.1f} MB more while it runs")
    if facts:
        lines += ["", "; ".join(facts) + "."]
    return "\n".join(lines)


def _compare_section(run: RunDir, role: Role) -> str:
    """`kd compare`'s row for this model, under the teachers' rows it is measured against."""
    if not run.resolved_recipe.is_file():  # what kd compare reads a run by
        return "## Compared with the teachers\n\nNo row in `kd compare` yet."
    table = collect_run(run.root)
    teachers = [row for row in table.rows if Role.parse(row["role"]).kind == "teacher" and row["role"] != str(role)]
    mine = [row for row in table.rows if row["role"] == str(role)]
    if not mine:
        return "## Compared with the teachers\n\nNo row in `kd compare` yet."
    rows = teachers + mine
    shown = replace(table, rows=rows, best=len(rows) - 1, hints=[])
    return ("## Compared with the teachers\n\nWhat `kd compare` shows for this model (in bold) and the "
            "teachers:\n\n" + compare_markdown([shown]).strip())


def _data_section(recipe: Recipe, run: RunDir) -> str:
    lines = ["## Data", "", "| stage | source | rows (train / validation / test) | transfer rows | sha256 |",
             "|---|---|---:|---:|---|"]
    for stage in recipe.resolved_stages():
        manifest = _json(run.data(stage.name) / "manifest.json") or {}
        sources = manifest.get("sources") if isinstance(manifest.get("sources"), list) else []
        labelled = [s for s in sources if isinstance(s, dict) and s.get("split") != "transfer"]
        where = (f"Hub `{stage.data.hub_name}`" if stage.data.hub_name
                 else ", ".join(f"`{Path(str(s.get('path'))).name}`" for s in labelled)
                 or f"`{stage.data.path or ', '.join(stage.data.files.values())}`")
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        rows = " / ".join(str(counts.get(split, "?")) for split in ("train", "validation", "test"))
        digests = ", ".join(str(s.get("sha256", ""))[:12] for s in labelled)
        lines.append(f"| {stage.name} | {stage.data.format}: {where} | {rows if counts else 'not prepared'} | "
                     f"{counts.get('transfer', '')} | {digests} |")
    return "\n".join(lines)


def _recipe_section(recipe: Recipe) -> str:
    return ("## Recipe\n\nThe recipe the run records (`recipe.resolved.toml`: every default filled in), which "
            "made this model.\n\n<details>\n<summary>recipe.resolved.toml</summary>\n\n"
            f"```toml\n{to_toml(recipe).strip()}\n```\n\n</details>")


# --------------------------------------------------------------------------- how to use it


def _usage_section(kind: str | None, model_id: str, stage: Stage, max_new_tokens: int, info: dict[str, Any]) -> str:
    if kind not in _USE:
        return "## How to use\n\nThe folder has no `kd.json` naming its head; load it with `transformers`."
    return ("## How to use\n\nWith `transformers`, one input asked the way kd asked it in training and "
            f"`kd eval`:\n\n```python\n{usage_snippet(kind, model_id, stage, max_new_tokens, info)}\n```")


def usage_snippet(kind: str, model_id: str, stage: Stage, max_new_tokens: int, info: dict[str, Any]) -> str:
    """Python that loads the model with its head's Auto class and answers one input as kd asks it."""
    from kdcli.models import HEAD_CLASSES

    auto = HEAD_CLASSES[kind].__name__
    lines = ["import torch", f"from transformers import AutoTokenizer, {auto}", "",
             f"model_id = {model_id!r}", "tokenizer = AutoTokenizer.from_pretrained(model_id)",
             f"model = {auto}.from_pretrained(model_id).eval()", ""]
    return "\n".join(lines + _USE[kind](stage, max_new_tokens, info))


def _classify(stage: Stage, max_new_tokens: int, info: dict[str, Any]) -> list[str]:
    return [
        'inputs = tokenizer(["Your text here."], return_tensors="pt", padding=True, truncation=True, '
        f"max_length={stage.data.max_length})",
        "with torch.no_grad():",
        "    predicted = model(**inputs).logits.argmax(-1).tolist()",
        "print([model.config.id2label[i] for i in predicted])",
    ]


def _options(info: dict[str, Any]) -> list[str]:
    count = info.get("num_classes") if _number(info.get("num_classes")) else 2
    return [f"option {k}" for k in range(1, int(count) + 1)]


def _multiple_choice(stage: Stage, max_new_tokens: int, info: dict[str, Any]) -> list[str]:
    return [
        'question = "Your question here?"',
        f"options = {_options(info)!r}",
        "# Each option is scored with the question: put in its _ blank if it has one, else as a pair.",
        'blank = "_" in question',
        'firsts = [question.replace("_", option, 1) if blank else question for option in options]',
        "inputs = tokenizer(firsts, None if blank else options, return_tensors=\"pt\", padding=True, "
        f"truncation=True, max_length={stage.data.max_length})",
        "with torch.no_grad():",
        "    logits = model(**{key: value.unsqueeze(0) for key, value in inputs.items()}).logits",
        "print(options[logits.argmax(-1).item()])",
    ]


def _generation(kind: str):
    def lines(stage: Stage, max_new_tokens: int, info: dict[str, Any]) -> list[str]:
        from kdcli.models import DEFAULT_TEMPLATE, GENERATE_TEMPLATE, render_prompt

        out = []
        limit = f"truncation=True, max_length={stage.data.max_length}"
        # A causal model's answer follows the prompt's end: kd cuts a long prompt's start, as the snippet does.
        cut = ['tokenizer.truncation_side = "left"  # the answer follows the end'] if kind == "causal" else []
        if info.get("task") == "choice":
            example = {"text": "Your question here?", "options": _options(info)}
            prompt = render_prompt(example, stage.data.template or DEFAULT_TEMPLATE)
            out += ["# kd reads the answer as the option's number from the logits of the tokens 1..N after the",
                    "# prompt; greedy decoding gives that number when the model answers with one.",
                    f"prompt = {prompt!r}", *cut, f'inputs = tokenizer(prompt, return_tensors="pt", {limit})']
            max_new_tokens = 2
        elif stage.data.chat or stage.data.format == "messages":
            question = (render_prompt({"text": "Your question here?", "options": []}, stage.data.template)
                        if stage.data.template else "Your question here?")
            system = [{"role": "system", "content": stage.data.system}] if stage.data.system is not None else []
            out += [f"messages = {[*system, {'role': 'user', 'content': question}]!r}",
                    "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
                    *cut, "# The chat template writes the special tokens itself.",
                    f'inputs = tokenizer(prompt, return_tensors="pt", {limit}, add_special_tokens=False)']
        else:
            prompt = render_prompt({"text": "Your question here?", "options": []},
                                   stage.data.template or GENERATE_TEMPLATE)
            out += [f"prompt = {prompt!r}", *cut, f'inputs = tokenizer(prompt, return_tensors="pt", {limit})']
        answer = 'output[0, inputs["input_ids"].shape[1]:]' if kind == "causal" else "output[0]"
        return out + [
            "with torch.no_grad():",
            f"    output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)",
            f"print(tokenizer.decode({answer}, skip_special_tokens=True).strip())",
        ]

    return lines


_USE = {"sequence-classification": _classify, "multiple-choice": _multiple_choice,
        "seq2seq": _generation("seq2seq"), "causal": _generation("causal")}
