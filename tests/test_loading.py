"""Bad checkpoints fail with errors naming the file, the tensor and the values; nothing is unpickled
unless asked, and then only with weights_only=True."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bmojo import BMojoForCausalLM, BMojoModel
from bmojo.checkpoint import CheckpointError
from bmojo_testing import tiny_config


@pytest.fixture()
def ckpt(tmp_path):
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba"])).eval()
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(ckpt, fn):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|not a readable)"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_corrupted_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.1\.mixer\.A_log'\]"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mixer.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mixer\.extra' \[3\]"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_shape_mismatch_names_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[31\] but the config expects \[32\]"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_dtype_mismatch(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I32"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_config_contradicting_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_state"] = 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"A_log' has shape \[64, 4\] but the config expects \[64, 8\]"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_pickled_weights_refused_unless_allowed(ckpt, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    os.remove(ckpt / "model.safetensors")
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights.*allow_pickle=True"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    loaded = BMojoForCausalLM.from_pretrained(ckpt, allow_pickle=True)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_base_model_loads_lm_checkpoint(ckpt):
    base = BMojoModel.from_pretrained(ckpt)
    assert isinstance(base, BMojoModel)


def test_save_refuses_pickle(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        BMojoForCausalLM(tiny_config(["mamba"])).save_pretrained(tmp_path, safe_serialization=False)
