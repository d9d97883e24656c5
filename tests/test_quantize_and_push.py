"""scripts/quantize_and_push.py end to end, offline: real SmolLM2, real huggingface_hub client, fake Hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_llmqTESTtoken1234567890"
REPO = "someone/smollm2-w8a8"


@pytest.mark.slow
def test_quantize_and_push_end_to_end(tmp_path, smol_folder):
    out = tmp_path / "out"
    with FakeHub(tmp_path / "hub", token=TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1",
               "TQDM_DISABLE": "1"}
        cmd = [sys.executable, str(ROOT / "scripts" / "quantize_and_push.py"), "llmq:smollm2", REPO,
               "--out", str(out), "--method", "smoothquant", "--alpha", "0.5",
               "--set", "calibration.samples=4", "--set", "calibration.seq_len=128",
               "--set", "evaluation.max_tokens=1024", "--set", "evaluation.seq_len=512"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert TOKEN not in r.stdout + r.stderr
        arrived = hub._branch_dir(REPO, "main")
        local = sorted(p.name for p in out.iterdir())
        assert sorted(p.name for p in arrived.iterdir()) == local
        for name in local:
            assert (arrived / name).read_bytes() == (out / name).read_bytes(), name
            assert TOKEN.encode() not in (out / name).read_bytes()
    report = json.loads((out / "llmq_report.json").read_text())
    assert report["evaluation"]["int8"]["kl_divergence"] > 0
    assert f"{report['evaluation']['int8']['perplexity']:.3f}" in (out / "README.md").read_text()
    check = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "a = AutoModelForCausalLM.from_pretrained(sys.argv[1]); b = AutoModelForCausalLM.from_pretrained(sys.argv[2])\n"
        "ids = AutoTokenizer.from_pretrained(sys.argv[1])('The quick brown fox', return_tensors='pt').input_ids\n"
        "with torch.no_grad(): assert torch.equal(a(ids).logits, b(ids).logits)\n"
        "assert type(a.model.layers[0].mlp.down_proj).__name__ == 'Linear8bitLt'\n"
        "assert 'llmq' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", check, str(arrived), str(out)], check=True, timeout=300)
