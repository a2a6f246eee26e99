import nnjax as nj
from tests.cases import Case

CASES = [
    Case("SimpleRNN", lambda: nj.SimpleRNN(4), (2, 3, 5)),
    Case("LSTM", lambda: nj.LSTM(4), (2, 3, 5)),
    Case("GRU", lambda: nj.GRU(4), (2, 3, 5)),
    Case("Bidirectional_LSTM", lambda: nj.Bidirectional(nj.LSTM(3)), (2, 3, 5)),
    Case("LSTM_last_step", lambda: nj.LSTM(4, return_sequences=False), (2, 3, 5)),
    Case("GRU_state_4d", lambda: nj.GRU(3, return_state=True), (2, 2, 3, 4)),
]
