"""The options ``finfeat stream`` runs with: streaming, and no deadline on the job's streams.

Beam's portable runner passes ``--job_server_timeout`` (default 300 s) as the gRPC deadline of
the job's state and message streams; with it the client gave up on a job still running after
five minutes. These tests run Beam's own client code (``JobServiceHandle.run``) against a job
service that records the deadlines it is asked for (a real five-minute job would be too slow
for the suite).
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PortableOptions, StandardOptions
from apache_beam.runners.portability.portable_runner import JobServiceHandle

from finfeat.jobs.stream import stream_options


class _RecordingJobService:
    """Answers the two streaming calls of ``JobServiceHandle.run`` and notes their deadlines."""

    def __init__(self) -> None:
        self.deadlines: dict[str, object] = {}

    def GetStateStream(self, request, timeout=None):  # noqa: ANN001, ANN201, N802
        self.deadlines["state"] = timeout
        return iter([object()])

    def GetMessageStream(self, request, timeout=None):  # noqa: ANN001, ANN201, N802
        self.deadlines["messages"] = timeout
        return iter([])

    def Run(self, request, timeout=None):  # noqa: ANN001, ANN201, N802
        class _Response:
            job_id = "job"
        return _Response()


def _deadlines(args: list[str]) -> dict[str, object]:
    service = _RecordingJobService()
    JobServiceHandle(service, stream_options(args)).run("prepared")
    return service.deadlines


def test_stream_job_has_no_deadline_by_default() -> None:
    options = stream_options(["--runner=PrismRunner"])
    assert options.view_as(StandardOptions).streaming is True
    assert options.view_as(PortableOptions).job_server_timeout is None
    assert _deadlines(["--runner=PrismRunner"]) == {"state": None, "messages": None}


def test_a_deadline_the_user_gives_is_kept() -> None:
    for args in (["--job_server_timeout=900"], ["--job_server_timeout", "900"], ["--job-server-timeout=900"]):
        assert stream_options(["--runner=PrismRunner", *args]).view_as(PortableOptions).job_server_timeout == 900
    assert _deadlines(["--runner=PrismRunner", "--job_server_timeout=900"]) == {"state": 900, "messages": 900}
