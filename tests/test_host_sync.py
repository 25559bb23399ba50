"""A decoding step never reads a tensor back to the host (on a GPU each read is a synchronisation; under
XLA a graph break): checked on CPU by running steps under a dispatch mode that fails on every op that
moves a value to the host."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bmojo import BMojoCache, BMojoForCausalLM
from bmojo_testing import lively, tiny_config

HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


class NoHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.add(name)
        if name in HOST_READS:
            raise AssertionError(f"host read in a decoding step: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True], ids=["uniform", "left-padded"])
@pytest.mark.parametrize("rope", [False, True], ids=["nope", "rope"])
def test_decoding_steps_read_nothing_back(padded, rope):
    model = lively(BMojoForCausalLM(tiny_config(["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
                                                rope_theta=10000.0 if rope else None))).eval()
    ids = torch.randint(1, 64, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    cache = BMojoCache(model.config)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        guard = NoHostReads()
        with guard:  # 20 steps: two chunk boundaries of w = 8 for every row
            for _ in range(20):
                token = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                logits = model(token, attention_mask=mask, cache=cache).logits[:, -1]
    assert "aten::mm" in guard.ops or "aten::addmm" in guard.ops  # the mode saw the step's ops
