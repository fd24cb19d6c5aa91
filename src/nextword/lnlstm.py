"""The LayerNorm LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", section 3.1 and appendix).

Layer normalisation of the gate pre-activations, computed separately for the
input and the recurrent contributions, and of the cell state before its tanh::

    f, i, o, g = LN(W_x x_t; a_x, b) + LN(W_h h_{t-1}; a_h)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t; a_c, b_c))

Each LN normalises its whole 4 x hidden (or hidden) vector to zero mean and
unit variance, then scales by a learned gain; one learned bias ``b`` stands
for the paper's three gate biases, which add up. Normalising within a step
keeps the gates out of saturation whatever the scale of the weights, at the
price of PyTorch's fused LSTM kernel: the time steps run in a Python loop.
The input projection and its normalisation still run over all time steps at
once, so only the recurrent half is sequential.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNormLSTM(nn.Module):
    """One LayerNorm LSTM layer, called like a one-layer ``nn.LSTM(batch_first=True)``.

    ``forward(x [batch, time, input], (h, c) [1, batch, hidden] each, or None)``
    gives ``(outputs [batch, time, hidden], (h, c))``.
    """

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        # Gate order i, f, g, o, as nn.LSTM's. Linear layers, so int8 dynamic quantization covers them.
        self.input = nn.Linear(input_size, 4 * hidden, bias=False)
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)
        self.norm_input = nn.LayerNorm(4 * hidden)  # its bias is the gates' bias
        self.norm_recurrent = nn.LayerNorm(4 * hidden, bias=False)
        self.norm_cell = nn.LayerNorm(hidden)
        bound = hidden ** -0.5  # nn.LSTM's init
        for linear in (self.input, self.recurrent):
            nn.init.uniform_(linear.weight, -bound, bound)

    def forward(self, x: torch.Tensor, state=None):
        batch, steps, _ = x.shape
        if state is None:
            h = c = x.new_zeros(batch, self.hidden)
        else:
            h, c = state[0][0], state[1][0]
        from_input = self.norm_input(self.input(x))  # every time step at once
        outputs = []
        for t in range(steps):
            gates = from_input[:, t] + self.norm_recurrent(self.recurrent(h))
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c))
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))
