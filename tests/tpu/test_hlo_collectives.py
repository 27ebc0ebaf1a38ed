"""Counting the collectives of a compiled step: loop trip counts, async pairs and XLA:TPU's fused
reduce-scatter, on a hand-written module shaped like the real compiler output (the compiled TPU steps
themselves are checked in test_compile_check.py)."""
from mefem_jax.tpu import collectives

HLO = """\
HloModule jit_train_step, entry_computation_layout={(bf16[64,64]{1,0})->bf16[64,64]{1,0}}

%add.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter.1.clone (input.7: f32[8,256]) -> f32[8,64] {
  %input.7 = f32[8,256]{1,0} parameter(0)
  %all-reduce.9 = f32[8,256]{1,0} all-reduce(%input.7), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add.1
  ROOT %ds = f32[8,64]{1,0} dynamic-slice(%all-reduce.9), dynamic_slice_sizes={8,64}
}

%body.3 (p.1: (s32[], bf16[64,16])) -> (s32[], bf16[64,16]) {
  %p.1 = (s32[], bf16[64,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p.1), index=0
  %w = bf16[64,16]{1,0} get-tuple-element(%p.1), index=1
  %all-gather-start.2 = (bf16[64,16]{1,0}, bf16[64,64]{1,0}) all-gather-start(%w), channel_id=1, dimensions={1}
  %all-gather-done.2 = bf16[64,64]{1,0} all-gather-done(%all-gather-start.2)
  %rs = f32[8,64]{1,0} fusion(%w), kind=kCustom, calls=%all-reduce-scatter.1.clone
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[64,16]{1,0}) tuple(%next, %w)
}

%cond.4 (p.2: (s32[], bf16[64,16])) -> pred[] {
  %p.2 = (s32[], bf16[64,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%p.2), index=0
  %constant.12 = s32[] constant(12)
  ROOT %lt = pred[] compare(%j, %constant.12), direction=LT
}

ENTRY %main.5 (x.1: bf16[64,64]) -> bf16[64,64] {
  %x.1 = bf16[64,64]{1,0} parameter(0)
  %w0 = bf16[64,16]{1,0} slice(%x.1), slice={[0:64], [0:16]}
  %zero = s32[] constant(0)
  %init = (s32[], bf16[64,16]{1,0}) tuple(%zero, %w0)
  %loop = (s32[], bf16[64,16]{1,0}) while(%init), condition=%cond.4, body=%body.3
  %ar = bf16[64,64]{1,0} all-reduce(%x.1), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add.1
  ROOT %a2a = bf16[64,64]{1,0} all-to-all(%ar), channel_id=4, dimensions={0}
}
"""


def test_counts_multiply_by_the_loop_trip_count():
    got = collectives.count(HLO)
    # In the 12-trip loop: one all-gather (the -start; -done is not a second collective), whose full
    # buffer is the gathered bf16[64,64], and one fused reduce-scatter of an f32[8,256] input.
    assert got["all-gather"] == {"count": 12, "bytes": 12 * 64 * 64 * 2}
    assert got["reduce-scatter"] == {"count": 12, "bytes": 12 * 8 * 256 * 4}
    # Outside it: one all-reduce and one all-to-all, each once.
    assert got["all-reduce"] == {"count": 1, "bytes": 64 * 64 * 2}
    assert got["all-to-all"] == {"count": 1, "bytes": 64 * 64 * 2}
    assert got["collective-permute"] == {"count": 0, "bytes": 0}
    assert got["uncounted_loops"] == 0


def test_a_loop_of_unknown_length_is_counted_once_and_flagged():
    text = HLO.replace("%constant.12 = s32[] constant(12)", "%constant.12 = s32[] parameter(1)")
    got = collectives.count(text)
    assert got["all-gather"]["count"] == 1
    assert got["uncounted_loops"] == 1


def test_a_combined_all_reduce_counts_every_array_it_carries():
    text = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (g1: f32[1000], g2: f32[3000]) -> (f32[1000], f32[3000]) {
  %g1 = f32[1000]{0} parameter(0)
  %g2 = f32[3000]{0} parameter(1)
  ROOT %ar = (f32[1000]{0}, f32[3000]{0}) all-reduce(%g1, %g2), channel_id=1, to_apply=%add
}
"""
    assert collectives.count(text)["all-reduce"] == {"count": 1, "bytes": 4 * 4000}
