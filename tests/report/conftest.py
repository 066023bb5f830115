import pytest

from mtpdiag.report import build_report, stats

from .jobs import build_micro_job


@pytest.fixture(scope="package", autouse=True)
def fewer_resamples():
    """200 bootstrap resamples instead of 2000: the same intervals to within noise, 10x faster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats, "N_RESAMPLES", 200)
        yield


@pytest.fixture(scope="package")
def micro_job(tmp_path_factory):
    return build_micro_job(tmp_path_factory.mktemp("micro-job"))


@pytest.fixture(scope="package")
def report(micro_job):
    return build_report(micro_job)
