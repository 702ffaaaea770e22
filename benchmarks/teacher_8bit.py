"""8-bit teachers: memory in fp32 vs `load_in_8bit` (bitsandbytes), the change in teacher
accuracy, and the KL between the two teachers' output distributions on validation rows.

    python benchmarks/teacher_8bit.py --teacher runs/quickstart/teachers/minilm \\
        --data runs/quickstart/data/main          # a fine-tuned teacher and its prepared data
    python benchmarks/teacher_8bit.py --quick    # tiny BERT from tests/kit.py (CI)

Memory is the weights' footprint (`model.get_memory_footprint()`: parameters and buffers as
stored) and the process's resident-set growth while loading. Writes
benchmarks/results/teacher_8bit[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

from _common import finish  # noqa: E402

from kdcli.models import load_task_model  # noqa: E402
from kdcli.recipe import TeacherConfig  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.tasks import task_kind  # noqa: E402

CLASSIFY = task_kind("classify")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def logits_of(model, rows: list[dict], batch_size: int = 32) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            out.append(CLASSIFY.forward(model, CLASSIFY.encode(model, rows[start : start + batch_size], 64))
                       .logits.float())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--teacher", type=Path, help="a fine-tuned teacher directory (kd's runs/NAME/teachers/T)")
    parser.add_argument("--data", type=Path, help="a prepared data directory (runs/NAME/data/STAGE)")
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            import jobs
            import kit

            # Wide enough for int8 matmuls to matter at all; still a few MB.
            teacher_dir = kit.make_model_dir(Path(tmp), "bert", "sequence-classification", num_labels=3, layers=2)
            rows = jobs.rows(64, seed=2)
        else:
            if not (args.teacher and args.data):
                sys.exit("give --teacher and --data (see the docstring), or --quick")
            from datasets import load_from_disk

            teacher_dir = args.teacher
            rows = load_from_disk(str(args.data))[args.split].to_list()

        results = {}
        logits = {}
        for name, eight in (("fp32", False), ("int8", True)):
            gc.collect()
            before = rss_bytes()
            model = load_task_model(TeacherConfig(ref=str(teacher_dir), load_in_8bit=eight), "classify", 3)
            loaded = rss_bytes() - before
            logits[name] = logits_of(model, rows)
            gold = torch.tensor([r["label"] for r in rows])
            results[name] = {
                "weights_bytes": int(model.model.get_memory_footprint()),
                "rss_growth_bytes": int(loaded),
                "accuracy": float((logits[name].argmax(-1) == gold).float().mean()),
            }
            del model

    p = torch.log_softmax(logits["fp32"], -1)
    q = torch.log_softmax(logits["int8"], -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    summary = {
        "benchmark": "teacher_8bit", "quick": args.quick,
        "teacher": "tiny-bert (tests/kit.py)" if args.quick else str(args.teacher),
        "rows": len(rows), "split": args.split if not args.quick else "toy",
        "fp32": results["fp32"], "int8": results["int8"],
        "weights_ratio": round(results["int8"]["weights_bytes"] / results["fp32"]["weights_bytes"], 3),
        "accuracy_change": round(results["int8"]["accuracy"] - results["fp32"]["accuracy"], 4),
        "kl_fp32_to_int8": kl,
        "argmax_agreement": float((logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).float().mean()),
        "env": describe(),
    }
    print(f"\n{'teacher':<8} {'weights MB':>11} {'RSS growth MB':>14} {'accuracy':>9}")
    for name in ("fp32", "int8"):
        r = results[name]
        print(f"{name:<8} {r['weights_bytes'] / 2**20:>11.1f} {r['rss_growth_bytes'] / 2**20:>14.1f} "
              f"{r['accuracy']:>9.4f}")
    print(f"KL(fp32 || int8) = {kl:.2e}, argmax agreement {summary['argmax_agreement']:.4f}")
    finish(summary)


if __name__ == "__main__":
    main()
