"""bmojo's cuda backend, ``bmojo.backends.cuda``: Triton kernels, forward and backward (docs/design.md,
"Op API and backends").

``OPS`` maps op names to callables with the op API's signatures (``bmojo.ops``). Ops left out
(``innovation_select``, ``innovation_scores``, ``merge_memory``) and calls a kernel cannot serve (keys
before the queries; gradients through a decoding step) go to the torch backend, with a one-time warning.
Without a GPU the kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set
before triton is first imported); that is how the tests in tests/backends/cuda run.

Layout, one folder per op, one file per form: ``selective_scan/{chunk (scan fwd/bwd), fused_recurrent
(decoding step)}``, ``ssd_scan/{chunk (Mamba-2 chunked scan fwd/bwd), fused_recurrent (decoding step)}``,
``causal_conv1d/{parallel (prefill fwd/bwd), fused_recurrent (decoding step)}``,
``attention/{parallel (B'MOJO attention fwd/bwd), decode (one query over a cache)}``; ``utils.py``.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bmojo.backends.cuda (the cuda backend) needs Triton, which is not importable here "
        f"({e}). Install it with: pip install 'bmojo[cuda]'"
    ) from e

from .attention import attention_decode, bmojo_attention
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .selective_scan import selective_scan, selective_state_update
from .ssd_scan import ssd_scan, ssd_state_update

OPS = {
    "selective_scan": selective_scan,
    "selective_state_update": selective_state_update,
    "causal_conv1d": causal_conv1d,
    "causal_conv1d_update": causal_conv1d_update,
    "bmojo_attention": bmojo_attention,
    "attention_decode": attention_decode,
    "ssd_scan": ssd_scan,
    "ssd_state_update": ssd_state_update,
}

__all__ = ["OPS", *OPS]
