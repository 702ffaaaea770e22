"""Task generate: seq2seq and causal students, token-level KD from live and top-k cached teachers,
sequence-level KD, vocabulary checks, answer masking, token-count normalisation, eval and bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import jobs
import kit
from clirun import kd
from jobs import qa_rows
from kdcli import losses, train
from kdcli.cache import CACHE_FORMAT, CachedTeacher, LiveTeacher, build_cache
from kdcli.job import Job, TeacherSettings
from kdcli.models import load_task_model, student_from_teacher
from kdcli.recipe import LossConfig, TeacherConfig, TrainConfig
from kdcli.rundir import read_json
from kdcli.runtime import make_accelerator
from kdcli.tasks import task_kind

GENERATE = task_kind("generate")
HEADS = {"t5": "seq2seq", "llama": "causal"}
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-models")
    return {family: kit.make_model_dir(root, family, head, layers=2) for family, head in HEADS.items()}


def generate_model(path: Path, *, seed: int | None = None):
    model = load_task_model(TeacherConfig(ref=str(path)), "generate", 0)
    if seed is not None:  # a different "trained" teacher: perturb the weights, same tokenizer
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def unanswered_rows(n: int) -> list[dict]:
    """Transfer rows as `kd prepare` stores them: prompts without answers (label -1)."""
    return [dict(row, id=f"t{i}", text=f"Name something about {row['text']}", answers=[])
            for i, row in enumerate(qa_rows(n))]


@pytest.fixture
def plain_sgd(monkeypatch):
    """Training with SGD, for the accumulation invariance: AdamW divides a gradient by its own running size,
    so where a gradient is nearly zero it turns float rounding into a whole step of lr (4e-5 apart after 2
    steps on one CPU, 1e-10 with SGD). What accumulation must keep is the gradient, which SGD compares."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay, fused: torch.optim.SGD(params, lr=lr))


def generate_job(models, family: str, out: Path, *, batch_size: int, grad_accum: int, top_k: int = 16,
                 divergence: str = "forward_kl", kd_level: str = "token", max_steps: int = 3,
                 transfer_share: float = 0.0) -> Job:
    teacher = generate_model(models[family], seed=1)
    torch.manual_seed(0)
    student = student_from_teacher(teacher, [0])
    jobs.without_dropout(student.model)
    data = qa_rows(40)
    loss = LossConfig(alpha=0.5, temperature=2.0, divergence=divergence, kd_level=kd_level, top_k=top_k)
    return Job(
        name="main", student=student, transfer_share=transfer_share,
        rows={"train": data[:32], "validation": [dict(r, idx=i) for i, r in enumerate(data[32:])],
              **({"transfer": unanswered_rows(24)} if transfer_share else {})},
        loss=loss, train=TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3,
                                     eval_every=10_000, checkpoint_every=10_000, log_every=8, eval_batch_size=8),
        seed=0, max_length=32, template=None, checkpoint_dir=out / "checkpoints", output_dir=out / "student",
        metrics_path=out / "metrics.jsonl",
        teachers={"t": LiveTeacher(teacher, TeacherSettings(max_length=32, kd_level=kd_level, top_k=top_k,
                                                            temperature=2.0, answer_max_length=8))},
        teacher_weights={"t": 1.0}, answer_max_length=8,
    )


# --------------------------------------------------------------------------- encoding


