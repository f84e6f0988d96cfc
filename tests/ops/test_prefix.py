"""ops.prefix against naive loops, and attention over a prefix against explicit concatenation."""

import math

import pytest
import torch
from transformers import DynamicCache

from loratree.models.compat import cache_kwargs
from loratree.models.tiny import tiny_llama
from loratree.ops import prefix as ops

L, H, D = 3, 2, 4


def test_split_layers_follows_the_flat_layout():
    e = torch.randn(5, L * 2 * H * D)
    kv = ops.split_layers(e, L, H, D)
    for i in range(L):
        for j in range(2):
            for h in range(H):
                for t in range(5):
                    for d in range(D):
                        assert kv[i, j, h, t, d] == e[t, ((2 * i + j) * H + h) * D + d]


def test_layer_kv_broadcasts_one_prefix_over_the_batch():
    e = torch.randn(4, L * 2 * H * D)
    kv = ops.layer_kv(e, L, H, D, batch=3)
    ref = ops.split_layers(e, L, H, D)
    assert len(kv) == L
    for i, (k, v) in enumerate(kv):
        assert k.shape == (3, H, 4, D)
        assert torch.equal(k[2], ref[i, 0]) and torch.equal(v[1], ref[i, 1])


def test_pad_prefixes_left_pads_and_masks():
    p1, p2 = torch.randn(2, L * 2 * H * D), torch.randn(5, L * 2 * H * D)
    kv, mask = ops.pad_prefixes([p1, None, p2], L, H, D)
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0] * 5, [1] * 5]
    for i, (k, v) in enumerate(kv):
        assert k.shape == (3, H, 5, D)
        assert torch.equal(k[0, :, 3:], ops.split_layers(p1, L, H, D)[i, 0])
        assert torch.equal(v[2], ops.split_layers(p2, L, H, D)[i, 1])
        assert not k[1].any() and not k[0, :, :3].any()
    with pytest.raises(ValueError, match="at least one row"):
        ops.pad_prefixes([None, None], L, H, D)


def test_pad_prefixes_keeps_gradients():
    p = torch.randn(2, L * 2 * H * D, requires_grad=True)
    kv, _ = ops.pad_prefixes([p, None], L, H, D)
    sum(k.sum() + 2 * v.sum() for k, v in kv).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_extend_mask_and_positions():
    prefix_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    assert ops.extend_mask(prefix_mask, mask, 4).tolist() == [[0, 1, 1, 0, 1, 1, 1],
                                                              [1, 1, 1, 1, 1, 1, 0]]
    assert ops.extend_mask(prefix_mask, None, 2).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    lengths = torch.tensor([2, 3])
    # naive: count real tokens so far, minus one, plus the start (padding: clamped)
    assert ops.prompt_positions(mask, lengths, shift=True).tolist() == [[2, 2, 3, 4],
                                                                       [3, 4, 5, 5]]
    assert ops.prompt_positions(mask, lengths, shift=False).tolist() == [[0, 0, 1, 2],
                                                                        [0, 1, 2, 2]]
    assert ops.prompt_positions(None, lengths, shift=True, seq_len=2).tolist() == [[2, 3], [3, 4]]


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_attention_over_a_padded_prefix_equals_explicit_concatenation(kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    cfg = model.config
    attn = model.model.layers[1].self_attn
    hd = cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_hidden_layers * 2 * kv_heads * hd
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(3, width, generator=g), None, torch.randn(5, width, generator=g)]
    kv, prefix_mask = ops.pad_prefixes(prefixes, cfg.num_hidden_layers, kv_heads, hd)
    b, t, p = 3, 6, prefix_mask.shape[1]
    x = torch.randn(b, t, cfg.hidden_size, generator=g)
    pos = torch.arange(t).expand(b, t) + 2
    cos, sin = model.model.rotary_emb(x, pos)
    keep = torch.cat([prefix_mask.bool(), torch.ones(b, t, dtype=torch.bool)], 1)
    causal = torch.ones(t, p + t, dtype=torch.bool).tril(p)
    allowed = keep[:, None, None, :] & causal[None, None]
    mask4d = torch.zeros(b, 1, t, p + t).masked_fill(~allowed, float("-inf"))
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    with torch.no_grad():
        got, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask4d,
                      **cache_kwargs(attn, cache))

        # reference: project, rotate, concatenate [prefix | prompt], repeat kv heads, softmax
        q = _rope(attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2), cos, sin)
        k = _rope(attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        ref_out = torch.zeros(b, t, cfg.num_attention_heads * hd)
        for row in range(b):
            flat = prefixes[row]
            for head in range(cfg.num_attention_heads):
                g_head = head // (cfg.num_attention_heads // kv_heads)
                keys, values = [k[row, g_head]], [v[row, g_head]]
                if flat is not None:  # layer 1's slice of the flat layout, this kv head
                    cols = slice((2 * 1 * kv_heads + g_head) * hd,
                                 (2 * 1 * kv_heads + g_head + 1) * hd)
                    vcols = slice(((2 * 1 + 1) * kv_heads + g_head) * hd,
                                  ((2 * 1 + 1) * kv_heads + g_head + 1) * hd)
                    keys.insert(0, flat[:, cols])
                    values.insert(0, flat[:, vcols])
                keys_all, values_all = torch.cat(keys), torch.cat(values)
                n_pre = keys_all.shape[0] - t
                scores = q[row, head] @ keys_all.T / math.sqrt(hd)
                scores = scores.masked_fill(
                    ~torch.ones(t, n_pre + t, dtype=torch.bool).tril(n_pre), float("-inf"))
                ref_out[row, :, head * hd:(head + 1) * hd] = scores.softmax(-1) @ values_all
        ref = attn.o_proj(ref_out)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
