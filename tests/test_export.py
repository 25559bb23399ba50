"""Traceability (what Trainium and torch.compile need): the whole model exports with torch.export at
static shapes, with no graph break, no data-dependent shape and no host synchronisation."""
import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo_testing import tiny_config


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


@pytest.mark.parametrize("layer_type", ["attention", "sliding_attention", "mamba", "bmojo_f", "bmojo"])
def test_export_reproduces_eager(layer_type):
    model = BMojoForCausalLM(tiny_config([layer_type, layer_type])).eval()
    ids = torch.randint(0, 64, (2, 21))  # 2 full chunks of w=8 and a remainder: memory is live
    program = torch.export.export(LogitsOnly(model), (ids,), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("_local_scalar_dense" in t or "nonzero" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids).logits, atol=1e-5, rtol=0)
