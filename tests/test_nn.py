"""The Flax MLA layer, the paged latent cache and the decoder, on the pure-JAX path (CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax", reason="jax_flashmla.nn needs flax (pip install '.[test]')")
from flax import nnx  # noqa: E402

import jax_flashmla as jf  # noqa: E402
from jax_flashmla.cache import POISON_PAGE  # noqa: E402
from jax_flashmla.nn import (  # noqa: E402
    DecoderConfig,
    GreedyGenerator,
    MLAAttention,
    MLAConfig,
    MLADecoder,
    OutOfPagesError,
    PagedLatentCache,
    PageTable,
    YarnScaling,
    apply_rope,
    rope_frequencies,
)

from helpers import fresh_seed, kernel_skip_reason  # noqa: E402
from nn_reference import check_layer_against_naive  # noqa: E402

PAGE = 64


# ---------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("yarn", [False, True])
def test_rope_is_a_rotation_that_sees_only_offsets(yarn):
    scaling = YarnScaling(factor=8.0, original_max_position=128) if yarn else None
    inv_freq, magnitude = rope_frequencies(64, 10000.0, scaling)
    rng = np.random.default_rng(fresh_seed())
    q = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)

    def rot(x, p):
        return apply_rope(x, jnp.array([[p]], jnp.int32), inv_freq, magnitude)

    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 37)), magnitude * jnp.linalg.norm(q), rtol=1e-5)
    dots = [float(jnp.vdot(rot(q, m + 10), rot(k, m))) for m in (0, 5, 300)]
    # Absolute, on the scale of the vectors: a dot product can be near 0, where a relative bound
    # only measures float32 angle rounding (310 rad in float32 is off by ~2e-5 rad). A position
    # leak would move the dots by ~|q||k| / 8.
    scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k)) * magnitude**2
    np.testing.assert_allclose(dots, dots[0], rtol=0, atol=1e-4 * scale)


def test_yarn_with_factor_one_is_plain_rope():
    plain, m0 = rope_frequencies(64, 10000.0)
    yarn, m1 = rope_frequencies(64, 10000.0, YarnScaling(factor=1.0))
    np.testing.assert_allclose(yarn, plain)
    assert m0 == m1 == 1.0


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    plain, _ = rope_frequencies(64, 10000.0)
    scaling = YarnScaling(factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1)
    yarn, _ = rope_frequencies(64, 10000.0, scaling)
    # Pairs that turn >= 32 times over 4096 tokens are kept; those under 1 turn are divided by 40.
    turns = plain * 4096 / (2 * math.pi)
    np.testing.assert_allclose(yarn[turns >= 32], plain[turns >= 32])
    np.testing.assert_allclose(yarn[turns <= 1], plain[turns <= 1] / 40)
    mid = (turns < 32) & (turns > 1)
    assert mid.any() and (yarn[mid] < plain[mid]).all() and (yarn[mid] > plain[mid] / 40).all()


def test_softmax_scale_is_deepseeks():
    assert MLAConfig(qk_nope_head_dim=128).softmax_scale == pytest.approx(192**-0.5)
    cfg = MLAConfig(qk_nope_head_dim=128, rope_scaling=YarnScaling(factor=40.0, mscale_all_dim=1.0))
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"kv_lora_rank": 256}, ValueError, "kv_lora_rank must be 512"),
        ({"qk_rope_head_dim": 32}, ValueError, "qk_rope_head_dim must be 64"),
        ({"dtype": jnp.float32}, TypeError, "bfloat16 or float16"),
        ({"num_heads": 0}, ValueError, "num_heads"),
        ({"q_lora_rank": 0}, ValueError, "q_lora_rank"),
    ],
)
def test_config_rejects_what_the_kernel_cannot_run(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MLAConfig(**kwargs)


def test_layer_names_bad_input_shapes():
    layer = MLAAttention(MLAConfig(hidden_size=32, num_heads=2, q_lora_rank=None, qk_nope_head_dim=16, v_head_dim=16),
                         rngs=nnx.Rngs(0))
    cache = PagedLatentCache.create(1, 2, 4, 2)
    cache, views = cache.append(jnp.array([3, 1], jnp.int32), 3)
    with pytest.raises(ValueError, match=r"x must have shape \[batch=2, t=3, hidden_size=32\].*\(2, 3, 16\)"):
        layer.prefill(jnp.zeros((2, 3, 16), jnp.bfloat16), cache.pages[0], views[0])


# --------------------------------------------------------- absorbed decode == naive MLA


@pytest.mark.parametrize(
    "q_lora, yarn, t_dec, dtype, jit",
    [
        (None, False, 1, "bf16", False),
        (48, True, 1, "bf16", True),
        (48, False, 2, "bf16", False),
        (None, True, 2, "fp16", True),
        (48, True, 1, "fp16", False),
    ],
)
def test_absorbed_decode_matches_naive_mla(q_lora, yarn, t_dec, dtype, jit):
    check_layer_against_naive(q_lora, yarn, t_dec, dtype, jit=jit, implementation=None)


# ------------------------------------------------------------------------ paged cache


def _check_table_invariants(table: PageTable, lengths: np.ndarray):
    bt = np.asarray(table.block_table)
    free = np.asarray(table.free_pages)[: int(table.num_free)]
    np.testing.assert_array_equal(np.asarray(table.lengths), lengths)
    held = []
    for i, n in enumerate(lengths):
        blocks = -(-int(n) // PAGE)
        row = bt[i]
        assert ((row[:blocks] >= 0) & (row[:blocks] < table.num_pages)).all(), f"request {i}: {row}"
        assert (row[blocks:] == POISON_PAGE).all(), f"request {i}: entries past its pages must be poison: {row}"
        held.extend(row[:blocks].tolist())
    assert len(set(held)) == len(held), f"a page is held twice: {sorted(held)}"
    assert not set(held) & set(free.tolist()), "a page is both held and free"
    assert sorted(held + free.tolist()) == list(range(table.num_pages)), "pages were lost or duplicated"
    assert int(table.pages_in_use()) == len(held)


@pytest.mark.parametrize("jit", [False, True])
def test_cache_append_and_free_keep_every_page_accounted_for(jit):
    """Random appends (prefill-sized and decode-sized) and frees against a numpy model of the
    lengths. Each written token carries (request, position) and must read back from the slot the
    block table points at; every other slot stays NaN."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, num_pages, max_blocks, t_max = 5, 40, 8, 80
    table = PageTable.create(b, num_pages, max_blocks)
    pages = jnp.full((num_pages, PAGE, 1, 576), jnp.nan, jnp.float16)
    lengths = np.zeros(b, np.int32)
    tag = np.full(b, 0, np.int32)  # bumps when a request is freed, so stale tokens are caught

    def step(table, pages, num_new, t, done, values):
        table, view = table.append(num_new, t)
        pages = view.slots.write(pages, values)
        return table.free(done), pages

    if jit:
        step = jax.jit(step, static_argnums=3)
    for it in range(12):
        t = int(rng.choice([1, 3, t_max]))
        room = max_blocks * PAGE - lengths
        num_new = np.minimum(rng.integers(0, t + 1, b), room).astype(np.int32)
        used = -(-(lengths + num_new) // PAGE)
        while used.sum() > num_pages:  # stay inside the pool here; exhaustion is tested below
            num_new[np.argmax(num_new)] = 0
            used = -(-(lengths + num_new) // PAGE)
        done = rng.random(b) < 0.25
        pos = lengths[:, None] + np.arange(t)[None, :]
        values = np.zeros((b, t, 576), np.float32)
        values[..., 0] = np.arange(b)[:, None] + 16 * tag[:, None]
        values[..., 1] = pos
        table, pages = step(table, pages, jnp.asarray(num_new), t, jnp.asarray(done), jnp.asarray(values, jnp.float16))
        lengths = np.where(done, 0, lengths + num_new)
        tag = np.where(done, tag + 1, tag)
        _check_table_invariants(table, lengths)
        table.check()
        bt, pg = np.asarray(table.block_table), np.asarray(pages, np.float32)
        for i in range(b):
            p = np.arange(lengths[i])
            got = pg[bt[i, p // PAGE], p % PAGE, 0, :2]
            np.testing.assert_array_equal(got[:, 0], i + 16 * tag[i], err_msg=f"seed={seed} it={it} request {i}")
            np.testing.assert_array_equal(got[:, 1], p, err_msg=f"seed={seed} it={it} request {i}")


def test_cache_never_writes_padding_or_inactive_requests():
    table = PageTable.create(3, 6, 2)
    pages = jnp.full((6, PAGE, 1, 576), jnp.nan, jnp.bfloat16)
    table, view = table.append(jnp.array([2, 0, 5], jnp.int32), 5)
    pages = view.slots.write(pages, jnp.ones((3, 5, 576), jnp.bfloat16))
    assert int(jnp.sum(~jnp.isnan(pages[:, :, 0, 0]))) == 7
    np.testing.assert_array_equal(np.asarray(table.block_table)[1], [POISON_PAGE, POISON_PAGE])
    np.testing.assert_array_equal(np.asarray(view.positions), np.tile(np.arange(5), (3, 1)))


def test_freed_pages_are_reused_lifo():
    table = PageTable.create(2, 4, 4)
    table, _ = table.append(jnp.array([130, 1], jnp.int32), 130)  # 3 pages + 1 page
    assert int(table.num_free) == 0
    first = np.asarray(table.block_table)[0, :3].tolist()
    table = table.free(jnp.array([True, False]))
    assert int(table.num_free) == 3 and int(table.lengths[0]) == 0
    table, _ = table.append(jnp.array([64, 0], jnp.int32), 64)
    assert np.asarray(table.block_table)[0, 0] in first
    _check_table_invariants(table, np.array([64, 1]))


def test_running_out_of_pages_raises_eagerly():
    table = PageTable.create(2, 3, 4)
    table, _ = table.append(jnp.array([100, 64], jnp.int32), 100)  # 2 + 1 pages: the pool is full
    with pytest.raises(OutOfPagesError, match=r"page pool is exhausted \(3 pages of 64 tokens, 0 free"):
        table.append(jnp.array([0, 1], jnp.int32), 1)


def test_running_out_of_pages_under_jit_is_flagged_and_spares_other_requests():
    table = PageTable.create(3, 4, 4)
    pages = jnp.full((4, PAGE, 1, 576), jnp.nan, jnp.bfloat16)

    @jax.jit
    def step(table, pages, num_new):
        table, view = table.append(num_new, 128)
        return table, view.slots.write(pages, jnp.ones((3, 128, 576), jnp.bfloat16))

    table, pages = step(table, pages, jnp.array([0, 0, 10], jnp.int32))  # request 2: 1 page
    # Request 0 takes 2 pages; request 1 wants 3 of the 1 left and gets none; request 2 needs no
    # new page and goes on.
    table, pages = step(table, pages, jnp.array([128, 129, 5], jnp.int32))
    bt = np.asarray(table.block_table)
    assert (bt[1] == POISON_PAGE).all() and (bt[0, :2] < 4).all() and bt[2, 0] < 4
    assert int(jnp.sum(~jnp.isnan(pages[:, :, 0, 0]))) == 10 + 128 + 5
    with pytest.raises(OutOfPagesError, match="page pool is exhausted"):
        table.check()
    # The request without pages reads as NaN through the ops (page id out of range), not as
    # another request's data.
    q = jnp.ones((3, 1, 1, 576), jnp.bfloat16)
    md = jf.get_mla_metadata(table.lengths, 1, 1)
    out, _ = jf.flash_mla_with_kvcache(q, pages, table.block_table, table.lengths, 512, *md)
    assert np.isnan(np.asarray(out[1], np.float32)).all() and np.isfinite(np.asarray(out, np.float32)[[0, 2]]).all()


def test_outgrowing_the_block_table_row_raises():
    table = PageTable.create(1, 8, 2)
    with pytest.raises(OutOfPagesError, match=r"outgrew its block-table row \(max_blocks_per_seq=2, i.e. 128 tokens"):
        table.append(jnp.array([129], jnp.int32), 129)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda t: t.append(jnp.array([1, 2], jnp.int64 if jax.config.x64_enabled else jnp.float32), 2), ValueError, "num_new must be int32"),
        (lambda t: t.append(jnp.array([1, 3], jnp.int32), 2), ValueError, r"num_new must lie in \[0, t=2\]"),
        (lambda t: t.free(jnp.array([1, 0], jnp.int32)), ValueError, "done must be bool"),
        (lambda t: PageTable.create(2, 0, 1), ValueError, "num_pages must be a positive int"),
    ],
)
def test_cache_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(PageTable.create(2, 4, 2))


# ------------------------------------------------------------------------- the decoder


def _tiny_model(seed=0, **attn):
    a = dict(hidden_size=64, num_heads=4, q_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32)
    a.update(attn)
    cfg = DecoderConfig(vocab_size=97, num_layers=2, mlp_hidden_size=128, attention=MLAConfig(**a))
    return MLADecoder(cfg, rngs=nnx.Rngs(seed))


def test_generation_is_the_same_with_shared_and_per_layer_page_tables():
    model = _tiny_model()
    rng = np.random.default_rng(fresh_seed())
    lens = np.array([3, 66, 0, 20], np.int32)
    prompts = rng.integers(0, 97, (4, 66)).astype(np.int32)
    gen = GreedyGenerator(model)
    runs = []
    for shared in (True, False):
        cache = model.init_cache(4, 12, 3, shared_layout=shared, fill=np.nan)
        res, cache = gen.generate(prompts, lens, 6, cache, keep_logits=True)
        assert int(cache.pages_in_use()) == 0 and (np.asarray(cache.lengths) == 0).all()
        runs.append(res)
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_array_equal(runs[0].logits, runs[1].logits)
    assert (runs[0].tokens[2] == -1).all() and (runs[0].tokens[[0, 1, 3]] >= 0).all()
    assert np.isfinite(runs[0].logits[[0, 1, 3]]).all()
    # The default path: the kernels where they run (an sm_90 GPU with the extension), else pure JAX.
    expected = "CUDA kernels (" if kernel_skip_reason() is None else "pure JAX (XLA)"
    assert runs[0].attention_path.startswith(expected), runs[0].attention_path


def test_generation_matches_a_model_without_cache():
    """Greedy tokens of the cached generator equal a recompute-everything loop that runs the
    model's naive prefill over the whole sequence each step.

    This checks the cache's bookkeeping, not bf16 numerics, so the model runs in float16: its
    8x finer rounding keeps the two paths' honest difference far from the bounds. Measured over
    300 (seed, request, step) draws on CPU: max |diff| <= 0.0065 x std and relative L2 <= 0.0023
    in float16 (bf16: 0.078 x std seen in CI, 0.016), while a wrong position, page or length
    moves logits by a sizeable fraction of their spread.
    """
    model = _tiny_model(seed=3, dtype=jnp.float16)
    rng = np.random.default_rng(fresh_seed())
    lens = np.array([7, 40], np.int32)
    prompts = rng.integers(0, 97, (2, 40)).astype(np.int32)
    res, _ = GreedyGenerator(model).generate(prompts, lens, 5, model.init_cache(2, 4, 2), keep_logits=True)
    width = 48  # every sequence below, padded: one compilation

    @jax.jit
    def last_logits(tokens, length):
        return model.prefill(tokens, length, model.init_cache(1, 1, 1))[0][0]

    for i in range(2):
        seq = list(prompts[i, : lens[i]])
        for s in range(5):
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : len(seq)] = seq
            ref = np.asarray(last_logits(jnp.asarray(tokens), jnp.asarray([len(seq)], jnp.int32)), np.float64)
            got = np.asarray(res.logits[i, s], np.float64)
            where = f"request {i} step {s}"
            assert np.linalg.norm(got - ref) <= 0.01 * np.linalg.norm(ref), where
            np.testing.assert_allclose(got, ref, atol=0.05 * ref.std(), err_msg=where)
            # Tokens exactly, wherever the top two are clearly apart (teacher forcing keeps going
            # on the cached run's own token either way).
            top2 = np.sort(ref)[-2:]
            if top2[1] - top2[0] > 0.1 * ref.std():
                assert res.tokens[i, s] == int(np.argmax(ref)), where
            seq.append(int(res.tokens[i, s]))


