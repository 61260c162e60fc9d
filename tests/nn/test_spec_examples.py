"""Every code example of the API page (spec/panther-nn-api.rst) runs unchanged, with the shapes it states.

Each example is copied verbatim between ``# spec: begin`` and ``# spec: end`` markers;
test_examples_are_verbatim compares them with the page's code blocks when the page is at hand. Examples
that use names from earlier ones on the page (``torch``, ``pr``, ``model``, ``dataloader``) get them from
this module or from the same test. Most examples build layers that save no memory by the page's own
parameter-count rule, so they raise that UserWarning; the tests record which ones do.
"""

import os
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import panther as pr

ROOT = Path(__file__).resolve().parents[2]
SAVINGS_WARNING = "not fewer than the"


def spec_page():
    """The API page: $PANTHER_SPEC, or spec/panther-nn-api.rst in the shared folder next to the checkout."""
    candidates = [os.environ.get("PANTHER_SPEC", "")] + [
        str(base / "spec" / "panther-nn-api.rst") for base in (ROOT / "shared", ROOT.parent / "shared", ROOT / "docs")
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def spec_blocks(text):
    """The ``.. code-block:: python`` blocks of an rst page, dedented, trailing spaces stripped."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                body.append(lines[i].rstrip())
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        else:
            i += 1
    return blocks


def copied_blocks():
    source = Path(__file__).read_text(encoding="utf-8")
    found = re.findall(r"\n[ ]*# spec: begin\n(.*?)\n[ ]*# spec: end\n", source, flags=re.S)
    return [textwrap.dedent("\n".join(line.rstrip() for line in b.split("\n"))).strip("\n") for b in found]


@pytest.mark.skipif(spec_page() is None, reason="the API page is not at hand (set PANTHER_SPEC to its path)")
def test_examples_are_verbatim():
    expected = spec_blocks(spec_page().read_text(encoding="utf-8"))
    assert len(expected) == 9
    assert copied_blocks() == expected


def savings_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and SAVINGS_WARNING in str(w.message)]


def test_basic_sketched_linear_layer(capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        import torch
        import panther as pr

        # Create a sketched linear layer
        layer = pr.nn.SKLinear(
            in_features=512,
            out_features=256,
            num_terms=8,        # Number of sketching terms
            low_rank=32,        # Rank of each sketch
            bias=True
        )

        # Forward pass
        x = torch.randn(64, 512)  # batch_size=64
        y = layer(x)
        print(f"Output shape: {y.shape}")  # (64, 256)
        # spec: end
    assert y.shape == (64, 256)
    assert capsys.readouterr().out == "Output shape: torch.Size([64, 256])\n"
    assert len(savings_warnings(record)) == 1  # 2*8*32*(512+256) = 393,216 >= 512*256 = 131,072


def test_replacing_standard_layers():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        import torch.nn as nn
        import panther as pr

        class StandardMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer1 = nn.Linear(784, 512)
                self.layer2 = nn.Linear(512, 256)
                self.layer3 = nn.Linear(256, 10)

        class SketchedMLP(nn.Module):
            def __init__(self):
                super().__init__()
                # Drop-in replacements with memory savings
                self.layer1 = pr.nn.SKLinear(784, 512, num_terms=2, low_rank=64)
                self.layer2 = pr.nn.SKLinear(512, 256, num_terms=1, low_rank=32)
                self.layer3 = pr.nn.SKLinear(256, 10, num_terms=1, low_rank=16)
        # spec: end
        standard, sketched = StandardMLP(), SketchedMLP()
    x = torch.randn(8, 784)
    outputs = []
    for mlp in (standard, sketched):
        h = torch.relu(mlp.layer1(x))
        assert h.shape == (8, 512)
        h = torch.relu(mlp.layer2(h))
        assert h.shape == (8, 256)
        outputs.append(mlp.layer3(h))
        assert outputs[-1].shape == (8, 10)
    n_standard = sum(p.numel() for p in standard.parameters())
    n_sketched = sum(p.numel() for p in sketched.parameters())
    assert n_sketched < n_standard / 2  # "with memory savings": parameters
    n_stored = n_sketched + sum(b.numel() for b in sketched.buffers())
    assert n_stored < n_standard  # ... and parameters plus buffers
    # the 256 -> 10 classifier breaks the page's rule: 2*1*16*(256+10) = 8,512 >= 2,560
    messages = savings_warnings(record)
    assert len(messages) == 1 and "(in=256, out=10)" in messages[0]


def test_sketched_convolution(capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        import panther as pr

        # Sketched 2D convolution layer
        conv_layer = pr.nn.SKConv2d(
            in_channels=64,
            out_channels=128,
            kernel_size=3,
            stride=1,
            padding=1,
            num_terms=1,
            low_rank=16
        )

        # Forward pass
        x = torch.randn(32, 64, 56, 56)  # (batch, channels, height, width)
        y = conv_layer(x)
        print(f"Output shape: {y.shape}")  # (32, 128, 56, 56)
        # spec: end
    assert y.shape == (32, 128, 56, 56)
    assert capsys.readouterr().out == "Output shape: torch.Size([32, 128, 56, 56])\n"
    assert savings_warnings(record) == []


def test_multi_head_attention_with_sketching():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        import panther as pr

        # Randomized multi-head attention
        attention = pr.nn.RandMultiHeadAttention(
            embed_dim=512,
            num_heads=8,
            sketch_dim=64,      # Sketching dimension
            dropout=0.1
        )

        # Self-attention
        x = torch.randn(10, 32, 512)  # (seq_len, batch, embed_dim)
        output, attn_weights = attention(x, x, x)
        # spec: end
    assert output.shape == (10, 32, 512)  # (seq_len, batch, embed_dim): sequence-first by default
    assert attn_weights is None  # linear-time attention never forms the weights unless asked to
    assert attention.training and attention.dropout == 0.1
    assert record == []


def test_rules_of_thumb():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        # Conservative: Fewer parameters, faster but less accurate
        conservative = pr.nn.SKLinear(1024, 512, num_terms=4, low_rank=32)

        # Balanced: Good accuracy/speed tradeoff
        balanced = pr.nn.SKLinear(1024, 512, num_terms=8, low_rank=64)

        # Aggressive: More parameters, slower but more accurate
        aggressive = pr.nn.SKLinear(1024, 512, num_terms=16, low_rank=128)
        # spec: end
    x = torch.randn(4, 1024)
    for layer in (conservative, balanced, aggressive):
        assert layer(x).shape == (4, 512)
    counts = [sum(p.numel() for p in m.parameters()) for m in (conservative, balanced, aggressive)]
    assert counts[0] < counts[1] < counts[2]  # "fewer" ... "more parameters"
    # only the conservative one satisfies the page's rule 2*L*k*(in+out) < in*out = 524,288
    messages = savings_warnings(record)
    assert len(messages) == 2
    assert "num_terms=8 and low_rank=64" in messages[0] and "num_terms=16 and low_rank=128" in messages[1]


def test_tensor_core_requirements():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        # spec: begin
        # All dimensions should be multiples of 16
        layer = pr.nn.SKLinear(
            in_features=1024,    # ✓ Multiple of 16
            out_features=512,    # ✓ Multiple of 16
            num_terms=8,
            low_rank=64          # ✓ Multiple of 16
        )

        # Batch size should also be multiple of 16
        x = torch.randn(128, 1024)  # ✓ batch_size=128
        # spec: end
    assert layer(x).shape == (128, 512)


def test_memory_monitoring(capsys):
    # spec: begin
    import torch

    def compare_memory_usage():
        # Standard layer
        standard = torch.nn.Linear(2048, 2048)

        # Sketched layer
        sketched = pr.nn.SKLinear(2048, 2048, num_terms=8, low_rank=128)

        print(f"Standard parameters: {sum(p.numel() for p in standard.parameters()):,}")
        print(f"Sketched parameters: {sum(p.numel() for p in sketched.parameters()):,}")
    # spec: end
    with pytest.warns(UserWarning, match=SAVINGS_WARNING):
        compare_memory_usage()
    # 2048*2048 + 2048 dense; L*k*(in+out) + out = 8*128*4096 + 2048 sketched: the same count, hence the warning
    assert capsys.readouterr().out == "Standard parameters: 4,196,352\nSketched parameters: 4,196,352\n"


def make_dataloader(batches=6, batch_size=32, seed=0):
    """A few (x, y) batches of MNIST-shaped inputs (B, 784) with learnable integer labels."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        x = torch.randn(batch_size, 784, generator=g)
        data.append((x, x[:, :10].argmax(dim=1)))
    return data


def test_training_loop_and_learning_rates():
    dataloader = make_dataloader()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # spec: begin
        import torch.nn as nn

        model = nn.Sequential(
            pr.nn.SKLinear(784, 512, num_terms=8, low_rank=64),
            nn.ReLU(),
            pr.nn.SKLinear(512, 256, num_terms=6, low_rank=32),
            nn.ReLU(),
            pr.nn.SKLinear(256, 10, num_terms=4, low_rank=16)
        )

        # Standard training loop works
        optimizer = torch.optim.Adam(model.parameters())
        criterion = nn.CrossEntropyLoss()

        for x, y in dataloader:
            optimizer.zero_grad()
            output = model(x)
            loss = criterion(output, y)
            loss.backward()  # Gradients computed correctly
            optimizer.step()
        # spec: end
    assert len(savings_warnings(record)) == 3  # all three layers break the page's rule
    assert output.shape == (32, 10) and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(b.grad is None for b in model.buffers())

    def mean_loss():
        with torch.no_grad():
            return sum(criterion(model(x), y).item() for x, y in dataloader) / len(dataloader)

    before = mean_loss()
    for x, y in dataloader:  # the loop again: training decreases the loss
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    assert mean_loss() < before

    # spec: begin
    # Separate learning rates for sketched parameters
    optimizer = torch.optim.Adam([
        {'params': [p for name, p in model.named_parameters() if 'S1s' in name], 'lr': 1e-3},
        {'params': [p for name, p in model.named_parameters() if 'S2s' in name], 'lr': 1e-3},
        {'params': [p for name, p in model.named_parameters() if 'bias' in name], 'lr': 1e-4}
    ])
    # spec: end
    groups = optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [3, 3, 3] and [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-4]
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}  # S1s, S2s and bias are all the parameters
    x, y = dataloader[0]
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
