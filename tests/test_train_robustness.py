"""bmojo train refuses what it cannot do well, naming the value: a diverging run stops at the first
non-finite step and writes nothing non-finite; re-exporting ``final`` is atomic; model overrides are
checked against BMojoConfig's fields and types."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import bmojo.train.checkpoint_io as C
from bmojo.cli import main as cli_main
from bmojo.train import TrainConfig, TrainingDivergedError, latest_checkpoint, train

MODEL = dict(hidden_size=32, num_hidden_layers=2, layer_types=["bmojo", "mamba"], intermediate_size=48,
             num_attention_heads=2, num_key_value_heads=1, sliding_window=8, fading_window=4, memory_slots=2,
             d_state=4)
DATA = dict(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=64, seed=1)
TRAIN_FLAGS = ["--model", "bmojo", "--steps", "2", "--batch-size", "8", "--vocab-size", "64", "--seq-len", "32",
               "--num-kv-pairs", "4", "--num-examples", "64", "--eval-examples", "16", "--threads", "1",
               "--distributed", "none", "--no-progress"]


def _cfg(out, **kw):
    d = dict(output_dir=str(out), model="bmojo", model_overrides=MODEL, data=DATA, steps=2, batch_size=8,
             lr=3e-3, warmup_steps=1, eval_examples=16, eval_batch_size=16, threads=1, progress=False,
             log_every=1, distributed="none")
    d.update(kw)
    return TrainConfig(**d)


def _all_finite(path):
    return all(bool(torch.isfinite(t).all()) for t in load_file(os.path.join(path, "model.safetensors")).values())


# -- divergence ---------------------------------------------------------------------------------------

def test_lr_inf_is_refused_naming_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *TRAIN_FLAGS, "--lr", "inf", "--output-dir", str(out)])
    assert "lr=inf" in str(e.value.code) and str(e.value.code).startswith("bmojo train:")
    assert not out.exists()  # refused before anything was written
    for bad in ("nan", "-1"):
        with pytest.raises(ValueError, match="lr="):
            _cfg(out, lr=float(bad))


def test_divergence_stops_at_the_first_non_finite_step_and_writes_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"at step 2: loss=nan") as e:
        train(_cfg(out, steps=4, lr=1e30, warmup_steps=0, save_every=1))
    assert "grad_norm=" in str(e.value) and "ckpt-0000001" in str(e.value)
    assert os.path.basename(latest_checkpoint(str(out))) == "ckpt-0000001"  # step 1 was still finite
    assert _all_finite(latest_checkpoint(str(out)))
    assert sorted(n for n in os.listdir(out) if n.startswith(("ckpt-", "final"))) == ["ckpt-0000001"]


def test_non_finite_parameters_are_never_saved_or_exported(tmp_path, monkeypatch):
    """A step whose loss and gradient were finite can still leave NaN parameters (the update itself
    overflowed): the checkpoint of that step and the export are refused, naming the step."""
    real = torch.optim.AdamW.step

    def poisoned(self, *a, **kw):
        result = real(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"after step 1, 1 parameter tensor\(s\) hold NaN or inf"):
        train(_cfg(out, steps=1))
    assert latest_checkpoint(str(out)) is None and not os.path.lexists(out / "final")
    with pytest.raises(C.NonFiniteStateError, match="'w' holds NaN"):  # the writer's own last line of defence
        C._require_finite({"w": torch.tensor([1.0, float("inf")])}, str(out / "x"))


def test_cli_reports_divergence_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *TRAIN_FLAGS, "--steps", "4", "--lr", "1e30", "--warmup-steps", "0",
                  "--output-dir", str(tmp_path / "run")])
    assert "training diverged at step" in str(e.value.code) and not os.path.lexists(tmp_path / "run" / "final")


# -- the final export ---------------------------------------------------------------------------------

def _final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _two_exports(tmp_path):
    """A run exported at step 1, and the weights the same run exports after step 2."""
    ref = tmp_path / "ref"
    train(_cfg(ref, steps=1))
    v1 = _final_weights(ref)
    train(_cfg(ref, steps=2))  # resumes from step 1
    v2 = _final_weights(ref)
    assert not _same(v1, v2)
    out = tmp_path / "run"
    train(_cfg(out, steps=1))
    assert _same(_final_weights(out), v1)
    return out, v1, v2


def test_final_is_swapped_atomically(tmp_path, monkeypatch):
    """Killed just before the swap, `final` is the complete old export; just after it, the complete new one;
    the next run removes what the interrupted one left."""
    out, v1, v2 = _two_exports(tmp_path)
    assert os.path.islink(out / "final")  # final -> final.v<hex>, replaced with os.replace

    def killed(*args):
        raise KeyboardInterrupt("killed before the swap")

    monkeypatch.setattr(C, "_swap_link", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, steps=2))
    assert _same(_final_weights(out), v1)  # the old export, whole
    assert json.load(open(out / "final" / "eval.json"))["step"] == 1
    monkeypatch.undo()

    def killed_after_swap(path):
        raise KeyboardInterrupt("killed after the swap, before the old export is deleted")

    monkeypatch.setattr(C, "_remove_replaced", killed_after_swap)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, steps=2))
    assert _same(_final_weights(out), v2)  # the new export, whole
    assert json.load(open(out / "final" / "eval.json"))["step"] == 2
    monkeypatch.undo()
    assert len([n for n in os.listdir(out) if n.startswith("final.v")]) == 2  # the old one is still there

    train(_cfg(out, steps=2))  # the same command again: re-exports, and cleans up
    assert _same(_final_weights(out), v2) and _all_finite(out / "final")
    left = sorted(n for n in os.listdir(out) if "final" in n or ".tmp-" in n)
    assert left == ["final", os.readlink(out / "final")], left


def test_a_plain_final_directory_is_put_back_after_a_kill(tmp_path, monkeypatch):
    """A `final` that is still a plain directory (written before exports were links) is renamed aside
    before the link goes in; a kill in between leaves it aside, and the next run puts it back."""
    out = tmp_path / "run"
    train(_cfg(out, steps=1))
    v1 = _final_weights(out)
    target = os.path.join(out, os.readlink(out / "final"))
    os.remove(out / "final")
    shutil.copytree(target, out / "final")
    shutil.rmtree(target)

    def killed(*args):
        raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(C, "_swap_link", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, steps=2))
    assert not os.path.lexists(out / "final") and any(".final.old-" in n for n in os.listdir(out))
    monkeypatch.undo()
    C.clean_stale(str(out))  # what the next run does first
    assert os.path.isdir(out / "final") and not os.path.islink(out / "final")
    assert _same(_final_weights(out), v1)
    assert not any(n.startswith((".final", "final.v")) for n in os.listdir(out))


def test_publish_without_symlinks_renames_aside(tmp_path, monkeypatch):
    """Where symbolic links are unavailable the new export is renamed in after the old is moved aside."""
    def no_symlinks(*a, **kw):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(C.os, "symlink", no_symlinks)
    for n in (1, 2):
        new = tmp_path / f".final.tmp-{n}"
        new.mkdir()
        (new / "n").write_text(str(n))
        C.publish_dir(str(new), str(tmp_path / "final"))
        assert (tmp_path / "final" / "n").read_text() == str(n) and not os.path.islink(tmp_path / "final")
    assert sorted(os.listdir(tmp_path)) == ["final"]


# -- model overrides ----------------------------------------------------------------------------------

def test_model_override_typo_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *TRAIN_FLAGS, "--model-override", "hiden_size=48", "--output-dir", str(tmp_path / "r")])
    msg = str(e.value.code)
    assert "'hiden_size'" in msg and "did you mean 'hidden_size'" in msg
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=r"unknown BMojoConfig field\(s\) \['d_sate'\].*'d_state'"):
        _cfg(tmp_path, model_overrides=dict(MODEL, d_sate=8))


@pytest.mark.parametrize("key,value,expected", [
    ("hidden_size", "abc", "int"), ("hidden_size", 48.5, "int"), ("d_state", True, "int"),
    ("layer_types", "bmojo", r"list\[str\] \| None"), ("tie_fading_kv", "yes", "bool"), ("rms_norm_eps", "small", "float"),
])
def test_model_override_of_the_wrong_type_is_refused(tmp_path, key, value, expected):
    with pytest.raises(ValueError, match=rf"model_overrides\['{key}'\]={value!r}.*expects {expected}"):
        _cfg(tmp_path, model_overrides=dict(MODEL, **{key: value}))


def test_model_override_through_the_cli_names_field_value_and_type(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *TRAIN_FLAGS, "--model-override", "hidden_size=abc", "--output-dir", str(tmp_path / "r")])
    assert "model_overrides['hidden_size']='abc' has type str; BMojoConfig.hidden_size expects int" in str(e.value.code)
    # valid overrides of every kind still pass, and reach the model
    cfg = _cfg(tmp_path, model_overrides=dict(MODEL, hidden_size=48, dt_rank="auto", rope_theta=10000,
                                              eos_token_id=[1, 2], tie_fading_kv=False))
    from bmojo.train import build_model_config

    assert build_model_config(cfg, 64).hidden_size == 48


def test_bad_model_values_are_refused_when_the_config_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig: model='bmojo'.*num_attention_heads=2 is invalid"):
        _cfg(tmp_path, model_overrides=dict(MODEL, hidden_size=33))
    with pytest.raises(ValueError, match=r"MQARConfig: seq_len=33"):
        _cfg(tmp_path, data=dict(DATA, seq_len=33))