def test_causal_targets_are_the_answer_tokens_and_eos_only(models):
    model = generate_model(models["llama"])
    rows = qa_rows(3)
    batch = GENERATE.encode(model, rows, 32, None, 16)
    tokenizer = model.tokenizer
    for i, row in enumerate(rows):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][real], batch["labels"][i][real]
        answer = labels != -100
        # The prompt is masked, the answer is a suffix ending in EOS, and it reads as the first answer.
        prompt_length = len(tokenizer(f"Question: {row['text']}\nAnswer:")["input_ids"])
        assert not answer[:prompt_length].any() and answer[prompt_length:].all()
        assert labels[answer][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[answer][:-1]).strip() == row["answers"][0]
        assert torch.equal(ids[answer], labels[answer])
    assert (batch["labels"][~batch["attention_mask"].bool()] == -100).all()
    # forward shifts: logits at t predict labels[t + 1]
    out = GENERATE.forward(model, batch)
    assert out.logits.shape[:2] == out.labels.shape and torch.equal(out.labels, batch["labels"][:, 1:])
    assert int(out.token_mask.sum()) == int((batch["labels"] != -100).sum())


def test_seq2seq_labels_are_the_answer_and_the_decoder_reads_them_shifted(models):
    model = generate_model(models["t5"])
    batch = GENERATE.encode(model, qa_rows(2), 32, None, 4)
    labels = batch["labels"]
    assert labels.shape[1] <= 4 and (labels == model.tokenizer.eos_token_id).sum() == 2
    assert batch["decoder_input_ids"][0, 0] == model.model.config.decoder_start_token_id
    assert torch.equal(batch["decoder_input_ids"][:, 1:], labels[:, :-1].clamp(min=0))
    assert GENERATE.forward(model, batch).logits.shape == (2, labels.shape[1], model.vocab_size)


def test_left_padded_batched_generation_equals_one_at_a_time(models):
    model = generate_model(models["llama"], seed=3)
    rows = [qa_rows(5)[0], qa_rows(5)[3]]  # prompts of different lengths
    together = model.generate(rows, 5, 32, None, batch_size=2)
    alone = [model.generate([row], 5, 32, None)[0] for row in rows]
    assert together == alone


# --------------------------------------------------------------------------- losses


