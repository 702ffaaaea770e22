"""`kd export`: a model kd trained, written for deployment into ``runs/NAME/export/ROLE-FORMAT/``.

The role's model is loaded as `kd eval` loads it and written in the format (``kdcli.exported``: ``onnx``,
``onnx-int8``, ``torch-int8``). The written files are then read back and run beside the model on the first
``CHECK_ROWS`` rows of the last stage's eval split (one row alone, then batches of ``CHECK_BATCH``: a batch of one
and padded batches of several lengths, which a graph made from one example batch must all answer alike). The
largest logit difference and the share of answers (class or option; for generate, answer tokens) on which the
export's argmax agrees with the model's go into ``export.json``. An ``onnx`` graph is the model's own arithmetic, so
a difference beyond float rounding (``ONNX_TOLERANCE``, relative to the largest logit) means a wrong export, and is
refused. The folder is written whole or not at all and ends with ``done.json``; `kd eval`, `kd bench` and `kd
compare` read it as the role ``export:ROLE-FORMAT``, and refuse it once the role has been trained again.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kdcli import exported
from kdcli.data.stage import stage_data
from kdcli.errors import KdError, ModelError
from kdcli.recipe import Recipe, Stage, fingerprint
from kdcli.roles import Role, check, load, require_exportable
from kdcli.rundir import RunDir, atomic_dir, mark_done, write_json
from kdcli.tasks import TaskKind, task_kind

CHECK_ROWS = 64
CHECK_BATCH = 16
ONNX_TOLERANCE = 1e-3


def export_role(recipe: Recipe, role: Role, fmt_name: str) -> dict[str, Any]:
    """Write ``role``'s model in format ``fmt_name``, check it against the model, and return its manifest (with
    ``path``)."""
    import torch

    from kdcli.models import weights_fingerprint

    fmt = exported.export_format(fmt_name)
    require_exportable(role)
    check(recipe, role)  # a missing model is reported before any data is read
    task = task_kind(recipe.task)
    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    data = stage_data(recipe, run, stage, replace=False)
    model = load(recipe, role, data.num_classes)  # on the CPU, where the exports run
    problem = fmt.problem(model)
    if problem:
        fits = [name for name, other in exported.FORMATS.items() if not other.problem(model)]
        raise ModelError(f"{role} cannot be exported as {fmt.name}: {problem}",
                         f"export it as {' or '.join(fits)}" if fits else "this model has no export format")
    split = recipe.eval.split if data.rows.get(recipe.eval.split) else "validation"
    rows = data.rows[split][:CHECK_ROWS] if split in data.rows else []
    if not rows:
        raise KdError(f"the {split} split of stage '{stage.name}' is empty: there is nothing to check the export on",
                      "give the data a test or validation split")
    # Two rows at least: an exporter takes a dimension of size 1 for a constant.
    example = task.bench_inputs(model, (rows * 2)[:4], stage.data.max_length, stage.data.template)
    source = {"path": str(run.final(role)), "weights": weights_fingerprint(run.final(role))}
    identity = {"role": str(role), "format": fmt.name, "source_weights": source["weights"]}
    folder = run.export(role, fmt.name)
    with atomic_dir(folder) as tmp:
        manifest = {"role": str(role), "export_role": f"export:{role}-{fmt.name}", "fingerprint": fingerprint(identity),
                    **exported.write(model, fmt, example, tmp, data.manifest.get("label_names")), "source": source}
        write_json(tmp / exported.MANIFEST, manifest)
        with torch.inference_mode():
            agreement = _agreement(task, model, exported.load(tmp), rows, stage)
        largest = agreement.pop("largest_logit")
        if fmt.name == "onnx" and agreement["max_abs_difference"] > ONNX_TOLERANCE * max(1.0, largest):
            raise ModelError(f"the ONNX graph's logits differ from {role}'s by up to "
                             f"{agreement['max_abs_difference']:.3g} on {split} rows: the export is wrong",
                             "export it as --format torch-int8, and report the model to kd's maintainers")
        manifest.update(check={"split": split, **agreement}, versions=_versions(fmt.name),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(tmp / exported.MANIFEST, manifest)
        mark_done(tmp, {"fingerprint": manifest["fingerprint"]})
    from kdcli.bench import size_on_disk

    return {**manifest, "path": str(folder), "size_bytes": size_on_disk(folder),
            "source_size_bytes": size_on_disk(run.final(role))}


def _agreement(task: TaskKind, model: Any, export: Any, rows: list[dict], stage: Stage) -> dict[str, Any]:
    """How the export's outputs differ from the model's on ``rows``: the largest logit difference, and the share of
    answers (rows; for generate, answer tokens) whose argmax is the same. The first row runs alone too (a batch of
    one), counted in the difference only."""
    batches = [rows[start : start + CHECK_BATCH] for start in range(0, len(rows), CHECK_BATCH)]
    worst, largest, same, counted = 0.0, 0.0, 0, 0
    for i, chunk in enumerate([rows[:1], *batches]):
        batch = task.encode(model, chunk, stage.data.max_length, stage.data.template, stage.data.answer_max_length)
        mine, theirs = task.forward(model, batch), task.forward(export, batch)
        a, b = mine.logits.float(), theirs.logits.float()
        if mine.token_mask is not None:  # generate: the answer tokens' positions alone
            a, b = a[mine.token_mask], b[mine.token_mask]
        if not len(a):
            continue
        worst = max(worst, float((a - b).abs().max()))
        largest = max(largest, float(a.abs().max()))
        if i:
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            counted += len(a)
    return {"rows": len(rows), "compared": counted, "unit": "answer tokens" if task.name == "generate" else "answers",
            "max_abs_difference": worst, "argmax_agreement": same / counted if counted else None,
            "largest_logit": largest}


def _versions(fmt: str) -> dict[str, str]:
    """The libraries that wrote the files (and run them)."""
    import torch

    versions = {"torch": torch.__version__}
    if fmt.startswith("onnx"):
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return versions
