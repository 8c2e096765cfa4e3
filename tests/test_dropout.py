"""The LoRA dropout keep-mask drawn from the generator's 64-bit words (``qlora_ref.dropout.draw_keep``) against
its definition, ``rng.random(shape, float32) >= p``: the same mask and the same generator state afterwards, for any
shape, rate and position in the stream; and the fallback where the word path does not apply."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlora_ref import dropout
from qlora_ref.dropout import draw_keep, keep_mask_definition

shapes = st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple)
rates = st.one_of(st.floats(0.0, 1.0, allow_nan=False, width=32), st.sampled_from([0.05, 0.1, 0.5, 2.0**-24,
                                                                                    1 - 2.0**-24]))


@given(seed=st.integers(0, 2**32 - 1), shapes=st.lists(shapes, min_size=1, max_size=4), p=rates)
def test_same_masks_and_state_as_the_definition(seed, shapes, p):
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    for shape in shapes:  # odd sizes leave a half-word buffered: the next draw must take the definition's path
        want, got = keep_mask_definition(a, shape, p), draw_keep(b, shape, p)
        assert got.dtype == np.bool_ and got.shape == want.shape
        assert np.array_equal(got, want)
        assert a.bit_generator.state == b.bit_generator.state
    assert np.array_equal(a.random(5), b.random(5))


def test_the_threshold_is_exact_at_the_boundary():
    """U = k · 2⁻²⁴ is kept iff U >= float32(p): the words just below and at ⌈p · 2²⁴⌉ decide differently."""
    for p in (0.1, 0.3, 0.5, 0.9):
        t = int(dropout._threshold(p))
        below, at = np.float32((t - 1) * 2.0**-24), np.float32(t * 2.0**-24)
        assert not below >= np.float32(p) and at >= np.float32(p)


def test_the_word_path_is_taken_only_where_it_holds(monkeypatch):
    rng = np.random.default_rng(0)
    assert dropout._usable(rng, 8) and not dropout._usable(rng, 7)
    assert not dropout._usable(np.random.Generator(np.random.MT19937(0)), 8)
    rng.random(1, dtype=np.float32)  # a half-word buffered
    assert not dropout._usable(rng, 8)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(dropout, "_AGREES", False)  # numpy changed its float construction: the definition is used
    assert not dropout._usable(rng, 8)
    want = keep_mask_definition(np.random.default_rng(0), (4, 4), 0.25)
    assert np.array_equal(draw_keep(rng, (4, 4), 0.25), want)


def test_a_generator_state_of_another_form_takes_the_definition(monkeypatch):
    """A future numpy whose state dict lacks the half-word fields, or whose word path raises, draws by the
    definition instead of failing."""
    monkeypatch.setattr(dropout, "_AGREES", None)

    def broken(*args):
        raise KeyError("uinteger")

    monkeypatch.setattr(dropout, "_draw_from_words", broken)
    assert not dropout._word_path_agrees()
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(draw_keep(rng, (8, 8), 0.1), keep_mask_definition(ref, (8, 8), 0.1))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p):
    keep = draw_keep(np.random.default_rng(1), (512, 512), p)
    assert abs(keep.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / keep.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_uniform_draw_equal_to_p_is_kept(seed):
    """M = (U >= p): a draw U exactly equal to float32(p) is kept (P(keep) = 1 - p needs the closed side there).
    p is taken equal to one of the generator's own draws, so the tie is certain, on the definition and on the
    word path alike."""
    shape = (4, 16)
    u = np.random.default_rng(seed).random(shape, dtype=np.float32)
    k = int(np.argmax((u > 0.05) & (u < 0.95)))  # a draw in a usual dropout range
    p = float(u.flat[k])
    for draw in (keep_mask_definition, draw_keep):
        keep = draw(np.random.default_rng(seed), shape, p)
        assert keep.flat[k]
        assert np.array_equal(keep, u >= np.float32(p))
