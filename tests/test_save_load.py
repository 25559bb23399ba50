"""Safetensors round trip, AutoModel registration, and trust_remote_code without importing bmojo."""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import bmojo
from bmojo import BMojoForCausalLM, BMojoModel
from bmojo_testing import tiny_config


def test_round_trip_and_auto_classes(tmp_path):
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba", "attention"], rope_theta=10000.0)).eval()  # RoPE: a non-persistent buffer
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bmojo" and "auto_map" not in cfg  # no code travels with the weights
    assert not any(f.endswith(".py") for f in files)
    ids = torch.randint(0, 64, (2, 21))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BMojoForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), BMojoModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), bmojo.BMojoConfig)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied


def test_trust_remote_code_in_fresh_process(tmp_path):
    """On request (remote_code=True) a checkpoint carries an auto_map and two one-line files importing
    the installed bmojo, so trust_remote_code=True loads it without `import bmojo`."""
    model = BMojoForCausalLM(tiny_config(["bmojo_f", "sliding_attention"])).eval()
    model.save_pretrained(tmp_path / "ckpt", remote_code=True)
    assert sorted(f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".py")) == ["configuration_bmojo.py",
                                                                                  "modeling_bmojo.py"]
    assert getattr(model.config, "auto_map", None) is None  # the model's own config is left as it was
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "bmojo" not in sys.modules
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
ref = torch.load({str(tmp_path / 'ref.pt')!r})
with torch.no_grad():
    err = (m(ref["ids"]).logits - ref["logits"]).abs().max().item()
print(type(m).__name__, err)
assert err == 0.0
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "BMojoForCausalLM 0.0" in res.stdout
