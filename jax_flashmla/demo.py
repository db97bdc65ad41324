"""Batched greedy generation with a small MLA decoder (random weights): the package's main job.

    python -m jax_flashmla.demo [--size tiny|small|v3-attention] [--batch B] [--prompt-lens 5,17,64]
                                [--steps N] [--implementation auto|xla|cuda]

Prefills requests of different prompt lengths into a paged latent cache, then decodes them
together, one token per request per step, showing a progress bar; prints per-step latency,
tokens/s, and which attention path ran (the CUDA kernels on Hopper, pure JAX elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import numpy as np


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints; got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jax_flashmla.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="auto", help="model preset: tiny, small, v3-attention; auto = tiny on CPU, small on GPU")
    p.add_argument("--layers", type=_positive_int, help="override the preset's number of layers")
    p.add_argument("--heads", type=_positive_int, help="override the preset's number of attention heads")
    p.add_argument("--hidden", type=_positive_int, help="override the preset's hidden size")
    p.add_argument("--batch", type=_positive_int, help="requests decoded together (default 4 on CPU, 16 on GPU)")
    p.add_argument("--prompt-lens", type=_int_list,
                   help="prompt lengths, cycled over the batch (default 5,17,64,130 on CPU; 37,200,511,1000 on GPU)")
    p.add_argument("--steps", type=_positive_int, help="new tokens per request (default 32 on CPU, 128 on GPU)")
    p.add_argument("--implementation", choices=["auto", "xla", "cuda"], default="auto",
                   help="attention path: auto = CUDA kernels on Hopper, pure JAX elsewhere")
    p.add_argument("--per-layer-cache", action="store_true", help="one page table per layer instead of one shared layout")
    p.add_argument("--eos-id", type=int, default=None, help="token id that ends a request early")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _config(args, on_gpu: bool):
    from .nn import PRESETS

    size = args.size if args.size != "auto" else ("small" if on_gpu else "tiny")
    if size not in PRESETS:
        raise SystemExit(f"--size must be one of {', '.join(PRESETS)} or auto; got {size!r}")
    cfg = PRESETS[size]
    attn = cfg.attention
    if args.heads:
        attn = dataclasses.replace(attn, num_heads=args.heads)
    if args.hidden:
        attn = dataclasses.replace(attn, hidden_size=args.hidden)
    cfg = dataclasses.replace(cfg, attention=attn, num_layers=args.layers or cfg.num_layers)
    return size, cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from flax import nnx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import build_info
    from .nn import GreedyGenerator, MLADecoder

    console = Console()
    if not console.is_terminal:  # logs: do not wrap at rich's default 80 columns
        console.width = 120
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    size, cfg = _config(args, on_gpu)
    batch = args.batch or (16 if on_gpu else 4)
    steps = args.steps or (128 if on_gpu else 32)
    lens_cycle = args.prompt_lens or ([37, 200, 511, 1000] if on_gpu else [5, 17, 64, 130])
    prompt_lens = np.array([lens_cycle[i % len(lens_cycle)] for i in range(batch)], np.int32)
    max_prompt = int(prompt_lens.max())
    impl = None if args.implementation == "auto" else args.implementation

    a = cfg.attention
    build = build_info()
    console.print(f"[bold]jax_flashmla demo[/bold]: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
                  f"CUDA extension {'loaded' if build['cuda_extension'] else 'absent'}")
    if not build["cuda_extension"]:
        console.print(f"  ({build['why_no_extension']})", markup=False)
    t0 = time.perf_counter()
    model = MLADecoder(cfg, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    console.print(
        f"model '{size}': {cfg.num_layers} layers, hidden {a.hidden_size}, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.1f}M params, random weights ({time.perf_counter() - t0:.1f} s to initialise)"
    )
    console.print(
        f"attention: MLA, {a.num_heads} heads (nope {a.qk_nope_head_dim} + rope {a.qk_rope_head_dim}, "
        f"v {a.v_head_dim}), q_lora_rank {a.q_lora_rank}, kv_lora_rank {a.kv_lora_rank}, "
        f"RoPE {'YaRN x%g' % a.rope_scaling.factor if a.rope_scaling else 'plain'}"
    )

    # Room for every request's prompt and new tokens, with one page of slack each.
    max_blocks = math.ceil((max_prompt + steps) / 64) + 1
    num_pages = batch * max_blocks
    cache = model.init_cache(batch, num_pages, max_blocks, shared_layout=not args.per_layer_cache)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, size=(batch, max_prompt), dtype=np.int32)
    console.print(
        f"batch {batch}, prompt lengths {', '.join(map(str, lens_cycle))}"
        f"{' (cycled over the batch)' if batch > len(lens_cycle) else ''}, {steps} new tokens each"
    )
    console.print(
        f"paged latent cache: {num_pages} pages of 64 tokens x 576 per layer, "
        f"{'one page table per layer' if args.per_layer_cache else 'one page table shared by the layers'}"
    )

    gen = GreedyGenerator(model, implementation=impl, eos_id=args.eos_id)
    progress = Progress(
        TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[lat]}"),
        TimeElapsedColumn(), console=console, disable=args.no_progress, transient=False,
    )
    with progress:
        task = progress.add_task("decode", total=steps - 1, lat="")

        def on_step(i, seconds):
            progress.update(task, advance=1, lat=f"{seconds * 1e3:7.2f} ms/step")

        result, cache = gen.generate(prompts, prompt_lens, steps, cache, on_step=on_step)

    step_s = np.asarray(result.step_seconds)
    generated = int((result.tokens >= 0).sum())
    decode_tokens = int((result.tokens[:, 1:] >= 0).sum())
    med, p10, p90 = (float(np.percentile(step_s, q)) * 1e3 for q in (50, 10, 90)) if step_s.size else (0.0,) * 3
    tps = decode_tokens / step_s.sum() if step_s.size else 0.0
    console.print(f"attention path: [bold]{result.attention_path}[/bold]")
    console.print(f"compile: {result.compile_seconds:.1f} s; prefill ({int(prompt_lens.sum())} prompt tokens): "
                  f"{result.prefill_seconds * 1e3:.1f} ms")
    console.print(f"decode: {len(step_s)} steps, per-step latency median {med:.2f} ms (p10 {p10:.2f}, p90 {p90:.2f}), "
                  f"{tps:,.0f} tokens/s ({generated} tokens generated)")
    for i in range(min(batch, 4)):
        toks = result.tokens[i][result.tokens[i] >= 0]
        console.print(f"  request {i} (prompt {prompt_lens[i]}): {toks[:12].tolist()}{' ...' if toks.size > 12 else ''}")
    console.print(f"cache after generation: {int(cache.pages_in_use())} pages in use (every finished request freed)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "device": device.device_kind, "platform": device.platform, "size": size, "batch": batch,
                "prompt_lens": prompt_lens.tolist(), "steps": steps, "attention_path": result.attention_path,
                "prefill_ms": result.prefill_seconds * 1e3, "step_ms": (step_s * 1e3).tolist(),
                "median_step_ms": med, "tokens_per_s": tps, "tokens": result.tokens.tolist(),
            }, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
