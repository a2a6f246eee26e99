import nnjax as nj
from tests.cases import Case

CASES = [
    Case("Conv1D", lambda: nj.Conv(4, 3), (2, 7, 3)),
    Case("Conv2D", lambda: nj.Conv(4, (3, 3)), (2, 6, 6, 3)),
    Case(
        "Conv2D_strided_valid", lambda: nj.Conv(5, (3, 2), strides=2, padding="VALID"), (2, 7, 6, 3)
    ),
    Case(
        "Conv2D_grouped",
        lambda: nj.Conv(6, (3, 3), feature_group_count=2, use_bias=False),
        (2, 5, 5, 4),
    ),
    Case(
        "Conv2D_depthwise_dilated",
        lambda: nj.Conv(4, (3, 3), feature_group_count=4, kernel_dilation=2),
        (2, 6, 6, 4),
    ),
    Case(
        "Conv2D_batch_axes_circular",
        lambda: nj.Conv(3, (3, 3), padding="CIRCULAR"),
        (2, 2, 5, 5, 2),
    ),
    Case(
        "Conv3D", lambda: nj.Conv(3, (2, 3, 2), padding=((1, 0), (1, 1), (0, 1))), (1, 4, 5, 4, 2)
    ),
    Case("ConvTranspose1D", lambda: nj.ConvTranspose(3, 3, strides=2, padding="VALID"), (2, 5, 2)),
    Case("ConvTranspose2D", lambda: nj.ConvTranspose(4, (3, 3), strides=2), (2, 4, 4, 3)),
    Case("MaxPool", lambda: nj.MaxPool((2, 2)), (2, 6, 6, 3)),
    Case("MaxPool_same", lambda: nj.MaxPool((3, 3), strides=2, padding="SAME"), (2, 7, 7, 3)),
    Case("AvgPool", lambda: nj.AvgPool((2, 2)), (2, 6, 6, 3)),
    Case(
        "AvgPool_same_exclude",
        lambda: nj.AvgPool(3, strides=1, padding="SAME", count_include_pad=False),
        (2, 7, 3),
    ),
    Case("GlobalAvgPool", lambda: nj.GlobalAvgPool(), (2, 5, 5, 3)),
    Case("GlobalMaxPool", lambda: nj.GlobalMaxPool(keepdims=True), (2, 4, 5, 3)),
]