def test_eos_ends_requests_and_frees_their_pages():
    model = _tiny_model()
    prompts = np.random.default_rng(fresh_seed()).integers(0, 97, (3, 10)).astype(np.int32)
    gen = GreedyGenerator(model)
    res, _ = gen.generate(prompts, np.array([10, 4, 7], np.int32), 8, model.init_cache(3, 6, 2))
    eos = int(res.tokens[1, 2])
    res_eos, cache = GreedyGenerator(model, eos_id=eos).generate(prompts, np.array([10, 4, 7], np.int32), 8,
                                                                 model.init_cache(3, 6, 2))
    for i in range(3):
        row = res.tokens[i]
        stop = int(np.argmax(row == eos)) if (row == eos).any() else len(row) - 1
        np.testing.assert_array_equal(res_eos.tokens[i, : stop + 1], row[: stop + 1])
        assert (res_eos.tokens[i, stop + 1 :] == -1).all()
    assert int(cache.pages_in_use()) == 0


def test_prefill_into_a_busy_request_raises():
    model = _tiny_model()
    cache = model.init_cache(2, 4, 2)
    _, cache = model.prefill(jnp.ones((2, 3), jnp.int32), jnp.array([3, 0], jnp.int32), cache)
    with pytest.raises(ValueError, match=r"requests \[0\] already hold tokens"):
        model.prefill(jnp.ones((2, 3), jnp.int32), jnp.array([2, 2], jnp.int32), cache)


