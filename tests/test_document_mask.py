"""Document masking (data.document_mask): attention stays inside each document and positions restart
after every end-of-document token, so what came before a document in its row cannot change its
logits; with the mask off (the default, SDPA's is_causal path, unchanged) it does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatepro_dist.config import load_config
from gatepro_dist.data import document_layout
from gatepro_dist.train.model import Transformer
from test_trainer import TINY

EOS = 0


def model(document_mask: bool) -> Transformer:
    overrides = [*TINY, f"data.document_mask={str(document_mask).lower()}", f"data.eos_id={EOS}"]
    return Transformer(load_config(None, overrides)).eval()


def row(*documents: list[int]) -> torch.Tensor:
    tokens = []
    for doc in documents:
        tokens += [*doc, EOS]
    return torch.tensor([tokens[:-1]])  # the row ends inside its last document


def test_positions_restart_after_each_end_of_document_and_the_mask_is_block_causal():
    positions, mask = document_layout(torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 4]]), EOS)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for first, last in ((0, 2), (3, 6), (7, 7)):
        for q in range(first, last + 1):
            expected[q, first:q + 1] = True
    assert torch.equal(mask[0, 0], expected)


def test_a_documents_logits_ignore_the_document_before_it_only_with_the_mask():
    generator = torch.Generator().manual_seed(0)
    before, altered = (torch.randint(1, 256, (12,), generator=generator).tolist() for _ in range(2))
    document = torch.randint(1, 256, (19,), generator=generator).tolist()
    start = len(before) + 1
    with torch.no_grad():
        masked, unmasked = model(True), model(False)
        on = [masked(row(prefix, document))[0][0, start:] for prefix in (before, altered)]
        off = [unmasked(row(prefix, document))[0][0, start:] for prefix in (before, altered)]
        at_row_start = masked(row(document, before))[0][0, :len(document)]
    torch.testing.assert_close(on[0], on[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(on[0], at_row_start, rtol=0, atol=1e-5)  # positions restarted at 0
    assert (off[0] - off[1]).abs().max() > 1e-3


def test_without_an_end_of_document_the_mask_is_plain_causal_attention():
    tokens = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(True)(tokens)[0], model(False)(tokens)[0], rtol=0, atol=1e-5)


def test_the_default_path_still_calls_sdpa_with_is_causal_and_no_mask(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(False)(torch.randint(1, 256, (1, 16)))
        assert all(c.get("is_causal") is True and c.get("attn_mask") is None for c in calls) and calls
        calls.clear()
        model(True)(torch.randint(1, 256, (1, 16)))
        assert all(c.get("attn_mask") is not None and not c.get("is_causal") for c in calls) and calls


@pytest.mark.parametrize("checkpointing", ["block"])
def test_the_mask_survives_activation_checkpointing(checkpointing):
    cfg = load_config(None, [*TINY, "data.document_mask=true", f"data.eos_id={EOS}",
                             f"train.activation_checkpointing={checkpointing}"])
    net = Transformer(cfg)
    tokens = row([5, 6, 7], [8, 9, 10, 11])
    logits, _ = net(tokens)
    logits.sum().backward()
    reference = Transformer(load_config(None, [*TINY, "data.document_mask=true", f"data.eos_id={EOS}"]))
    reference(tokens)[0].sum().backward()
    torch.testing.assert_close(net.embed.weight.grad, reference.embed.weight.grad)
