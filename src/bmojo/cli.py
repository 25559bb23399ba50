"""The ``bmojo`` command line."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

from .bench import PeakMemory, format_table, machine_description, time_call


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def cmd_zoo(args) -> int:
    """Build each zoo preset at a tiny size; time a forward pass and a short generation on the CPU."""
    from . import BMojoForCausalLM
    from .presets import MEMBERS, preset_config

    members = args.members or list(MEMBERS)
    for m in members:
        if m not in MEMBERS:
            raise SystemExit(f"bmojo zoo: unknown member {m!r}; choose from {', '.join(MEMBERS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for member in tqdm(members, desc="zoo", unit="model"):
        model = BMojoForCausalLM(preset_config(member, args.size, backend=args.backend)).eval()
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
        with torch.no_grad():
            fwd = time_call(lambda: model(ids, use_cache=False), warmup=1, repeat=3)
            with PeakMemory() as mem:
                model(ids, use_cache=False)
            prompt = ids[:, : min(16, args.seq_len)]
            model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            gen = time.perf_counter() - t0
        rows.append({
            "model": member,
            "layers": ",".join(sorted(set(model.config.layer_types))),
            "params": sum(p.numel() for p in model.parameters()),
            "forward tok/s": args.batch * args.seq_len / fwd,
            "generate tok/s": args.batch * (out.shape[1] - prompt.shape[1]) / gen,
            "peak MiB": None if mem.peak is None else mem.peak / 2**20,
        })
    print(f"\nbmojo zoo: {args.size} presets, batch {args.batch}, forward T={args.seq_len}, "
          f"generate {args.new_tokens} tokens after 16; backend={args.backend}")
    print(f"machine: {machine_description()}\n")
    print(format_table(rows))
    return 0


def cmd_presets(args) -> int:
    """Every preset: parameters, decode-time state per sequence, parameter bytes per layer; or, with
    ``--write ROOT``, the preset folders (config.json and a model card each)."""
    from .presets import PAPER_SIZES, SIZES, preset_table, write_preset_configs

    for s in args.sizes:
        if s not in SIZES:
            raise SystemExit(f"bmojo presets: unknown size {s!r}; choose from {', '.join(SIZES)}")
    if args.write:
        for path in write_preset_configs(args.write, args.sizes or PAPER_SIZES):
            print(path)
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(format_table(preset_table(args.sizes or PAPER_SIZES, dtype)))
    print(f"\nstate/seq: decode-time state of one sequence ({args.dtype} keys/values/conv, fp32 SSM state); "
          "fixed for every layer type but attention, whose KV cache grows by grows/token.\n"
          f"MiB/layer: parameter bytes of one layer of each type at {args.dtype}. "
          "Presets ship as checkpoints/<preset>/config.json.")
    return 0


def cmd_convert(args) -> int:
    """Convert a checkpoint of another library (see ``bmojo convert --help``) into a bmojo checkpoint."""
    from .convert import convert

    try:
        out = convert(args.source, args.output, source_format=args.source_format, allow_pickle=args.allow_pickle,
                      overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConversionError (a ValueError) names the file; OSError names the path
        raise SystemExit(f"bmojo convert: {e}") from None
    print(f"wrote {out}")
    return 0


CONVERT_SOURCES = """sources (--from; detected from config.json by default):
  hf-mamba      transformers MambaForCausalLM (model_type "mamba")    -> all mamba layers, no MLP
  hf-mamba2     transformers Mamba2ForCausalLM (model_type "mamba2")  -> all mamba2 layers, no MLP
  hf-llama      transformers LlamaForCausalLM (model_type "llama")    -> all attention layers (transformer)
  mamba-ssm     mamba-ssm MambaLMHeadModel (config.json with d_model, n_layer; Mamba1 or Mamba2 layers)
  hybrid-qwen3  hybrid-model-factory's hybrid_qwen3 (the authors' B'MOJO-F checkpoints): '*' -> attention,
                'SWA' -> sliding_attention, 'BMF' -> bmojo_f with the Mamba-2 fading mixer, 'M2' -> mamba2