def test_decode_step_is_one_program_with_one_schedule():
    """The jitted decode step holds the allocation, one metadata computation and a decode per
    layer; with implementation='cuda' its lowering for CUDA names 1 metadata and num_layers
    decode custom calls (lowered here without a GPU)."""
    model = _tiny_model()
    cache = model.init_cache(2, 4, 2)
    graphdef, params = nnx.split(model)

    def step(params, tokens, cache):
        return nnx.merge(graphdef, params).decode(tokens, jnp.array([True, True]), cache, implementation="cuda")

    text = jax.jit(step).trace(params, jnp.ones((2, 1), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@jax_flashmla_mla_metadata_v1") == 1
    assert text.count("@jax_flashmla_mla_decode_v1") == model.config.num_layers


# ------------------------------------------------------------------------------ demo


def test_demo_runs_on_this_machine(tmp_path):
    out = subprocess.run(
        [sys.executable, "-P", "-m", "jax_flashmla.demo", "--steps", "4", "--batch", "3", "--prompt-lens", "5,70",
         "--no-progress", "--json", str(tmp_path / "demo.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "attention path: " in out.stdout and "tokens/s" in out.stdout
    assert "0 pages in use" in out.stdout


def test_forced_tokens_score_a_given_continuation():
    model = _tiny_model(seed=5)
    prompts = np.random.default_rng(fresh_seed()).integers(0, 97, (2, 9)).astype(np.int32)
    lens = np.array([9, 4], np.int32)
    gen = GreedyGenerator(model)
    greedy, _ = gen.generate(prompts, lens, 5, model.init_cache(2, 4, 2), keep_logits=True)
    again, _ = gen.generate(prompts, lens, 5, model.init_cache(2, 4, 2), keep_logits=True, forced_tokens=greedy.tokens)
    np.testing.assert_array_equal(again.tokens, greedy.tokens)
    np.testing.assert_array_equal(again.logits, greedy.logits)
    other = (greedy.tokens + 1) % 97
    forced, _ = gen.generate(prompts, lens, 5, model.init_cache(2, 4, 2), keep_logits=True, forced_tokens=other)
    np.testing.assert_array_equal(forced.tokens, other)
    np.testing.assert_array_equal(forced.logits[:, 0], greedy.logits[:, 0])  # same prompt, same first logits
    assert not np.array_equal(forced.logits[:, 1:], greedy.logits[:, 1:])
    with pytest.raises(ValueError, match=r"forced_tokens must have shape \(2, 5\)"):
        gen.generate(prompts, lens, 5, model.init_cache(2, 4, 2), forced_tokens=other[:, :3])


def test_generator_names_bad_prompt_arguments():
    model = _tiny_model()
    gen = GreedyGenerator(model)
    prompts = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"prompt_lens must lie in \[0, t=5\].*\[3, 6\]"):
        gen.generate(prompts, np.array([3, 6], np.int32), 2, model.init_cache(2, 4, 2))
    with pytest.raises(ValueError, match=r"prompts.shape=\(2, 5\), prompt_lens.shape=\(3,\)"):
        gen.generate(prompts, np.array([1, 1, 1], np.int32), 2, model.init_cache(2, 4, 2))


def test_generator_stops_at_once_when_the_prompts_do_not_fit():
    model = _tiny_model()
    prompts = np.zeros((2, 70), np.int32)
    with pytest.raises(OutOfPagesError, match="page pool is exhausted"):
        GreedyGenerator(model).generate(prompts, np.array([70, 70], np.int32), 50, model.init_cache(2, 3, 3),
                                        on_step=lambda i, s: pytest.fail("decoded after the prefill ran out of pages"))


@pytest.mark.parametrize("flag", ["--batch", "--steps", "--layers"])
def test_demo_rejects_non_positive_sizes(flag, capsys):
    from jax_flashmla import demo

    with pytest.raises(SystemExit):
        demo.parse_args([flag, "0"])
    assert "expected a positive int; got 0" in capsys.readouterr().err
