"""One call of each registered CUDA handler: the quickest check that build -> registration ->
lowering -> execution works on this GPU."""
import faulthandler

faulthandler.enable()
import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jf

print(jf.build_info(), flush=True)
lengths = jnp.asarray([0, 1, 100, 5000, 64], jnp.int32)
got = jax.jit(lambda L: jf.get_mla_metadata(L, 16, 1, implementation="cuda"))(lengths)
want = jf.get_mla_metadata(lengths, 16, 1, implementation="xla")
print("metadata via CUDA handler:", np.asarray(got[1]), "== pure JAX:", all(np.array_equal(g, w) for g, w in zip(got, want)), flush=True)
