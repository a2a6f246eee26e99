import nnjax as nj
from tests.cases import Case

CASES = [
    Case("Embedding", lambda: nj.Embedding(11, 6), (2, 5), int_input=(0, 11), dtypes=("float32",)),
    Case(
        "tied_embedding",
        lambda: nj.tied_embedding(
            nj.Embedding(13, 8), nj.serial(nj.Dense(8), nj.LayerNorm(), nj.Dropout(0.1))
        ),
        (2, 5),
        int_input=(0, 13),
        train=True,
        dtypes=("float32",),
    ),
    Case("LearnedPositionalEmbedding", lambda: nj.LearnedPositionalEmbedding(7), (2, 5, 4)),
    Case("SinusoidalPositionalEmbedding", lambda: nj.SinusoidalPositionalEmbedding(), (2, 5, 6)),
]
