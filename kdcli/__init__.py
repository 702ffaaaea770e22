"""kd: distil large language models into small, fast ones for one domain."""

import os

__version__ = "0.1.0"

# kd tokenizes one small batch at a time, between model steps. With the tokenizers library's
# default, its thread pool then competes with torch's threads for the same cores: on an idle
# 2-core CPU machine a tiny student trained 10-26% slower with it (docs/benchmarks.md, "The
# tokenizer's threads"). TOKENIZERS_PARALLELISM=true brings it back.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