def _tokens(seed: int, vocab: int = 40):
    torch.manual_seed(seed)
    student = torch.randn(3, 6, vocab) * 3
    teacher = torch.randn(3, 6, vocab) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return student, teacher, mask


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_top_k_equal_to_the_vocabulary_is_the_dense_loss(kind):
    student, teacher, mask = _tokens(0)
    log_p = F.log_softmax(teacher / 2.0, dim=-1)
    values, ids = log_p.topk(log_p.shape[-1], dim=-1)
    dense = losses.kd_term(student, log_p.exp(), 2.0, kind, mask=mask)
    sparse = losses.sparse_kd_term(student, values, ids, 2.0, kind, mask=mask)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_top_k_divergences_on_padded_token_sequences(kind, seed):
    student, teacher, mask = _tokens(seed)
    log_p = F.log_softmax(teacher, dim=-1)
    values, ids = log_p.topk(8, dim=-1)
    value = losses.sparse_divergence(student, values, ids, kind, mask=mask)
    assert torch.isfinite(value) and float(value) >= -1e-6
    if kind == "jsd":
        assert float(value) <= math.log(2) + 1e-6
    # Padding holds garbage: the value is that of the valid tokens alone, gradients stay finite.
    garbage = student.clone().requires_grad_(True)
    with torch.no_grad():
        garbage[~mask] = float("nan")
    bad_values = values.clone()
    bad_values[~mask] = float("inf")
    padded = losses.sparse_divergence(garbage, bad_values, ids, kind, mask=mask)
    rows = losses.sparse_divergence(student[mask], values[mask], ids[mask], kind)
    assert float(padded.detach()) == pytest.approx(float(rows), rel=1e-5)
    padded.backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[~mask] == 0).all()
    # A student equal to the teacher has divergence 0, and the collapsed tail is counted.
    assert float(losses.sparse_divergence(teacher, values, ids, kind, mask=mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.topk_tail(values, 40).min()) > 0


# --------------------------------------------------------------------------- loop invariants


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("kd_level", ["token", "sequence"])
def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(models, family, kd_level, tmp_path):
    job = generate_job(models, family, tmp_path, batch_size=8, grad_accum=1, kd_level=kd_level)
    live = job.teachers["t"]
    manifest = build_cache(tmp_path / "cache", live, {"train": job.rows["train"]}, {"kd_level": kd_level}, batch_size=5)
    if kd_level == "token":  # the manifest's bytes/token is what the shard files take on disk
        on_disk = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*.safetensors"))
        assert manifest["bytes_per_token"] == pytest.approx(on_disk / manifest["tokens"], abs=0.01)
    batch = job.rows["train"][8:16]
    live_total, live_parts, _ = train.compute_loss(job, batch, "train", None)
    job.teachers = {"t": CachedTeacher(tmp_path / "cache")}
    cached_total, cached_parts, _ = train.compute_loss(job, batch, "train", None)
    assert set(live_parts) == {"ce", "kd"}
    for name in live_parts:
        assert float(live_parts[name].detach()) == pytest.approx(float(cached_parts[name].detach()), abs=1e-5), name
    assert float(live_total.detach()) == pytest.approx(float(cached_total.detach()), abs=1e-5)


@pytest.mark.parametrize("kd_level", ["token", "sequence"])
def test_the_teacher_answers_transfer_prompts_and_its_cache_gives_the_live_loss(models, kd_level, tmp_path):
    """Transfer rows have no answer: the teacher's greedy answers are the targets, the student learns them
    (token level: the teacher's distribution at each of their tokens) with no CE, and a cache holds the
    answers with the log-probs, so that it gives the live teacher's loss."""
    job = generate_job(models, "llama", tmp_path, batch_size=8, grad_accum=1, kd_level=kd_level, transfer_share=0.5)
    live = job.teachers["t"]
    batch = job.rows["transfer"][8:16]
    said = live(batch, "transfer")
    greedy = live.model.generate(batch, 8, 32, None, batch_size=8)
    assert said.texts == greedy and any(said.texts)  # made-up answers, some of them not empty
    units = GENERATE.units(job, batch, {"t": said})
    targets = [dict(row, target=text) for row, text in zip(batch, greedy)]
    answer_tokens = int((GENERATE.encode(job.student, targets, 32, None, 8)["labels"] != -100).sum())
    assert units == {"ce": 0, "kd": answer_tokens}  # no gold tokens; the teacher's answer tokens
    if kd_level == "token":
        assert said.lengths == [len(GENERATE.encode(job.student, [row], 32, None, 8)["labels"].ne(-100).nonzero())
                                for row in targets]
    live_total, live_parts, _ = train.compute_loss(job, batch, "transfer", None)
    assert set(live_parts) == {"kd"} and float(live_parts["kd"].detach()) > 0
    manifest = build_cache(tmp_path / "cache", live, {"train": job.rows["train"], "transfer": job.rows["transfer"]},
                           {"kd_level": kd_level, "task": "generate"}, batch_size=5)
    assert manifest["splits"]["transfer"]["accuracy"] is None and manifest["splits"]["train"]["accuracy"] is not None
    cached = CachedTeacher(tmp_path / "cache")
    assert cached(batch, "transfer").texts == greedy
    job.teachers = {"t": cached}
    cached_total, cached_parts, _ = train.compute_loss(job, batch, "transfer", None)
    assert float(cached_parts["kd"].detach()) == pytest.approx(float(live_parts["kd"].detach()), abs=1e-5)
    assert float(cached_total.detach()) == pytest.approx(float(live_total.detach()), abs=1e-5)


def test_a_token_cache_of_transfer_rows_without_their_answers_is_refused(models, tmp_path):
    from kdcli.cache import check_cache
    from kdcli.errors import CacheError
    from kdcli.rundir import write_json

    live = LiveTeacher(generate_model(models["llama"]), TeacherSettings(max_length=32, top_k=8, answer_max_length=8))
    manifest = build_cache(tmp_path / "cache", live, {"transfer": unanswered_rows(4)}, {"task": "generate"},
                           batch_size=2)
    assert (tmp_path / "cache" / "transfer-answers.json").is_file()
    check_cache(tmp_path / "cache", dict(manifest), "t", {"transfer": 4})
    del manifest["splits"]["transfer"]["answers"]  # as a kd before transfer answers would have written it
    write_json(tmp_path / "cache" / "manifest.json", manifest)
    with pytest.raises(CacheError, match="without the answers they cover"):
        check_cache(tmp_path / "cache", dict(manifest), "t", {"transfer": 4})


def test_a_top32_cache_takes_at_most_128_bytes_a_token_on_disk_and_reads_back_as_the_live_teacher(models, tmp_path):
    teacher = generate_model(models["llama"], seed=1)
    live = LiveTeacher(teacher, TeacherSettings(max_length=32, top_k=32, temperature=2.0, answer_max_length=8))
    rows = qa_rows(120)  # short answers of 1-3 tokens plus EOS, as TriviaQA's are; two splits, two shards
    splits = {"train": rows[:90], "validation": [dict(r, idx=i) for i, r in enumerate(rows[90:])]}
    manifest = build_cache(tmp_path / "cache", live, splits, {}, batch_size=1)  # one row a batch: no padding
    assert manifest["id_dtype"] == "uint16" and manifest["top_k_stored"] == 32
    tokens = int((GENERATE.encode(teacher, rows, 32, None, 8)["labels"] != -100).sum())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*.safetensors"))
    assert manifest["tokens"] == tokens and on_disk / tokens <= 128, on_disk / tokens
    cached = CachedTeacher(tmp_path / "cache")
    for split, part in splits.items():
        for row in part:
            mine, theirs = cached([row], split), live([row], split)
            assert mine.lengths == theirs.lengths
            assert torch.equal(mine.token_ids, theirs.token_ids)
            assert torch.equal(mine.token_logprobs, theirs.token_logprobs)
    # A batch reads each row's own span, in the batch's order.
    picked = [splits["validation"][i] for i in (7, 0, 29, 3)]
    together = cached(picked, "validation")
    assert torch.equal(together.token_ids, torch.cat([cached([row], "validation").token_ids for row in picked]))


def test_the_packed_topk_form_round_trips_exactly_at_the_edges():
    from kdcli.cache import pack_topk, unpack_topk

    generator = torch.Generator().manual_seed(0)
    for dtype, top in ((torch.uint16, 65_535), (torch.int32, 2**31 - 1)):
        for k in (8, 16, 31, 32, 64):
            values = (-torch.rand(6, k, generator=generator) * 20).half()
            values[0, 0], values[1, 0], values[2, -1], values[3, 0] = 0.0, -6e-8, float("-inf"), -65504.0
            ids = torch.randint(0, top, (6, k), generator=generator)
            ids[4], ids[5] = top, 0
            packed_values, packed_ids = pack_topk(values, ids.to(dtype))
            assert packed_ids.shape == (6, k - k // (8 * packed_ids.element_size()))
            read_values, read_ids = unpack_topk(packed_values, packed_ids)
            assert torch.equal(read_ids.to(torch.long), ids) and torch.equal(read_values.float(), values.float())
    with pytest.raises(ValueError, match="positive"):
        pack_topk(torch.full((1, 16), 0.5).half(), torch.zeros(1, 16, dtype=torch.uint16))


def test_a_cache_of_the_old_format_is_refused_not_misread(models, tmp_path):
    from kdcli.cache import check_cache
    from kdcli.errors import CacheError
    from kdcli.rundir import write_json

    teacher = generate_model(models["llama"])
    live = LiveTeacher(teacher, TeacherSettings(max_length=32, top_k=8, answer_max_length=8))
    manifest = build_cache(tmp_path / "cache", live, {"train": qa_rows(4)}, {}, batch_size=2)
    write_json(tmp_path / "cache" / "manifest.json", dict(manifest, cache_format=1))
    with pytest.raises(CacheError, match="cache_format = 1"):
        check_cache(tmp_path / "cache", dict(manifest), "t")
    with pytest.raises(CacheError, match="format 1"):
        CachedTeacher(tmp_path / "cache")


def test_two_teachers_are_mixed_as_full_distributions_by_their_weights(models, tmp_path):
    # With k = V the top-k form is exact. Two different teachers (other weights, one tokenizer).
    job = generate_job(models, "llama", tmp_path, batch_size=8, grad_accum=1, top_k=10_000)
    batch = job.rows["train"][:8]
    a = job.teachers["t"]
    b = LiveTeacher(generate_model(models["llama"], seed=2),
                    TeacherSettings(max_length=32, top_k=10_000, temperature=2.0, answer_max_length=8))

    def kd_term(**weights: float) -> float:
        job.teachers = {name: {"a": a, "b": b}[name] for name in weights}
        job.teacher_weights = dict(weights)
        _, parts, _ = train.compute_loss(job, batch, "train", None)
        return float(parts["kd"].detach())

    alone = {"a": kd_term(a=1.0), "b": kd_term(b=1.0)}
    assert alone["a"] != pytest.approx(alone["b"], rel=1e-3)  # the teachers do differ
    # A weight of 0 leaves the other teacher alone, whichever it is.
    assert kd_term(a=1.0, b=0.0) == pytest.approx(alone["a"], rel=1e-4)
    assert kd_term(a=0.0, b=1.0) == pytest.approx(alone["b"], rel=1e-4)
    # The weights are the teachers' shares: swapped, the target and so the loss change.
    one_three, three_one = kd_term(a=1.0, b=3.0), kd_term(a=3.0, b=1.0)
    assert one_three != pytest.approx(three_one, rel=1e-3)
    assert kd_term(a=2.0, b=6.0) == pytest.approx(one_three, rel=1e-4)  # only the ratio counts
    # Mixed as distributions, not as losses: KL to a mixture is below the mixed KLs (the mixture's
    # entropy is higher), and strictly so when the teachers differ.
    assert one_three < 0.25 * alone["a"] + 0.75 * alone["b"] - 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kd_level", ["token", "sequence"])
def test_with_transfer_prompts_batch_8_accumulation_1_equals_batch_2_accumulation_4(models, tmp_path, kd_level,
                                                                                    plain_sgd):
    """Half of each micro-batch is transfer prompts, which the (cached) teacher answered: answers of
    different lengths, so the KD term must weigh each micro-batch by its teacher-answer tokens."""
    cache = tmp_path / "cache"
    for name, batch, accum in (("a", 8, 1), ("b", 2, 4)):
        job = generate_job(models, "llama", tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=2,
                           kd_level=kd_level, transfer_share=0.5)
        if not cache.exists():
            build_cache(cache, job.teachers["t"], {s: job.rows[s] for s in ("train", "transfer")},
                        {"kd_level": kd_level, "task": "generate"}, batch_size=4)
        job.teachers = {"t": CachedTeacher(cache)}
        train.run_job(job, make_accelerator(), show_progress=False)
    final = {name: jobs.state_dict(train._checkpoints(tmp_path / name / "checkpoints")[0]) for name in "ab"}
    assert jobs.max_difference(final["a"], final["b"]) < 1e-8  # SGD steps of about 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("kd_level", ["token", "sequence"])
def test_batch_8_accumulation_1_equals_batch_2_accumulation_4_per_token(models, tmp_path, kd_level, plain_sgd):
    # Answers differ in length (1 to 3 words), so weighting micro-batches by examples would differ; and
    # sequence-level KD learns the teacher's answers, whose token counts differ from the gold ones.
    for name, batch, accum in (("a", 8, 1), ("b", 2, 4)):
        job = generate_job(models, "llama", tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=2,
                           kd_level=kd_level)
        train.run_job(job, make_accelerator(), show_progress=False)
    final = {name: jobs.state_dict(train._checkpoints(tmp_path / name / "checkpoints")[0]) for name in "ab"}
    assert jobs.max_difference(final["a"], final["b"]) < 1e-8  # SGD steps of about 2e-4


# --------------------------------------------------------------------------- vocabularies


def test_a_padded_teacher_vocabulary_is_trimmed_and_a_real_mismatch_is_refused(models, tmp_path):
    from kdcli.errors import ModelError
    from kdcli.models import check_shared_vocabulary

    padded_dir = tmp_path / "padded"
    model, tokenizer = kit.make_model("llama", "causal", layers=2)
    model.resize_token_embeddings(len(tokenizer) + 24)
    model.save_pretrained(padded_dir)
    tokenizer.save_pretrained(padded_dir)
    padded = generate_model(padded_dir)
    assert padded.model.config.vocab_size == len(tokenizer) + 24 and padded.vocab_size == len(tokenizer)
    student = generate_model(models["llama"])
    check_shared_vocabulary(student.tokenizer, padded.tokenizer, "padded")
    out = GENERATE.forward(padded, GENERATE.encode(padded, qa_rows(2), 32, None, 8))
    assert out.logits.shape[-1] == len(tokenizer) == student.vocab_size
    t5 = generate_model(models["t5"])
    with pytest.raises(ModelError, match="do not share a vocabulary") as caught:
        check_shared_vocabulary(student.tokenizer, t5.tokenizer, "t5")
    assert 'kd_level = "sequence"' in caught.value.hint


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def workdir(here) -> Path:
    jobs.write_trivia("trivia.jsonl")
    return here


def generate_recipe(models, family: str, **teachers: dict) -> Path:
    """One teacher ``big`` of ``family``; ``teachers``: more teacher tables by name."""
    return jobs.write_recipe("gen.toml", {
        "name": "gen", "task": "generate",
        "data": {"format": "triviaqa", "path": "trivia.jsonl", "max_length": 32, "answer_max_length": 8},
        "student": {"from_teacher": "big", "layers": [0]},
        "teachers": {"big": {"ref": str(models[family])}} | teachers,
        "loss": {"alpha": 0.5, "temperature": 2.0, "top_k": 8},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 16, "checkpoint_every": 64, "log_every": 8,
                  "metric": "token_f1", "eval_batch_size": 16},
        "eval": {"max_new_tokens": 6, "batch_size": 16},
        "bench": {"batch_sizes": [1, 4], "iters": 2, "max_seconds": 1, "warmup": 1, "threads": 1},
    })


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_distill_live_then_cached_then_eval_and_bench_through_the_cli(models, workdir, family):
    recipe = generate_recipe(models, family)
    run = workdir / "runs" / "gen"
    assert "big (live)" in kd("distill", str(recipe)).output
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "kd"} <= next(x for x in lines if x["kind"] == "train").keys()
    assert "val_token_f1" in next(x for x in lines if x["kind"] == "eval")

    cached = json.loads(kd("cache-teachers", str(recipe), "--json").stdout)[0]
    on_disk = sum(f.stat().st_size for f in (run / "cache" / "main" / "big").glob("*.safetensors"))
    assert cached["bytes_per_token"] == pytest.approx(on_disk / cached["tokens"], abs=0.01) and cached["top_k"] == 8
    manifest = read_json(run / "cache" / "main" / "big" / "manifest.json")
    assert manifest["top_k"] == 8 and manifest["vocab_size"] > 0 and manifest["id_dtype"] == "uint16"
    # A cache of the old format is rebuilt, not read.
    (run / "cache" / "main" / "big" / "manifest.json").write_text(json.dumps(dict(manifest, cache_format=1)))
    wide = kd("cache-teachers", str(recipe), env={"COLUMNS": "200"})
    assert "bytes/token" in wide.output and f"{cached['bytes_per_token']} (k=8)" in wide.output
    assert "rebuilding" in wide.output
    assert read_json(run / "cache" / "main" / "big" / "manifest.json")["cache_format"] == CACHE_FORMAT
    assert "big (cache)" in kd("distill", str(recipe), "--set", "train.lr=5e-4").output

    result = json.loads(kd("eval", str(recipe), "--json").stdout)
    assert {"exact_match", "f1", "precision", "recall"} <= result["metrics"].keys()
    assert 0 <= result["metrics"]["f1"] <= 1 and result["n"] == len(result["predictions"]) > 0
    assert "big" in result["agreement"]
    assert read_json(run / "eval" / "student.json")["metrics"] == result["metrics"]
    assert "teacher:big on test (4 questions)" in kd("eval", str(recipe), "--model", "teacher:big").output
    bench = json.loads(kd("bench", str(recipe), "--model", "student", "--json").stdout)
    bench = bench["results"][0]
    assert "greedy generation" in bench["timed"] and bench["batches"]["1"]["throughput"] > 0


