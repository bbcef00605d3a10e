"""The hybrid mask: dense path == brute-force rule == FlexAttention, on packed batches."""

import torch
from torch.nn.attention.flex_attention import flex_attention

from unimm.data.batch import NO_FRAME
from unimm.masks import build_attention_mask
from unimm.model.attention import attend


def brute_force_mask(document_ids, frame_ids):
    B, L = document_ids.shape
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                same_doc = document_ids[b, q] == document_ids[b, k]
                same_frame = frame_ids[b, q] != NO_FRAME and frame_ids[b, q] == frame_ids[b, k]
                mask[b, 0, q, k] = bool(same_doc and (k <= q or same_frame))
    return mask


def packed_batch(L: int, seed: int = 0):
    """Rows of several documents: text runs, single images, multi-frame videos, padding."""
    g = torch.Generator().manual_seed(seed)
    docs, frames = [], []
    for _ in range(2):
        doc_row, frame_row, doc, frame = [], [], 0, 0
        while len(doc_row) < L - 8:
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                n_text = int(torch.randint(1, 6, (1,), generator=g))
                doc_row += [doc] * n_text
                frame_row += [NO_FRAME] * n_text
                n_patches = int(torch.randint(2, 9, (1,), generator=g))
                doc_row += [doc] * n_patches
                frame_row += [frame] * n_patches
                frame += 1
            doc += 1
        pad = L - len(doc_row)
        docs.append((doc_row + [doc] * pad)[:L])
        frames.append((frame_row + [NO_FRAME] * pad)[:L])
    return torch.tensor(docs), torch.tensor(frames)


def test_hand_checked_row():
    # text text <boi> v v <eoi> | next document: text v v
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    frames = torch.tensor([[-1, -1, -1, 0, 0, -1, -1, 1, 1]])
    m = build_attention_mask(docs, frames, "sdpa")[0, 0]
    assert m[3, 4] and m[4, 3], "patches of one frame see each other both ways"
    assert m[3, :3].all() and m[4, :3].all(), "a frame sees the text before it"
    assert not m[2, 3], "text before a frame does not see into it"
    assert m[5, :6].all() and not m[5, 6:].any(), "text after the frame sees all of its document"
    assert not m[6, :6].any(), "documents are isolated"
    assert m[7, 8] and m[8, 7]


def test_dense_matches_brute_force():
    docs, frames = packed_batch(L=64)
    dense = build_attention_mask(docs, frames, "sdpa")
    assert torch.equal(dense, brute_force_mask(docs, frames))


def test_flex_forward_matches_dense_sdpa():
    torch.manual_seed(0)
    L = 200  # not a multiple of flex's 128 block
    docs, frames = packed_batch(L=L, seed=1)
    q = torch.randn(2, 4, L, 16, dtype=torch.float64)
    k = torch.randn(2, 2, L, 16, dtype=torch.float64)
    v = torch.randn(2, 2, L, 16, dtype=torch.float64)
    dense = attend(q, k, v, build_attention_mask(docs, frames, "sdpa"))
    flex = flex_attention(q, k, v, block_mask=build_attention_mask(docs, frames, "flex"), enable_gqa=True)
    torch.testing.assert_close(flex, dense, atol=1e-6, rtol=1e-6)
    # and both equal attention computed by hand with the brute-force mask
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~brute_force_mask(docs, frames), float("-inf"))
    by_hand = scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(dense, by_hand, atol=1e-9, rtol=1e-9)


def test_compiled_block_mask_builder_equals_eager_and_compiles_once():
    # The CUDA path builds BlockMasks with the compiled create_block_mask (as torchtitan does);
    # on CPU, compiled explicitly: same blocks as eager, and a new batch of the same shape
    # reuses the graph (the ids are graph inputs, not constants baked into it).
    torch._dynamo.reset()
    docs, frames = packed_batch(L=256, seed=2)
    eager = build_attention_mask(docs, frames, "flex", compiled=False)
    compiled = build_attention_mask(docs, frames, "flex", compiled=True)
    for a, b in zip(compiled.as_tuple(), eager.as_tuple(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    dense_blocks = build_attention_mask(docs, frames, "sdpa")[:, 0].unflatten(1, (2, 128)).unflatten(3, (2, 128))
    assert torch.equal(compiled.to_dense()[:, 0].bool(), dense_blocks.any(dim=(2, 4)))
    other_docs, other_frames = packed_batch(L=256, seed=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = build_attention_mask(other_docs, other_frames, "flex", compiled=True)
    assert torch.equal(again.to_dense(), build_attention_mask(other_docs, other_frames, "flex", compiled=False).to_dense())
