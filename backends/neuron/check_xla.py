"""Lazy-XLA check of a tiny bmojo model (run by ``check_xla.sh``; not part of CI).

On ``PJRT_DEVICE=CPU`` it trains a small model mixing every layer type for a few steps at two sequence
lengths and asserts what Trainium training needs from the graph (torch-neuronx runs the same lazy-tensor
machinery): after the first step of each shape no new graph is compiled, and nothing forces a device to
host sync (``aten::_local_scalar_dense``, i.e. ``.item()`` / data-dependent Python control flow). Then
it decodes greedily through the fixed-size state and asserts the same of the decoding step, and that
its logits equal the CPU's.

Without the Neuron SDK the ``neuron`` backend is unavailable, so the ops run through the torch backend
under XLA (the registry warns once); on a Trainium host the same script exercises the NKI kernels.
Ops that XLA does not lower (``aten::*`` counters: CPU fallbacks) fail the check; ``--allow-fallbacks`` only
lists them.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")


def main() -> int:
    import torch
    import torch_xla
    import torch_xla.debug.metrics as met

    from bmojo import BMojoConfig, BMojoForCausalLM

    torch.manual_seed(0)
    dev = torch_xla.device()
    sync = getattr(torch_xla, "sync", None)
    if sync is None:  # older torch_xla
        import torch_xla.core.xla_model as xm
        sync = xm.mark_step
    cfg = BMojoConfig(vocab_size=128, hidden_size=64, num_hidden_layers=5,
                      layer_types=["bmojo", "mamba", "sliding_attention", "bmojo_f", "attention"],
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                      memory_slots=4, d_state=8)
    model = BMojoForCausalLM(cfg).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # stateless: step 1 already has the steady-state graph

    def compiles() -> int:
        data = met.metric_data("CompileTime")
        return 0 if data is None else int(data[0])

    ok = True
    losses = []
    for T in (64, 96):
        counts = []
        for step in range(4):
            ids = torch.randint(0, cfg.vocab_size, (2, T)).to(dev)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            sync()
            counts.append(compiles())
        grew = [b - a for a, b in zip(counts, counts[1:])]
        print(f"T={T}: cumulative compiles after each step {counts}; new compiles after step 1: {grew}")
        if any(grew):
            ok = False
            print(f"FAIL: T={T} recompiled after its first step")
    syncs = met.counter_value("aten::_local_scalar_dense") or 0
    print(f"aten::_local_scalar_dense host syncs: {syncs}")
    if syncs:
        ok = False
        print("FAIL: device-to-host syncs inside the training step")
    ok &= check_decoding(cfg, dev, sync, compiles, met)
    fallbacks = {n: met.counter_value(n) for n in met.counter_names()
                 if n.startswith("aten::") and n != "aten::_local_scalar_dense"}
    if fallbacks:  # ops XLA does not lower run on the host: graph breaks and transfers every step
        if "--allow-fallbacks" in sys.argv:
            print(f"WARNING: ops falling back to the CPU (not lowered to XLA): {fallbacks}")
        else:
            ok = False
            print(f"FAIL: ops falling back to the CPU (not lowered to XLA): {fallbacks}")
    print("losses:", [round(float(v.cpu()), 4) for v in losses])  # read once, after the loop
    print(met.short_metrics_report())
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def check_decoding(train_cfg, dev, sync, compiles, met) -> bool:
    """Greedy decoding through the fixed-size state (every layer type but ``attention``, whose KV cache
    grows and so changes shape each step): after the first steps no new graph, no host sync, across
    chunk boundaries (w = 16, 40 steps), and the logits equal the same model's on the CPU."""
    import torch

    from bmojo import BMojoCache, BMojoConfig, BMojoForCausalLM

    types = ["bmojo", "mamba", "sliding_attention", "bmojo_f"]
    cfg = BMojoConfig(**{**train_cfg.to_dict(), "layer_types": types, "num_hidden_layers": len(types)})
    torch.manual_seed(1)
    cpu_model = BMojoForCausalLM(cfg).eval()
    model = BMojoForCausalLM(cfg).eval()
    model.load_state_dict(cpu_model.state_dict())
    model.to(dev)
    prompt = torch.randint(0, cfg.vocab_size, (2, 21))
    steps, counts, outs = 40, [], {}
    syncs_before = met.counter_value("aten::_local_scalar_dense") or 0
    with torch.no_grad():
        for name, m, device in (("xla", model, dev), ("cpu", cpu_model, torch.device("cpu"))):
            cache = BMojoCache(cfg)
            logits = m(prompt.to(device), cache=cache, use_cache=True).logits[:, -1:]
            tok, seen = logits.argmax(-1), [logits]
            for _ in range(steps):
                logits = m(tok, cache=cache, use_cache=True).logits
                tok = logits.argmax(-1)
                seen.append(logits)
                if name == "xla":
                    sync()
                    counts.append(compiles())
            outs[name] = torch.cat(seen, 1)
    syncs = (met.counter_value("aten::_local_scalar_dense") or 0) - syncs_before
    grew = [b - a for a, b in zip(counts[2:], counts[3:])]
    diff = float((outs["xla"].cpu() - outs["cpu"]).abs().max())
    print(f"decoding: compiles after each step {counts}; new compiles after step 3: {sum(grew)}; "
          f"host syncs: {syncs}; max |logits xla - cpu| over {steps} steps: {diff:.2e}")
    ok = True
    if any(grew):
        ok = False
        print("FAIL: decoding recompiled after its first steps")
    if syncs:
        ok = False
        print("FAIL: device-to-host syncs inside the decoding step")
    if not diff < 1e-3:
        ok = False
        print("FAIL: decoding on XLA differs from the CPU")
    return ok


if __name__ == "__main__":
    sys.exit(main())
