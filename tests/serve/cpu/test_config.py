"""``CpuTuning``: one switch per piece, read from the CLI's ``--cpu-tuning``."""

import pytest

from loratree.cli.main import build_parser
from loratree.serve.cpu import CpuTuning, Piece


def test_parse_reads_all_none_and_piece_lists():
    assert CpuTuning.parse("none") is None and CpuTuning.parse("off") is None
    assert CpuTuning.parse("all") == CpuTuning() == CpuTuning.of(Piece)
    assert CpuTuning.parse("orientation") == CpuTuning(True, False)
    assert CpuTuning.parse(" OMP-release") == CpuTuning(False, True)
    with pytest.raises(ValueError, match="orientation, omp-release, all, none"):
        CpuTuning.parse("skinny")


@pytest.mark.parametrize("tuning", [CpuTuning(), CpuTuning.of([]),
                                    CpuTuning.of([Piece.OMP_RELEASE]),
                                    CpuTuning.of([Piece.ORIENTATION, Piece.OMP_RELEASE])])
def test_a_label_reads_back_as_the_same_tuning(tuning):
    parsed = CpuTuning.parse(tuning.label)
    assert (parsed or CpuTuning.of([])) == tuning
    assert all(tuning.on(p) == (p in tuning.pieces) for p in Piece)


def test_serve_takes_every_cpu_tuning_piece_by_default():
    parser = build_parser()
    assert parser.parse_args(["serve"]).cpu_tuning == CpuTuning()
    assert parser.parse_args(["serve", "--cpu-tuning", "none"]).cpu_tuning is None
    args = parser.parse_args(["serve", "--cpu-tuning", "orientation"])
    assert args.cpu_tuning == CpuTuning(gemm_orientation=True, release_openmp_pool=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cpu-tuning", "fast"])


def test_the_ablation_runs_all_off_all_on_and_each_piece_alone_on_and_alone_off():
    from bench.cpu_ablation import OFF, configurations

    configs = configurations()
    assert configs[OFF] is None and configs["all on"] == CpuTuning()
    assert len(configs) == 2 + 2 * len(Piece)
    for piece in Piece:
        assert configs[f"only {piece}"].pieces == (piece,)
        assert piece not in configs[f"all but {piece}"].pieces
        assert len(configs[f"all but {piece}"].pieces) == len(Piece) - 1
