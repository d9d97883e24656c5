"""Text sources and token windows (llmq/data.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_tokenizer  # noqa: E402

from llmq import data  # noqa: E402
from llmq.data import bos_id, calibration_set, calibration_windows, eval_windows, load_text, tokenize  # noqa: E402
from llmq.errors import ConfigError, DataError  # noqa: E402

SMOL = Path("/tmp/proto/smol_fp")
TEXT = ("The quick brown fox jumps over the lazy dog's back; it isn't 1234567 times.\n\n"
        " = = History = = \n\nAnarchism   is a  political philosophy,\tnot a 'thing'...\n"
        "Zhuangzi wrote:   \"A petty thief is put in jail.\"  \n\n\n  Numbers 3.14159 and 2,718 — ü.\n")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tiny byte-level BPE (the SmolLM2/GPT-2 kind) that adds <s> unless told not to; max length 16."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT] * 3, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", model_max_length=16)


# --- windows ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, seq_len, sizes", [(10, 4, [4, 4, 2]), (9, 4, [4, 4]), (8, 4, [4, 4]),
                                               (2, 4, [2]), (5, 5, [5]), (7, 2, [2, 2, 2])])
def test_eval_windows_counts_and_partial_last(n, seq_len, sizes):
    ids = torch.arange(100, 100 + n)
    wins = eval_windows(ids, seq_len)
    assert [len(w) for w in wins] == sizes
    assert torch.equal(torch.cat(wins), ids[: sum(sizes)])  # consecutive, non-overlapping, in order


def test_eval_windows_too_short():
    with pytest.raises(DataError, match="at least 2 tokens"):
        eval_windows(torch.tensor([5]), 4)
    with pytest.raises(DataError):
        eval_windows(torch.tensor([], dtype=torch.long), 4)


def test_calibration_windows_shape_determinism_disjoint():
    ids = torch.arange(1000, 1000 + 103)  # 10 slots of 10, 3 tokens left over
    a = calibration_windows(ids, samples=4, seq_len=10, seed=0)
    assert a.shape == (4, 10) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(ids, samples=4, seq_len=10, seed=0))
    # each row is one whole slot, slots distinct and in ascending order
    slots = [(int(r[0]) - 1000) // 10 for r in a]
    assert slots == sorted(set(slots))
    for s, row in zip(slots, a, strict=True):
        assert torch.equal(row, ids[s * 10:(s + 1) * 10])
    seeds = {tuple(calibration_windows(ids, 4, 10, seed=s)[:, 0].tolist()) for s in range(8)}
    assert len(seeds) > 1  # the seed changes the choice
    full = calibration_windows(ids, samples=10, seq_len=10, seed=3)  # all slots, in order
    assert torch.equal(full.reshape(-1), ids[:100])


def test_calibration_windows_too_short_message():
    with pytest.raises(DataError) as e:
        calibration_windows(torch.arange(95), samples=10, seq_len=10, seed=0)
    msg = str(e.value)
    assert "95 tokens" in msg and "10 samples x 10 tokens needs 100" in msg and "--calib-samples" in msg


# --- local files -----------------------------------------------------------------------------------------
def test_load_txt_jsonl_json(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "hello\nworld\n"
    assert load_text(str(tmp_path / "a.txt"), "calibration") == "hello\nworld\n"
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert load_text(str(tmp_path / "a.jsonl")) == "one\n\ntwo"
    for content in (["x", "y"], [{"text": "x"}, {"text": "y"}], {"text": ["x", "y"]}):
        (tmp_path / "a.json").write_text(json.dumps(content), encoding="utf-8")
        assert load_text(str(tmp_path / "a.json")) == "x\n\ny"


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"  \n\t\n", "empty"),
    ("bin.txt", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not UTF-8"),
    ("nul.txt", b"abc\x00def", "binary"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2: expected an object"),
    ("bad.json", b'{"text": "not a list"}', "must hold a list"),
    ("bad2.json", b"[1, 2]", "item 0"),
    ("data.csv", b"text\nhello\n", "unsupported extension"),
])
def test_load_file_errors(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_text(str(tmp_path / name))


def test_load_missing_and_unknown(tmp_path):
    for source in (str(tmp_path / "nope.txt"), str(tmp_path), "wikitext-103"):
        with pytest.raises(DataError, match="is not a file") as e:
            load_text(source)
        assert "llmq:wiki" in str(e.value) and ".jsonl" in str(e.value) and "wikitext2" in str(e.value)
    with pytest.raises(ConfigError, match="purpose"):
        load_text(str(tmp_path / "nope.txt"), "training")


def test_load_offline_wiki_uses_split(tmp_path, monkeypatch):
    from llmq import assets

    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    articles = [f" = A{i} = \n\nBody {i} " + "x" * 100 for i in range(10)]
    (tmp_path / "wiki").mkdir()
    assets.wiki_text_path().write_text("\n\n".join(articles) + "\n", encoding="utf-8")
    ev, cal = load_text("llmq:wiki", "evaluation"), load_text("llmq:wiki", "calibration")
    # article k ends at e_k = k*L + 2(k-1); e_8 < 0.8 * (10L + 19) <= e_9: the first 9 articles evaluate
    assert ev == "\n\n".join(articles[:9]) and cal == articles[9]


# --- named datasets (a fake `datasets` module; never the network) ----------------------------------------
def test_named_datasets_arguments(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a", "b"]}

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert load_text("wikitext2", "evaluation") == "a\n\nb"
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    load_text("wikitext2", "calibration")
    assert calls[-1][1] == {"split": "train"}
    load_text("c4", "evaluation")
    assert calls[-1][0] == ("allenai/c4",) and calls[-1][1]["split"] == "validation"
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    load_text("c4", "calibration")
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    load_text("pile-val", "calibration")
    assert calls[-1] == (("mit-han-lab/pile-val-backup",), {"split": "validation"})


def test_named_dataset_offline_is_a_data_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as e:
        load_text("wikitext2")
    msg = str(e.value)
    assert "needs the Hugging Face Hub" in msg and "Couldn't reach" in msg and "llmq:wiki" in msg
    assert "\n" not in msg


# --- tokenize --------------------------------------------------------------------------------------------
def test_tokenize_no_special_tokens_int64(bpe_tokenizer):
    warned = "sequence-length-is-longer-than-the-specified-maximum"
    bpe_tokenizer.deprecation_warnings.pop(warned, None)
    ids = tokenize(bpe_tokenizer, TEXT)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    # longer than model_max_length (16) without the "sequence length is longer" warning
    assert len(ids) > 16 and warned not in bpe_tokenizer.deprecation_warnings
    full = bpe_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert warned in bpe_tokenizer.deprecation_warnings  # the plain call does warn
    assert ids.tolist() == full and bpe_tokenizer(TEXT)["input_ids"][0] == 0  # <s> only when asked


def test_tokenize_prefix_equals_whole(bpe_tokenizer, monkeypatch):
    text = TEXT * 40
    whole = bpe_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    # a prefix cut inside a word does NOT tokenize like the whole text: the check below can fail
    cut = text.index("quick", 500) + 2
    naive = bpe_tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    assert naive != whole[: len(naive)]
    encoded = []
    real_encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, t: encoded.append(len(t)) or real_encode(tok, t))
    monkeypatch.setattr(data, "_PREFIX_CHARS_PER_TOKEN", 1)  # start too short: forces the doubling loop
    monkeypatch.setattr(data, "_PREFIX_MARGIN", 3)
    for k in [1, 2, 3, 50, 97, 200, 333, len(whole) - 5, len(whole), len(whole) + 10]:
        encoded.clear()
        assert tokenize(bpe_tokenizer, text, max_tokens=k).tolist() == whole[:k], k
        if k <= 333:
            assert max(encoded) < len(text)  # only a prefix was tokenized


@pytest.mark.slow
def test_tokenize_prefix_real_tokenizer():
    from transformers import AutoTokenizer

    from llmq.assets import wiki_text_path

    tok = AutoTokenizer.from_pretrained(SMOL if SMOL.is_dir() else _smol_folder())
    text = wiki_text_path().read_text(encoding="utf-8")
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(whole) > 500_000
    for k in (1, 1000, 20480, 65536):
        assert tokenize(tok, text, max_tokens=k).tolist() == whole[:k], k
    assert tokenize(tok, load_text("llmq:wiki"), max_tokens=20480).tolist() == whole[:20480]
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings


def _smol_folder() -> Path:
    from llmq.assets import model_folder

    return model_folder()


# --- BOS ---------------------------------------------------------------------------------------------------
def test_bos_id_auto_follows_the_tokenizer(bpe_tokenizer):
    """auto: the BOS id when the tokenizer puts one before plain text itself (this BPE does, like Gemma's);
    None when it does not (the conftest tokenizer has a bos_token but adds nothing, like SmolLM2's)."""
    assert bpe_tokenizer("a")["input_ids"][0] == bpe_tokenizer.bos_token_id == 0
    assert bos_id(bpe_tokenizer, "auto") == 0
    tokenizer = tiny_tokenizer()
    assert tokenizer.bos_token_id is not None and bos_id(tokenizer, "auto") is None
    assert bos_id(tokenizer, True) == tokenizer.bos_token_id
    assert bos_id(bpe_tokenizer, False) is None


def test_bos_true_without_a_bos_token_is_an_error(bpe_tokenizer):
    from types import SimpleNamespace

    no_bos = SimpleNamespace(bos_token_id=None)
    with pytest.raises(ConfigError, match="calibration.bos is true but the tokenizer has no bos_token_id"):
        bos_id(no_bos, True, "calibration.bos")
    assert bos_id(no_bos, "auto") is None


@pytest.mark.parametrize("bos", ["auto", False])
def test_calibration_set_puts_bos_first_when_the_tokenizer_does(bpe_tokenizer, bos):
    from llmq.config import Calibration

    text = TEXT * 40
    cal = Calibration(source="unused", samples=3, seq_len=8, seed=1, bos=bos)
    wins = calibration_set(bpe_tokenizer, cal, text=text)
    assert wins.shape == (3, 8) and wins.dtype == torch.long
    ids = tokenize(bpe_tokenizer, text, max_tokens=8 * 3 * 8)
    if bos == "auto":  # BOS + the text windows of seq_len - 1 that calibration_windows picks
        assert (wins[:, 0] == 0).all()
        assert torch.equal(wins[:, 1:], calibration_windows(ids, 3, 7, 1))
    else:
        assert torch.equal(wins, calibration_windows(ids, 3, 8, 1))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bos_setting_is_validated(bad):
    from llmq.config import Calibration, Evaluation

    for cls, where in ((Calibration, "calibration.bos"), (Evaluation, "evaluation.bos")):
        with pytest.raises(ConfigError, match=f"{where} must be true, false or auto"):
            cls(bos=bad)