@pytest.mark.slow
def test_a_teacher_with_another_vocabulary_is_refused_before_work_unless_sequence_level(models, workdir):
    recipe = generate_recipe(models, "llama", t5={"ref": str(models["t5"])})
    result = kd("distill", str(recipe), code=1)
    assert "do not share a vocabulary" in result.output and "kd_level" in result.output
    assert not (workdir / "runs" / "gen" / "checkpoints").exists()
    # Sequence-level KD only needs the teachers' answers as text.
    done = kd("distill", str(recipe), "--set", 'loss.kd_level="sequence"', "--set", "train.metric=loss")
    assert "t5 (live)" in done.output


def test_generation_never_emits_an_id_past_the_tokenizer_vocabulary(tmp_path):
    model, tokenizer = kit.make_model("llama", "causal", layers=2)
    model.resize_token_embeddings(len(tokenizer) + 24)
    with torch.no_grad():  # make the padded rows the most likely next tokens by far
        model.get_output_embeddings().weight[len(tokenizer):] = model.get_input_embeddings().weight[: 24].sum(0) * 50
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    padded = generate_model(tmp_path / "padded")
    ids = padded.generate_ids(padded.encode_prompts(qa_rows(3), 32, None), 6)
    assert ids.numel() and int(ids.max()) < len(tokenizer)


