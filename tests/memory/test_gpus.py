"""GPU table: forgiving lookup, clear errors, fit rows."""

import pytest

from memft.memory import CONSUMER_GPUS, GPUS, fits_table, get_gpu
from memft.memory.gpus import CUDA_CONTEXT_GIB, GIB


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("4090", "RTX 4090 24GB"),
        ("rtx4090", "RTX 4090 24GB"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090 24GB"),
        ("RTX 4060 Ti", "RTX 4060 Ti 16GB"),
        ("rtx-3060-12gb", "RTX 3060 12GB"),
        ("A100-SXM4-80GB", "A100 80GB"),
        ("a100 40gb", "A100 40GB"),
        ("NVIDIA H100 80GB HBM3", "H100 80GB"),
        ("h200", "H200 141GB"),
        ("RTX 5090", "RTX 5090 32GB"),
    ],
)
def test_forgiving_lookup(query, expected):
    assert get_gpu(query).name == expected


def test_ambiguous_and_unknown_names_list_choices():
    with pytest.raises(ValueError, match="A100 40GB, A100 80GB"):
        get_gpu("A100")
    with pytest.raises(ValueError) as err:
        get_gpu("Radeon 7900")
    for gpu in GPUS:
        assert gpu.name in str(err.value)


def test_required_gpus_present_and_consumer_list_resolves():
    names = {g.name for g in GPUS}
    assert {"RTX 3060 12GB", "RTX 4060 Ti 16GB", "RTX 3090 24GB", "RTX 4090 24GB", "RTX 5090 32GB"} <= names
    assert {"A100 40GB", "A100 80GB", "H100 80GB"} <= names
    assert [get_gpu(n).name for n in CONSUMER_GPUS] == list(CONSUMER_GPUS)


def test_fits_table_headroom_and_boundary():
    gpu = get_gpu("4090")
    usable = gpu.usable_bytes()
    assert usable == int((24564 / 1024 - CUDA_CONTEXT_GIB) * GIB)
    exact, over = fits_table(usable, ["4090"])[0], fits_table(usable + 1, ["4090"])[0]
    assert exact.fits and exact.headroom_bytes == 0
    assert not over.fits and over.headroom_bytes == -1
    row = fits_table(usable - int(3.1 * GIB), ["RTX 4090"])[0]
    assert row.sentence() == "fits on RTX 4090 24GB: yes, 3.1 GiB headroom"
    assert len(fits_table(0)) == len(GPUS)
    with pytest.raises(ValueError, match="peak_bytes"):
        fits_table(-1)
