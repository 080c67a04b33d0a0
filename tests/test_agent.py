"""AgentAttention (agentsd spec §7): identity when off, ToMe phase, merge invariants, agent algebra, schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_processor import AttnProcessor2_0

import attnctrl
from attnctrl.core import AttnCtrlError, Controller, UnsupportedModelError
from attnctrl.kernels.token_merge import bipartite_plan, random_picks
from attnctrl.methods import AgentAttention
from attnctrl.processors.agent import agent_attention

pytestmark = pytest.mark.usefixtures("no_grad")
SIZE = {"height": 256, "width": 256}  # 32 x 32 latent: 1024 tokens at full resolution


def test_off_is_bit_identical_and_undo_is_exact():
    pipe = tiny("sd15")
    plain = run(pipe, **SIZE)
    before = dict(denoiser_of(pipe).attn_processors)
    with attnctrl.apply(pipe, AgentAttention(ratio=0.0)):
        np.testing.assert_array_equal(run(pipe, **SIZE), plain)
    with attnctrl.apply(pipe, AgentAttention()) as h:
        assert [la.level for la in h.layers] == ["down.0", "down.0", "up.3", "up.3", "up.3"]  # full resolution
        changed = run(pipe, **SIZE)
    assert np.abs(changed - plain).max() > 1e-4
    assert denoiser_of(pipe).attn_processors == before and len(denoiser_of(pipe)._forward_pre_hooks) == 0
    assert all(len(m._forward_pre_hooks) == 0 for m in denoiser_of(pipe).modules())  # block hooks removed too
    np.testing.assert_array_equal(run(pipe, **SIZE), plain)


def test_both_merge_orders_give_the_same_image_without_ties():
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AgentAttention()):
        row_major = run(pipe, **SIZE)
    with attnctrl.apply(pipe, AgentAttention(merge_order="official")):
        official = run(pipe, **SIZE)
    np.testing.assert_allclose(official, row_major, atol=1e-5, rtol=0)  # float summation order only


def test_same_seed_same_image_and_the_global_rng_is_untouched():
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AgentAttention(merge_seed=3)):
        torch.manual_seed(123)
        a = run(pipe, **SIZE)
        state = torch.get_rng_state()
        b = run(pipe, **SIZE)
        torch.manual_seed(123)
        run(pipe, **SIZE)
        assert torch.equal(torch.get_rng_state(), state)  # the merge randomness never draws from the global RNG
    np.testing.assert_array_equal(a, b)
    with attnctrl.apply(pipe, AgentAttention(merge_seed=4)):
        assert not np.array_equal(run(pipe, **SIZE), a)


def _grid_tokens(b=2, h=8, w=12, c=6, seed=0):
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


def test_merge_invariants():
    x = _grid_tokens()
    plan = bipartite_plan(x, 8, 12, 4, 4, random_picks(8, 12, 4, 4, torch.Generator().manual_seed(0)))
    n = 96
    assert plan.n_dst == 2 * 3 and plan.n_src == n - 6
    for r in (0, 5, 40, 90, 200):
        merged = plan.merge(x, r)
        assert merged.shape == (2, n - min(r, plan.n_src), 6) and plan.merged_len(r) == merged.shape[1]
        back = plan.unmerge(merged, r)
        kept = torch.ones(2, n, dtype=torch.bool)
        moved = plan.src_pos[plan.order[:, : min(r, plan.n_src)]]
        kept.scatter_(1, moved, False)
        kept[:, plan.dst_pos] = False
        assert torch.equal(back[kept], x[kept])  # unmerged src tokens come back unchanged
        for bi in range(2):  # merged src rows equal their dst row
            for j in range(min(r, plan.n_src)):
                s = plan.order[bi, j]
                assert torch.equal(back[bi, plan.src_pos[s]], back[bi, plan.dst_pos[plan.best_dst[bi, s]]])
    const = torch.full((2, n, 6), 0.7)
    assert torch.allclose(plan.merge(const, 50), torch.full((2, n - 50, 6), 0.7))


def test_partition_is_top_left_without_randomness_and_shared_across_the_batch():
    x = _grid_tokens(b=2)
    plan = bipartite_plan(x, 8, 12, 4, 4, None)
    ys, xs = plan.dst_pos // 12, plan.dst_pos % 12
    assert torch.all(ys % 4 == 0) and torch.all(xs % 4 == 0)
    rand = bipartite_plan(x, 8, 12, 4, 4, random_picks(8, 12, 4, 4, torch.Generator().manual_seed(1)))
    assert rand.dst_pos.ndim == 1  # one partition for every batch item (CFG pairs share it)
    cells = (rand.dst_pos // 12 // 4) * 3 + (rand.dst_pos % 12) // 4
    assert sorted(cells.tolist()) == list(range(6))  # one dst per full cell; border tokens are src


@pytest.mark.parametrize("tie", [True, False], ids=["tied-similarities", "distinct-similarities"])
def test_official_merge_order_is_tomesds_own(tie):
    """``merge_order="official"`` reproduces tomesd's merge token for token (AgentSD's merge is tomesd's plus the
    agent merge on the same ranking), including how its non-stable argsorts break exactly tied similarities; the
    default row-major order keeps the same tokens wherever nothing ties, in another order."""
    from tomesd.merge import bipartite_soft_matching_random2d

    g = torch.Generator().manual_seed(0)
    if tie:  # every token is one of three directions: most similarities tie
        metric = torch.randn(3, 16, generator=g)[torch.randint(0, 3, (96,), generator=g)][None].repeat(2, 1, 1)
    else:
        metric = torch.randn(2, 96, 16, generator=g)
    x = torch.randn(2, 96, 16, generator=g)
    for seed in (None, 3):
        gens = [None if seed is None else torch.Generator().manual_seed(seed) for _ in range(2)]
        merge, unmerge = bipartite_soft_matching_random2d(metric, 12, 8, 4, 4, 40, no_rand=seed is None,
                                                          generator=gens[0])
        pick = None if seed is None else random_picks(8, 12, 4, 4, gens[1])
        official = bipartite_plan(metric, 8, 12, 4, 4, pick, "official")
        assert torch.equal(official.merge(x, 40), merge(x))
        assert torch.equal(official.unmerge(official.merge(x, 40), 40), unmerge(merge(x)))
    row_major = bipartite_plan(metric, 8, 12, 4, 4, None)
    merge, unmerge = bipartite_soft_matching_random2d(metric, 12, 8, 4, 4, 40, no_rand=True)
    assert not torch.equal(row_major.merge(x, 40), merge(x))  # another token order ...
    same_tokens = torch.equal(row_major.unmerge(row_major.merge(x, 40), 40), unmerge(merge(x)))
    assert same_tokens != tie  # ... and the same merges unless similarities tie
    assert torch.equal(row_major.dst_pos, row_major.dst_pos.sort().values)
    with pytest.raises(AttnCtrlError, match="merge_order"):
        AgentAttention(merge_order="sorted")


def test_agent_attention_algebra():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    agents = torch.randn(1, 2, 5, 8, generator=g)
    v = torch.randn(1, 2, 1, 8, generator=g).expand(1, 2, 30, 8)
    torch.testing.assert_close(agent_attention(q, k, v, agents), 1.075 * v)  # constant V -> (1 + k) V
    v = torch.randn(1, 2, 30, 8, generator=g)
    one = agent_attention(q, k, v, agents[:, :, :1], k_shortcut=0.0)
    assert torch.allclose(one, one[:, :, :1].expand_as(one), atol=1e-6)  # one agent: every row equal
    d = 8
    pa = torch.softmax(q @ agents.transpose(-1, -2) * d**-0.15, -1)
    pk = torch.softmax(agents @ k.transpose(-1, -2) * d**-0.5, -1)
    torch.testing.assert_close(agent_attention(q, k, v, agents, k_shortcut=0.0), (pa @ pk) @ v)  # associativity
    perm = torch.randperm(30, generator=g)
    torch.testing.assert_close(agent_attention(q[:, :, perm], k, v, agents, k_shortcut=0.0),
                               agent_attention(q, k, v, agents, k_shortcut=0.0)[:, :, perm])


def test_agents_equal_to_queries_approach_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 40, generator=g, dtype=torch.float64) for _ in range(3))
    approx = agent_attention(q, k, v, q, k_scale2=0.3, k_shortcut=0.0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (approx - exact).abs().max() / exact.abs().max() < 0.05  # spec §7.5: ~0.006 with k_scale2 = 0.3


def test_fp16_inputs_with_fp32_precision_match_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v, a = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(4))
    ref = agent_attention(q, k, v, a)
    half = agent_attention(q.half(), k.half(), v.half(), a.half(), fp32=True)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-3, rtol=2e-3)


def _attn1(pipe, name="down_blocks.0.attentions.0.transformer_blocks.0.attn1"):
    return denoiser_of(pipe).get_submodule(name)


def test_tome_phase_equals_softmax_over_merged_tokens_then_unmerge():
    pipe = tiny("sd15")
    config = AgentAttention(switch_step=0, use_rand=False, late_sx=2, late_sy=2, ratio=0.4)
    with attnctrl.apply(pipe, config) as h:
        ctl = Controller.of(pipe)
        attn = _attn1(pipe)
        layer = h.layers[0]
        proc = h.processors[layer.name]
        x = torch.randn(2, 32 * 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.randn(2, 32 * 32, 32, generator=torch.Generator().manual_seed(1))
        ctl.enter_step(5, grid=(32, 32))
        h.state.block_inputs[layer.name] = x
        out = proc(attn, y)
    plan = bipartite_plan(x, 32, 32, 2, 2, None)
    r = int(1024 * 0.4)
    ref = plan.unmerge(AttnProcessor2_0()(attn, plan.merge(y, r)), r)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_phase_switches_exactly_at_the_configured_step():
    pipe = tiny("sd15")
    phases = []
    for switch, steps in ((2, 4), (0.5, 6)):
        with attnctrl.apply(pipe, AgentAttention(switch_step=switch)) as h:
            original = h.state.phase

            def spy(_orig=original):
                result = _orig()
                phases.append((h.controller.step, result))
                return result

            h.state.phase = spy
            run(pipe, steps=steps, **SIZE)
        per_step = dict(phases)
        cut = 2 if switch == 2 else 3
        assert all(per_step[s] == (4, 4, 0.95) for s in range(cut))
        assert all(per_step[s] == (2, 2, 0.5) for s in range(cut, steps))
        phases.clear()


def test_sdxl_patches_the_first_attention_level_and_sd21_fp32():
    with attnctrl.apply(tiny("sdxl"), AgentAttention()) as h:
        assert {la.level for la in h.layers} == {"down.1", "up.1"} and all(la.kind == "self" for la in h.layers)
        tiny("sdxl")("a cat", num_inference_steps=2, height=256, width=256)
    pipe = attnctrl.load_pipeline("tiny-sd21", dtype="bf16")
    with attnctrl.apply(pipe, AgentAttention(attn_precision="fp32")):
        out = run(pipe, steps=2, **SIZE)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [
    {"ratio": 1.0}, {"ratio": -0.1}, {"sx": 0}, {"sy": 1.5}, {"agent_ratio": 2}, {"switch_step": -1},
    {"switch_step": 1.5}, {"attn_precision": "fp16"}, {"max_downsample": 0},
])
def test_bad_configs_raise(kwargs):
    with pytest.raises(AttnCtrlError):
        AgentAttention(**kwargs)


def test_unsupported_and_tiny_grids():
    with pytest.raises(UnsupportedModelError):
        attnctrl.apply(tiny("flux"), AgentAttention())
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AgentAttention(ratio=0.001)):  # r rounds to 0 on small layers: stock attention
        np.testing.assert_array_equal(run(pipe, steps=1, height=64, width=64), run(pipe, steps=1, height=64,
                                                                                      width=64))


def test_generate_cli_with_agent(tmp_path):
    from click.testing import CliRunner

    from attnctrl.cli.main import cli

    result = CliRunner().invoke(cli, ["generate", "-m", "tiny-sd15", "-p", "a cat", "--steps", "2", "--method",
                                      "agent", "--opt", "agent_ratio=0.9", "--opt", "switch_step=0.5", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from attnctrl.io import read_png_metadata

    record = read_png_metadata(next(tmp_path.glob("*.png")))["attnctrl"]
    assert record["method"] == "agent" and record["method_options"]["agent_ratio"] == 0.9
    assert record["method_options"]["switch_step"] == 0.5