@pytest.mark.parametrize("family", HEADS)
def test_drift_from_a_reference_is_over_gold_answer_tokens_whatever_the_batch(models, family):
    """`kd eval --against`'s drift on free text: one unit per gold answer token (EOS included), padding
    left out, so the mean KL and top-1 agreement are the same in batches of 4 as one row at a time; a
    model against itself drifts by nothing."""
    from kdcli.evaluate import _drift

    reference, other = generate_model(models[family]), generate_model(models[family], seed=3)
    rows = qa_rows(12)
    tokens = sum(int(GENERATE.forward(reference, GENERATE.encode(reference, [row], 32, None, 8)).token_mask.sum())
                 for row in rows)
    alone, batched = (_drift(GENERATE, other, reference, rows, size, 32, None, 8) for size in (1, 4))
    assert alone["unit"] == "answer token" and alone["units"] == batched["units"] == tokens
    assert batched["kl"] == pytest.approx(alone["kl"], rel=1e-4) and alone["kl"] > 0
    # Padding changes float rounding a little: a near tie may flip one token.
    assert batched["top1_agreement"] == pytest.approx(alone["top1_agreement"], abs=1 / tokens)
    assert batched["max_abs_difference"] == pytest.approx(alone["max_abs_difference"], rel=1e-4)
    same = _drift(GENERATE, reference, reference, rows, 4, 32, None, 8)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1
    assert same["max_abs_difference"] == 0 < alone["max_abs_difference"]
