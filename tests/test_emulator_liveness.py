"""runtime/emulator/liveness.py: which values a function lets go after each step."""
from runtime.emulator.liveness import releases


def test_values_go_after_their_last_reader():
    reads = [{"x", "w"}, {"a", "w"}, {"a", "b"}]
    writes = [["a"], ["b"], ["out"]]
    assert releases(reads, writes, keep={"w", "out"}) == [["x"], [], ["a", "b"]]


def test_values_nobody_reads_go_at_once_and_kept_ones_never():
    reads = [{"x"}, {"x"}]
    writes = [["dead", "used"], ["out"]]
    assert releases(reads, writes, keep={"out"}) == [["dead", "used"], ["x"]]
    assert releases(reads, writes, keep={"out", "x", "dead", "used"}) == [[], []]


def test_every_produced_value_is_released_once_and_never_before_a_read():
    reads = [set(), {"a"}, {"b"}, {"a", "c"}, {"d"}]
    writes = [["a"], ["b"], ["c"], ["d"], ["out"]]
    plan = releases(reads, writes, keep={"out"})
    released = [n for step in plan for n in step]
    assert sorted(released) == ["a", "b", "c", "d"]
    for i, names in enumerate(plan):
        for name in names:
            assert all(name not in later for later in reads[i + 1:])


def test_a_prefill_holds_its_live_set_not_every_value(tiny_model, compile_artifact):
    """The emulator lets each activation go after its last reader: the values a tiny
    model's prefill holds at once stay a small part of all it produces, and the run
    still gives the same logits as one that keeps everything."""
    import numpy as np

    import runtime

    out = compile_artifact(tiny_model("llama"), optimizations="float32", max_seq_len=256)
    session = runtime.load(out)
    backend = session.backend
    steps = backend.steps["prefill"]
    produced = [n for step in steps for n in step.out]
    live, peak = set(), 0
    for step in steps:
        live |= set(step.out)
        peak = max(peak, len(live))
        live -= set(step.release)
    assert len(produced) > 40 and peak < len(produced) / 3
    assert live <= set(backend.program.functions["prefill"].outputs)

    ids = list(range(3, 40))
    released = session.teacher_forced_logits(ids, prefill_len=len(ids))
    for step in steps:
        step.release = []
    kept = session.teacher_forced_logits(ids, prefill_len=len(ids))
    assert np.array_equal(released, kept)
