"""The import-time check that croc._C was built against the running torch release."""

import pytest
import torch

from croc.ops import assignment


@pytest.mark.parametrize(
    ("built", "running"),
    [("2.13.0+cpu", "2.13.0+cpu"), ("2.13.0+cpu", "2.13.1+cu130"), ("2.11.0", "2.11.0+cu128")],
)
def test_same_minor_release_is_accepted(built, running):
    assignment.check_built_against(built, running)


@pytest.mark.parametrize(
    ("built", "running"), [("2.13.0+cpu", "2.11.0+cu130"), ("2.14.1", "2.13.0+cpu"), ("unknown", "2.13.0")]
)
def test_other_release_is_refused_with_the_rebuild_command(built, running):
    with pytest.raises(ImportError, match=r"built against torch .*`pip install --no-build-isolation"):
        assignment.check_built_against(built, running)


@pytest.mark.skipif(not assignment.EXTENSION_AVAILABLE, reason="croc._C not built")
def test_loaded_extension_records_the_running_torch():
    from croc import _C

    assert _C.torch_version().split("+")[0] == torch.__version__.split("+")[0]
