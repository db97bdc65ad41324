"""The Flax MLA layer and the decoder on the H100: the kernel path against the pure-JAX path and
against float64 naive MLA."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax", reason="jax_flashmla.nn needs flax (pip install '.[test]')")
from flax import nnx  # noqa: E402

from jax_flashmla.nn import DecoderConfig, GreedyGenerator, MLAConfig, MLADecoder, YarnScaling  # noqa: E402

from nn_reference import check_layer_against_naive  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "q_lora, yarn, t_dec, dtype", [(None, False, 1, "bf16"), (48, True, 2, "bf16"), (48, True, 1, "fp16")]
)
def test_absorbed_decode_on_the_kernel_matches_naive_mla(q_lora, yarn, t_dec, dtype):
    check_layer_against_naive(q_lora, yarn, t_dec, dtype, jit=True, implementation="cuda")


def test_kernel_and_pure_jax_generate_the_same_greedy_tokens():
    """Fixed seed; the default (auto) path must be the kernel here. Logits are compared at every
    step relative to their spread across the vocabulary."""
    cfg = DecoderConfig(
        vocab_size=4096, num_layers=4, mlp_hidden_size=1024,
        attention=MLAConfig(hidden_size=512, num_heads=16, q_lora_rank=192, qk_nope_head_dim=128, v_head_dim=128,
                            rope_scaling=YarnScaling(factor=40.0, original_max_position=4096)),
    )
    model = MLADecoder(cfg, rngs=nnx.Rngs(2026))
    rng = np.random.default_rng(2026)
    lens = np.array([5, 64, 65, 200, 1000, 1, 333, 700, 0, 129], np.int32)
    b, steps = lens.size, 24
    prompts = rng.integers(0, cfg.vocab_size, (b, int(lens.max()))).astype(np.int32)
    max_blocks = -(-(int(lens.max()) + steps) // 64)
    results = {}
    for impl in (None, "xla"):
        cache = model.init_cache(b, b * max_blocks, max_blocks, fill=np.nan)
        res, cache = GreedyGenerator(model, implementation=impl).generate(prompts, lens, steps, cache, keep_logits=True)
        assert int(cache.pages_in_use()) == 0
        results[impl] = res
    kernel, pure = results[None], results["xla"]
    assert kernel.attention_path.startswith("CUDA kernels (4 x jax_flashmla_mla_decode_v1, 1 x"), kernel.attention_path
    assert pure.attention_path == "pure JAX (XLA)"
    live = lens > 0
    diff = np.abs(kernel.logits - pure.logits)[live]
    spread = pure.logits[live].std(axis=-1, keepdims=True)
    rel = diff / spread
    top2 = np.sort(pure.logits[live], axis=-1)[..., -2:]
    margin = ((top2[..., 1] - top2[..., 0]) / spread[..., 0]).min()
    print(f"\nlogits |kernel - pure| / std: max {rel.max():.2e}, mean {rel.mean():.2e}; "
          f"smallest top-2 margin / std {margin:.2e}; tokens equal: {np.array_equal(kernel.tokens, pure.tokens)}")
    mismatch = np.argwhere(kernel.tokens != pure.tokens)
    assert mismatch.size == 0, f"greedy tokens differ at (request, step) {mismatch[:5].tolist()}"
    assert rel.max() <= 3e-2 and rel.mean() <= 3e-3, f"logits differ: max {rel.max():.2e}, mean {rel.mean():.2e} x std"
    assert (kernel.tokens[~live] == -1).all()
