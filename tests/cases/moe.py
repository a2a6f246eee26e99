import nnjax as nj
from tests.cases import Case

CASES = [
    Case("MoE_sorted_shared", lambda: nj.layers.MoE(4, 2, 6, shared_features=5), (2, 5, 8)),
    Case("MoE_capacity", lambda: nj.layers.MoE(3, 2, 6, dispatch="capacity"), (4, 8)),
]
