import jax
import jax.numpy as jnp

import nnjax as nj
from tests.cases import Case

CASES = [
    Case("Dense", lambda: nj.Dense(7), (3, 5)),
    Case("Dense_nobias_3d", lambda: nj.Dense(4, use_bias=False), (2, 3, 5)),
    Case("Flatten", lambda: nj.Flatten(), (2, 3, 4, 5)),
    Case("Reshape", lambda: nj.Reshape((4, -1)), (2, 3, 4)),
    Case("serial", lambda: nj.serial(nj.Dense(8), jax.nn.relu, head=nj.Dense(3)), (4, 5)),
    Case(
        "fan_out",
        lambda: nj.fan_out(nj.Dense(3), jnp.tanh, combine=lambda ys: ys[0] + ys[1][..., :3]),
        (4, 5),
    ),
    Case("residual", lambda: nj.residual(nj.Dense(5), jax.nn.gelu), (4, 5)),
    Case("residual_shortcut", lambda: nj.residual(nj.Dense(6), shortcut=nj.Dense(6)), (4, 5)),
    Case("repeat", lambda: nj.repeat(nj.serial(nj.Dense(5), jnp.tanh), 3), (4, 5)),
    Case("remat", lambda: nj.remat(nj.serial(nj.Dense(6), jnp.tanh)), (4, 5)),
]
CASES += [
    Case("Dropout", lambda: nj.Dropout(0.3), (4, 6), train=True),
    Case("LayerNorm", lambda: nj.LayerNorm(), (4, 6)),
    Case("LayerNorm_noscale", lambda: nj.LayerNorm(use_scale=False), (2, 3, 6)),
]
