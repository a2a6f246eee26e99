import nnjax as nj
from tests.cases import Case

# LayerNorm and Dropout are registered in tests/cases/core.py.
CASES = [
    Case("BatchNorm", lambda: nj.BatchNorm(), (4, 3, 3, 5), train=True),
    Case(
        "BatchNorm_axis1_noaffine",
        lambda: nj.BatchNorm(axis=1, use_scale=False, use_bias=False),
        (4, 5, 6),
        train=True,
    ),
    Case("RMSNorm", lambda: nj.RMSNorm(), (2, 3, 8)),
    Case("RMSNorm_noscale", lambda: nj.RMSNorm(use_scale=False), (4, 6)),
    Case("GroupNorm", lambda: nj.GroupNorm(3), (2, 4, 4, 6)),
    Case("GroupNorm_2d", lambda: nj.GroupNorm(2, use_bias=False), (3, 8)),
]