Unsupported settings (GKA/GDN layers or fading mixers, LayerNorm, length-dependent RoPE, ...) are refused with
the field named; nothing is written on error. The source must be a local directory (nothing is downloaded)."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_bench(args) -> int:
    """Every shipped checkpoint x every backend that runs here, with transformers' own Mamba and Llama."""
    from .bench.run import QUICK, BenchSettings, run_bench, write_outputs

    settings = BenchSettings(checkpoints=args.checkpoints, models=args.models, backends=args.backends,
                             batch=args.batch, dtype=args.dtype, threads=args.threads,
                             baselines=not args.no_baselines, output=args.output,
                             check_memory=not args.no_memory_check)
    if args.quick:
        for k, v in QUICK.items():
            setattr(settings, k, v)
    if args.contexts:
        settings.contexts = args.contexts
    if args.decode_tokens:
        settings.decode_tokens = args.decode_tokens
    rows = run_bench(settings)
    print(write_outputs(rows, settings, as_json=args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmojo", description="B'MOJO model zoo: build, compare, benchmark.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare every shipped checkpoint on every backend here (the main job)")
    b.add_argument("--quick", action="store_true", help="contexts 1K and 2K, few decode steps (< 2 minutes on 2 CPU cores)")
    b.add_argument("--checkpoints", help="directory of checkpoints (default: the repository's checkpoints/)")
    b.add_argument("--models", nargs="*", help="checkpoint names to run (default: all with weights)")
    b.add_argument("--backends", nargs="*", choices=["torch", "cuda", "neuron"], help="default: all that run here")
    b.add_argument("--contexts", type=_int_list, help="comma-separated context lengths (default 1024,...,32768)")
    b.add_argument("--decode-tokens", type=_positive_int, help="decoding steps timed after each prompt")
    b.add_argument("--batch", type=_positive_int, default=1)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    b.add_argument("--no-baselines", action="store_true", help="skip transformers' MambaForCausalLM / LlamaForCausalLM")
    b.add_argument("--no-memory-check", action="store_true",
                   help="run points whose estimated memory exceeds what is available (refused by default)")
    b.add_argument("--output", default="bench_out", help="folder for results.md/.csv/.json and the plots")
    b.add_argument("--json", action="store_true", help="print JSON instead of the table")
    b.set_defaults(func=cmd_bench)
    z = sub.add_parser("zoo", help="build every zoo preset at a tiny size and time forward + generate on CPU")
    z.add_argument("--members", nargs="*", help="presets to run (default: all)")
    z.add_argument("--size", default="tiny", help="preset size (default tiny)")
    z.add_argument("--seq-len", type=_positive_int, default=256)
    z.add_argument("--batch", type=_positive_int, default=1)
    z.add_argument("--new-tokens", type=_positive_int, default=32)
    z.add_argument("--threads", type=_positive_int, default=torch.get_num_threads())
    z.add_argument("--backend", default="torch", choices=["auto", "torch", "cuda", "neuron"])
    z.set_defaults(func=cmd_zoo)
    from .train.config import add_train_arguments  # the trainer's flags live beside its config
    add_train_arguments(sub.add_parser("train", help="train a zoo model on MQAR (one process, or torchrun: DDP / FSDP2)"))
    pr = sub.add_parser("presets", help="table of every zoo preset: parameters, decode state, bytes per layer")
    pr.add_argument("--sizes", nargs="*", default=[], help="sizes to list (default: 130m 370m 790m 1.4b)")
    pr.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    pr.add_argument("--write", metavar="ROOT", help="write ROOT/<member>-<size>/{config.json,README.md} instead "
                    "(the shipped checkpoints/ folders; same as python -m bmojo.presets --write ROOT)")
    pr.set_defaults(func=cmd_presets)
    from .convert import FORMATS

    cv = sub.add_parser("convert", help="convert a HF Mamba / Mamba-2 / Llama, mamba-ssm or hybrid_qwen3 (B'MOJO-F) "
                        "checkpoint", description="Convert a checkpoint into a bmojo checkpoint with the same logits.",
                        epilog=CONVERT_SOURCES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cv.add_argument("source", help="checkpoint directory (config.json + safetensors), or a mamba-ssm weights file")
    cv.add_argument("output", help="directory to write the bmojo checkpoint to (must not exist unless --overwrite)")
    cv.add_argument("--from", dest="source_format", default="auto", choices=["auto", *FORMATS],
                    help="source layout (default: detected from config.json)")
    cv.add_argument("--allow-pickle", action="store_true",
                    help="also read pickled .bin/.pt weights (with torch.load(weights_only=True))")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    cv.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
