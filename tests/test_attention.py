import pytest
import torch

from blockstate.attention import BlockSelfAttention, QKNorm, relative_position_bucket
from blockstate.config import ModelConfig

from reference import naive_attention


def test_relative_position_buckets():
    d = torch.arange(0, 300)
    b = relative_position_bucket(d, num_buckets=32, max_distance=128)
    assert (b[:16] == d[:16]).all()                    # exact buckets for small distances
    assert (b.diff() >= 0).all()                       # monotone
    assert b.max() == 31 and (b[128:] == 31).all()     # saturates at max_distance
    assert (relative_position_bucket(-d, 32, 128) == 0).all()


def _reference_self_attention(attn: BlockSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention of every position to its allowed keys, computed position by position."""
    batch, length, _ = x.shape
    w, h, d = attn.block_size, attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).unflatten(-1, (3, h, d)).unbind(2)                   # (B, L, H, Dh)
    q, k = attn.qk_norm(q, k)
    pos = torch.arange(length)
    block = pos // w
    allowed = (pos[None, :] <= pos[:, None]) & (block[None, :] == block[:, None])
    if attn.mode == "full":
        allowed = pos[None, :] <= pos[:, None]
    if attn.mode == "sliding":
        allowed |= (pos[None, :] <= pos[:, None]) & (block[None, :] == block[:, None] - 1)
    # The bias depends on the distance within the attended window.
    bias = attn.rel_bias(pos, pos)
    return torch.stack([naive_attention(q[i], k[i], v[i], allowed, bias) for i in range(batch)]
                       ).flatten(2)


@pytest.mark.parametrize("mode", ["block", "sliding", "full"])
@pytest.mark.parametrize("n_blocks", [1, 3])
def test_block_self_attention_matches_reference(mode, n_blocks):
    config = ModelConfig(d_model=16, n_heads=2, block_size=4, self_attention=mode,
                         rel_pos_buckets=8, rel_pos_max_distance=16)
    attn = BlockSelfAttention(config).double()
    with torch.no_grad():
        attn.rel_bias.embedding.weight.normal_()
    x = torch.randn(2, 4 * n_blocks, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference_self_attention(attn, x), rtol=1e-10, atol=1e-10)


def test_qk_norm_off_uses_standard_scaling():
    config = ModelConfig(d_model=16, n_heads=2, block_size=4, qk_norm=False)
    attn = BlockSelfAttention(config).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference_self_attention(attn, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 8, 16)])
def test_attend_with_learned_bias_equals_sdpa(shape):
    """A bias that needs a gradient takes attend's own softmax path on CPU: its values and the
    gradients of q, k, v and the bias equal scaled_dot_product_attention's."""
    import torch.nn.functional as F

    from blockstate.attention import attend

    n, h, lq, lk = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, h, length, 4, requires_grad=True) for length in (lq, lk, lk))
    bias = torch.randn(h, lq, lk, requires_grad=True)
    future = torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)
    weights = torch.randn(n, h, lq, 4)
    outputs, grads = [], []
    for fn in (lambda m: attend(q, k, v, m),
               lambda m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[None], scale=1.0)):
        mask = bias.masked_fill(future, float("-inf"))
        out = fn(mask)
        outputs.append(out)
        grads.append(torch.autograd.grad((out * weights).sum(), (q, k, v, bias)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_qk_norm_keys_are_unit_vectors_like_f_normalize(dtype):
    norm = QKNorm(n_heads=2, head_dim=8, enabled=True)
    k = torch.randn(3, 5, 2, 8).to(dtype)
    k[0, 0, 0] = 0  # a zero vector (an empty memory slot) stays zero, with a finite gradient
    k.requires_grad_()
    out = norm.keys(k)
    out.float().sum().backward()
    # (float16 cannot hold that gradient's 1/1e-12 at a zero vector, as with F.normalize)
    assert torch.isfinite(k.grad[1:]).all() and (dtype == torch.float16 or torch.isfinite(k.grad).all())
    out = out.detach()
    assert out.dtype == dtype and torch.isfinite(out).all() and (out[0, 0, 0] == 0).all()
    k = k.detach()
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    # (F.normalize itself gives NaN for a zero vector in float16)
    torch.testing.assert_close(out[1:], torch.nn.functional.normalize(k, dim=-1)[1:], rtol=tol, atol=tol)
    q = norm.queries(k)
    torch.testing.assert_close(q.norm(dim=-1).float()[1:],
                               norm.log_scale.exp().detach().expand(2, 5, 2), rtol=tol, atol=tol)
