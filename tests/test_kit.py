"""The tiny-model kit builds every family and head, offline, fast, through from_pretrained."""

from __future__ import annotations

import time

import pytest
import torch
import transformers

import kit

CASES = [(family, head) for family, heads in kit.HEADS.items() for head in heads]
AUTO = {
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "multiple-choice": transformers.AutoModelForMultipleChoice,
    "seq2seq": transformers.AutoModelForSeq2SeqLM,
    "causal": transformers.AutoModelForCausalLM,
}


@pytest.mark.parametrize("family,head", CASES)
def test_loads_and_runs(tiny, family, head):
    path = tiny(family, head)
    model = AUTO[head].from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.is_fast and tokenizer.pad_token_id is not None
    assert len(tokenizer) <= model.config.vocab_size

    batch = tokenizer(["Operating profit rose.", "Answer: 3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        if head == "multiple-choice":
            out = model(**{k: v.unsqueeze(0) for k, v in batch.items()})  # one example, two options
            assert out.logits.shape == (1, 2)
        elif head == "seq2seq":
            out = model(**batch, decoder_input_ids=torch.full((2, 1), model.config.decoder_start_token_id))
            assert out.logits.shape == (2, 1, model.config.vocab_size)
        elif head == "causal":
            out = model(**batch)
            assert out.logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
        else:
            out = model(**batch)
            assert out.logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", kit.FAMILIES)
def test_option_numbers_are_single_tokens(family):
    tokenizer = kit.make_tokenizer(family)
    for n in "12345":
        assert len(tokenizer(n, add_special_tokens=False)["input_ids"]) == 1, (family, n)


def test_special_tokens():
    assert kit.make_tokenizer("bert").cls_token == "[CLS]" and kit.make_tokenizer("bert").mask_token == "[MASK]"
    t5 = kit.make_tokenizer("t5")
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    llama = kit.make_tokenizer("llama")
    assert llama.bos_token and llama.eos_token and llama.pad_token
    assert llama("hi")["input_ids"][0] == llama.bos_token_id


def test_whole_kit_builds_fast(tmp_path):
    start = time.perf_counter()
    for family, head in CASES:
        kit.make_model_dir(tmp_path, family, head, seed=1)
    assert time.perf_counter() - start < 10
    sizes = [sum(f.stat().st_size for f in d.iterdir()) for d in tmp_path.iterdir()]
    assert max(sizes) < 1_000_000


def test_same_seed_same_weights():
    a, _ = kit.make_model("bert", "sequence-classification", seed=3)
    b, _ = kit.make_model("bert", "sequence-classification", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
