"""kd: distil large language models into small, fast ones for one domain."""

import os

__version__ = "0.1.0"

# kd tokenizes one small batch at a time, between model steps. With the tokenizers library's
# default, its thread pool then competes with torch's threads for the same cores: on the 2-core
# CPU machine a batch of 16 sentences took 5 ms to tokenize instead of 1, and a tiny student
# trained 1.3-1.6x slower (docs/benchmarks.md). TOKENIZERS_PARALLELISM=true brings it back.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
