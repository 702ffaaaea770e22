"""Tiny models and tokenizers built in code, for fast offline tests.

Every model here is a real transformers architecture (BERT, DistilBERT, RoBERTa, T5,
Llama) shrunk to hidden size 32, with a tokenizer trained in milliseconds on
``CORPUS`` by the ``tokenizers`` library and wrapped in the model family's own fast
tokenizer class. ``make_model_dir`` writes model + tokenizer with ``save_pretrained``,
so tests go through the same ``from_pretrained(local_dir)`` path as real checkpoints.

Each directory is a few hundred KB and builds in well under a second.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

FAMILIES = ("bert", "distilbert", "roberta", "t5", "llama")

# Which heads each family can be built with (the kd head names from kdcli.recipe.Head).
HEADS: dict[str, tuple[str, ...]] = {
    "bert": ("sequence-classification", "multiple-choice"),
    "distilbert": ("sequence-classification", "multiple-choice"),
    "roberta": ("sequence-classification", "multiple-choice"),
    "t5": ("seq2seq",),
    "llama": ("causal", "sequence-classification"),
}

# Short finance / trivia / commonsense sentences, plus the option numbers and letters on
# their own so that "1".."5" and "A".."E" are learned as single tokens by every tokenizer.
CORPUS: list[str] = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the same period last year.",
    "The company said net sales fell by 5 percent in the third quarter.",
    "Shares of the bank were unchanged after the report.",
    "Revenue grew strongly and the outlook for the year was raised.",
    "The board proposed a dividend of EUR 0.50 per share.",
    "Losses widened as demand for paper products weakened.",
    "The merger is expected to close in the second half of the year.",
    "Analysts expect earnings to remain stable next quarter.",
    "The group cut 200 jobs to reduce costs.",
    "Orders received increased by 12 percent to EUR 40 million.",
    "What is the capital of France? Paris is the capital of France.",
    "Which planet is known as the red planet? Mars.",
    "Who wrote Hamlet? William Shakespeare wrote the play.",
    "The river Nile flows through Egypt into the sea.",
    "How many legs does a spider have? A spider has eight legs.",
    "The trophy does not fit in the suitcase because _ is too large.",
    "Sarah gave the book to Maria because _ had finished reading it.",
    "Tracy went to the store to buy milk for the kids.",
    "How would you describe Alex? Helpful, tired, angry.",
    "A train travels 60 km in 2 hours. What is its speed?",
    "Question: which option is correct? Options: 1. yes 2. no 3. maybe",
    "Answer: 1",
    "Answer: 2",
    "Answer: 3",
    "Answer: 4",
    "Answer: 5",
    "1 2 3 4 5",
    "5 4 3 2 1",
    "Options: 1. 2. 3. 4. 5.",
    "A B C D E",
    "positive negative neutral",
    "the a of to in is was and for on with as by at from",
]

SIZES = dict(hidden=32, heads=4, intermediate=64, max_positions=128)


# --------------------------------------------------------------------------- tokenizers


def _train(tokenizer: Tokenizer, trainer) -> dict:
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return json.loads(tokenizer.to_str())["model"]


@functools.cache
def _wordpiece_vocab() -> dict[str, int]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return _train(tok, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False))["vocab"]


@functools.cache
def _byte_bpe(specials: tuple[str, ...]) -> tuple[dict[str, int], list]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: no unknowns
        show_progress=False,
    )
    model = _train(tok, trainer)
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


@functools.cache
def _unigram_vocab() -> list[tuple[str, float]]:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # T5's layout: <pad>=0, </s>=1, <unk>=2, then the learned pieces.
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    return [tuple(piece) for piece in _train(tok, trainer)["vocab"]]


def make_tokenizer(family: str) -> transformers.PreTrainedTokenizerBase:
    """A fast tokenizer of the family's own class, trained on CORPUS."""
    if family in ("bert", "distilbert"):
        cls = transformers.BertTokenizer if family == "bert" else transformers.DistilBertTokenizer
        return cls(vocab=dict(_wordpiece_vocab()))
    if family == "roberta":
        vocab, merges = _byte_bpe(("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
        return transformers.RobertaTokenizer(vocab=dict(vocab), merges=list(merges))
    if family == "t5":
        return transformers.T5Tokenizer(vocab=list(_unigram_vocab()), extra_ids=0)
    if family == "llama":
        # Llama 3 style: byte-level BPE in a PreTrainedTokenizerFast, <s> prepended, no </s> appended.
        vocab, merges = _byte_bpe(("<s>", "</s>", "<pad>"))
        tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


# --------------------------------------------------------------------------- models

_CLASSES = {
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("bert", "multiple-choice"): "BertForMultipleChoice",
    ("distilbert", "sequence-classification"): "DistilBertForSequenceClassification",
    ("distilbert", "multiple-choice"): "DistilBertForMultipleChoice",
    ("roberta", "sequence-classification"): "RobertaForSequenceClassification",
    ("roberta", "multiple-choice"): "RobertaForMultipleChoice",
    ("t5", "seq2seq"): "T5ForConditionalGeneration",
    ("llama", "causal"): "LlamaForCausalLM",
    ("llama", "sequence-classification"): "LlamaForSequenceClassification",
}


def make_config(family: str, tokenizer, num_labels: int = 3, layers: int = 4) -> transformers.PretrainedConfig:
    h, heads, ff, pos = SIZES["hidden"], SIZES["heads"], SIZES["intermediate"], SIZES["max_positions"]
    common = dict(vocab_size=len(tokenizer), num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ff,
            max_position_embeddings=pos, **common,
        )
    if family == "distilbert":
        return transformers.DistilBertConfig(
            dim=h, n_layers=layers, n_heads=heads, hidden_dim=ff, max_position_embeddings=pos, **common
        )
    if family == "roberta":
        # RoBERTa positions start after the padding index, hence the extra two.
        return transformers.RobertaConfig(
            hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ff,
            max_position_embeddings=pos + 2, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **common,
        )
    if family == "t5":
        return transformers.T5Config(
            d_model=h, d_kv=h // heads, d_ff=ff, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **common,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=h, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=2, max_position_embeddings=pos, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **common,
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_model(family: str, head: str, num_labels: int = 3, layers: int = 4, seed: int = 0):
    """A randomly initialised tiny model (seeded) and its tokenizer."""
    if (family, head) not in _CLASSES:
        raise ValueError(f"no tiny {family} with head {head!r}; heads for {family}: {HEADS.get(family)}")
    tokenizer = make_tokenizer(family)
    config = make_config(family, tokenizer, num_labels=num_labels, layers=layers)
    torch.manual_seed(seed)
    model = getattr(transformers, _CLASSES[family, head])(config).eval()
    return model, tokenizer


def make_model_dir(
    root: str | Path, family: str, head: str, num_labels: int = 3, layers: int = 4, seed: int = 0
) -> Path:
    """Build (once) and save a tiny model + tokenizer under ``root``; returns its directory."""
    path = Path(root) / f"{family}-{head}-c{num_labels}-l{layers}-s{seed}"
    if not (path / "config.json").is_file():
        model, tokenizer = make_model(family, head, num_labels=num_labels, layers=layers, seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path
